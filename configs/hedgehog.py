r"""Hedgehog (Zhang et al. 2024): linear attention with the learnable "spiky"
feature map [softmax(xW), softmax(-xW)]. Pretraining (the attention-distillation
loss is lsm.layers.hedgehog.attention_distillation_loss).

lsm-train --config=configs/hedgehog.py:size=125m --workdir=runs/hedgehog
Smoke run on a CPU (under a minute):
lsm-train --config=configs/hedgehog.py:smoke=True --workdir=/tmp/hedgehog_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="hedgehog")
