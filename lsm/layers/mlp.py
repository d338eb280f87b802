"""SwiGLU feed-forward block (Shazeer 2020)."""

import jax
from flax import nnx

from lsm.layers.sharding import sharded
from lsm.parallel import axes


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)): [..., D] -> [..., D].

  Args:
    d_model: input and output width D.
    hidden: hidden width.
  """

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.gate = nnx.Linear(d_model, hidden, use_bias=False, rngs=rngs,
                           kernel_init=sharded(init, axes.EMBED, axes.MLP))
    self.up = nnx.Linear(d_model, hidden, use_bias=False, rngs=rngs,
                         kernel_init=sharded(init, axes.EMBED, axes.MLP))
    self.down = nnx.Linear(hidden, d_model, use_bias=False, rngs=rngs,
                           kernel_init=sharded(init, axes.MLP, axes.EMBED))

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
