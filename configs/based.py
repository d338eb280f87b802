r"""Based (Arora et al. 2024): Taylor-feature linear attention (feature dim 16,
state 273) plus a sliding-window (64) softmax branch. Pretraining.

lsm-train --config=configs/based.py:size=125m --workdir=runs/based
Smoke run on a CPU (under a minute):
lsm-train --config=configs/based.py:smoke=True --workdir=/tmp/based_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="based")
