"""Selective (Mamba) SSM scan: ``selective_scan`` (sequence) and
``selective_scan_step`` (one token)."""

from lsm.ops.selective_scan.api import selective_scan, selective_scan_step

__all__ = ["selective_scan", "selective_scan_step"]
