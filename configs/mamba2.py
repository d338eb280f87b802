r"""Mamba-2 (SSD, Dao & Gu 2024): scalar-decay selective SSM on the gla op.
Pretraining.

lsm-train --config=configs/mamba2.py:size=125m --workdir=runs/mamba2
Smoke run on a CPU (under a minute):
lsm-train --config=configs/mamba2.py:smoke=True --workdir=/tmp/mamba2_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="mamba2")
