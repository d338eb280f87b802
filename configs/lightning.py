r"""Lightning attention / TransNormerLLM (Qin et al. 2023; Lightning
Attention-2, Qin et al. 2024): linear attention with fixed head-wise decays,
SRMSNorm and a gated output. Pretraining.

lsm-train --config=configs/lightning.py:size=125m --workdir=runs/lightning
Smoke run on a CPU (under a minute):
lsm-train --config=configs/lightning.py:smoke=True --workdir=/tmp/lightning_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="lightning")
