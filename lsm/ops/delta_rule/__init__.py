"""The delta rule (DeltaNet, Gated DeltaNet): ``delta_rule`` and ``delta_rule_step``."""

from lsm.ops.delta_rule.api import delta_rule, delta_rule_step

__all__ = ["delta_rule", "delta_rule_step"]
