"""Feed-forward blocks: SwiGLU (Shazeer 2020) and RWKV-7's channel mixing
(Peng et al. 2025)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.layers.rwkv7 import token_shift
from lsm.layers.sharding import param, sharded
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


class RWKV7ChannelMix(nnx.Module):
  """RWKV-7's channel mixing: [B, T, D] -> [B, T, D], with a token shift.

      k = relu((x + (x' - x) o mu_k) W_k)^2,   y = k W_v

  x' is the previous token's input (``lsm.layers.rwkv7.token_shift``: zeros at
  t = 0 and at packed document starts), so unlike SwiGLU it keeps a cache, the
  last input [B, D], and follows the mixers' cache protocol (``init_cache``,
  ``__call__(x, cache, segment_ids=)``, ``step``). The paper's hidden width is
  4 D. Init: mu_k = 1 - (n / D)^((1 - l / L)^4) for channel n at depth l of L
  (RWKV-7's); W_k and W_v LeCun normal (RWKV-7 uses an orthogonal W_k and a
  zero W_v; lsm keeps its MLP init, as SwiGLU's).

  Args:
    d_model: input and output width D.
    hidden: hidden width.
    layer_index, n_layers: the block's depth in its stack (mu_k's init).
  """

  def __init__(self, d_model: int, hidden: int, *, layer_index: int = 0,
               n_layers: int = 1, rngs: nnx.Rngs):
    if n_layers < 1 or not 0 <= layer_index < n_layers:
      raise ValueError(f"RWKV7ChannelMix: layer_index={layer_index!r}, n_layers="
                       f"{n_layers!r}; expected 0 <= layer_index < n_layers")
    init = nnx.initializers.lecun_normal()
    frac = np.arange(d_model) / d_model
    mu = 1.0 - frac ** ((1.0 - layer_index / n_layers) ** 4)
    self.d_model = d_model
    self.mu_k = param(jnp.asarray(mu, jnp.float32), axes.EMBED, float32=True)
    self.key = nnx.Linear(d_model, hidden, use_bias=False, rngs=rngs,
                          kernel_init=sharded(init, axes.EMBED, axes.MLP))
    self.value = nnx.Linear(hidden, d_model, use_bias=False, rngs=rngs,
                            kernel_init=sharded(init, axes.MLP, axes.EMBED))

  def _mix(self, x, x_prev):
    f32 = jnp.float32
    xk = x.astype(f32) + (x_prev.astype(f32) - x.astype(f32)) * self.mu_k[...]
    k = jnp.square(jax.nn.relu(self.key(xk.astype(x.dtype))))
    return self.value(k.astype(x.dtype)).astype(x.dtype)

  def init_cache(self, batch: int):
    """The previous input, float32 [B, D] (zeros: the start of a sequence)."""
    return jnp.zeros((batch, self.d_model), jnp.float32)

  def __call__(self, x, cache=None, *, segment_ids=None):
    """x: [B, T, D]; cache: optional [B, D] input before x[:, 0];
    segment_ids: optional int [B, T] (the shift restarts at each document).
    Returns (y [B, T, D] in x.dtype, the new cache or None)."""
    y = self._mix(x, token_shift(x, cache, segment_ids=segment_ids))
    return y, None if cache is None else x[:, -1].astype(jnp.float32)

  def step(self, x_t, cache):
    """x_t: [B, D]; cache: [B, D]. Returns (y_t [B, D], cache)."""
    return self._mix(x_t, cache.astype(x_t.dtype)), x_t.astype(jnp.float32)
