r"""Language model pretraining over any mixer stack (the general entry point;
gla.py, delta_net.py, gated_delta_net.py, mamba.py, mamba2.py, lightning.py, retnet.py,
based.py, hedgehog.py, mom.py, delta_product.py, kda.py, gdn2.py, rwkv7.py and
hybrid.py fix the mixer).

lsm-train --config=configs/lm.py:mixer=gla,smoke=True --workdir=runs/lm

Args (``:arg``): see configs/common.py ``lm_run``: mixer, size, impl, vocab_size,
beta_scale, eigenvalues, mlp (the blocks' MLP: swiglu, or rwkv7's channel
mixing; empty for the mixer's paper's), data, seq_len, batch_size, steps, smoke.
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg)
