r"""Gated DeltaNet (Yang et al. 2025). Pretraining.

lsm-train --config=configs/gated_delta_net.py:size=125m --workdir=runs/gated_delta_net
Smoke run on a CPU (under a minute):
lsm-train --config=configs/gated_delta_net.py:smoke=True --workdir=/tmp/gated_delta_net_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="gated_delta_net")
