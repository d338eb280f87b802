r"""Hybrid stack: three DeltaNet layers, then one softmax attention layer, repeated. Pretraining.

lsm-train --config=configs/hybrid.py:size=125m --workdir=runs/hybrid
Smoke run on a CPU (under a minute):
lsm-train --config=configs/hybrid.py:smoke=True --workdir=/tmp/hybrid_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="hybrid")
