"""Diagonal-plus-low-rank transitions (DeltaNet, Gated DeltaNet, KDA, RWKV-7,
DeltaProduct): ``dplr`` and ``dplr_step``."""

from lsm.ops.dplr.api import dplr, dplr_step

__all__ = ["dplr", "dplr_step"]
