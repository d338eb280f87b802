"""Diagonal SSM scan: ``ssm_scan`` (sequence) and ``ssm_scan_step`` (one token)."""

from lsm.ops.ssm_scan.api import ssm_scan, ssm_scan_step

__all__ = ["ssm_scan", "ssm_scan_step"]
