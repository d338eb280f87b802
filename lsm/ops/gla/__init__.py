"""Gated linear attention: ``gla`` (sequence) and ``gla_step`` (one token)."""

from lsm.ops.gla.api import gla, gla_step

__all__ = ["gla", "gla_step"]
