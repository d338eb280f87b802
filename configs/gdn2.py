r"""Gated DeltaNet-2 (channel-wise erase and write gates; flash-linear-attention's
gdn2), on the dplr op. Pretraining.

lsm-train --config=configs/gdn2.py:size=125m --workdir=runs/gdn2
Smoke run on a CPU (under a minute):
lsm-train --config=configs/gdn2.py:smoke=True --workdir=/tmp/gdn2_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="gdn2")
