r"""Gated linear attention (Yang et al. 2023). Pretraining.

lsm-train --config=configs/gla.py:size=125m --workdir=runs/gla
Smoke run on a CPU (under a minute):
lsm-train --config=configs/gla.py:smoke=True --workdir=/tmp/gla_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="gla")
