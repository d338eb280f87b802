r"""Mamba-style selective SSM; eigenvalues=signed for decays in [-1, 1]. Pretraining.

lsm-train --config=configs/mamba.py:size=125m --workdir=runs/mamba
Smoke run on a CPU (under a minute):
lsm-train --config=configs/mamba.py:smoke=True --workdir=/tmp/mamba_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="mamba")
