r"""Kimi Delta Attention (Kimi Team 2025, Kimi Linear): the delta rule with a
per-channel decay, on the dplr op. Pretraining.

lsm-train --config=configs/kda.py:size=125m --workdir=runs/kda
Smoke run on a CPU (under a minute):
lsm-train --config=configs/kda.py:smoke=True --workdir=/tmp/kda_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="kda")
