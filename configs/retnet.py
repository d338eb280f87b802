r"""RetNet multi-scale retention (Sun et al. 2023): fixed per-head decays
1 - 2^(-5-h), rotary q and k, GroupNorm and a swish gate. Pretraining.

lsm-train --config=configs/retnet.py:size=125m --workdir=runs/retnet
Smoke run on a CPU (under a minute):
lsm-train --config=configs/retnet.py:smoke=True --workdir=/tmp/retnet_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="retnet")
