r"""Mixture-of-Memories (Du et al. 2025): 4 gated-delta memories, top-2 routing,
a shared memory and the load-balancing loss (weight 0.01, added by the
trainer and logged as aux_loss). Pretraining.

lsm-train --config=configs/mom.py:size=125m --workdir=runs/mom
Smoke run on a CPU (under a minute):
lsm-train --config=configs/mom.py:smoke=True --workdir=/tmp/mom_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="mom")
