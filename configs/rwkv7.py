r"""RWKV-7 "Goose" (Peng et al. 2025): time mixing on the dplr op, heads of 64,
with RWKV-7's channel mixing as the block MLP. Pretraining.

lsm-train --config=configs/rwkv7.py:size=125m --workdir=runs/rwkv7
Smoke run on a CPU (under a minute):
lsm-train --config=configs/rwkv7.py:smoke=True --workdir=/tmp/rwkv7_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed;
mlp defaults to RWKV-7's channel mixing (``common.PAPER_MLP``; mlp=swiglu for
SwiGLU blocks).
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="rwkv7")
