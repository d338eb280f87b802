"""Diagonal-plus-low-rank transitions (DeltaNet, Gated DeltaNet, KDA, RWKV-7,
DeltaProduct): ``dplr`` and ``dplr_step``; ``delta_product`` holds
DeltaProduct's time expansion onto ``dplr``."""

from lsm.ops.dplr.api import dplr, dplr_step

__all__ = ["dplr", "dplr_step"]
