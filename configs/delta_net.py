r"""DeltaNet (Yang et al. 2024); beta_scale=2 for eigenvalues in [-1, 1]. Pretraining.

lsm-train --config=configs/delta_net.py:size=125m --workdir=runs/delta_net
Smoke run on a CPU (under a minute):
lsm-train --config=configs/delta_net.py:smoke=True --workdir=/tmp/delta_net_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="delta_net")
