"""RMSNorm (Zhang & Sennrich 2019), optionally gated as in Mamba2/GLA outputs;
per-head standardisation for the GroupNorm outputs of RetNet and RWKV-7."""

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.sharding import param
from lsm.parallel import axes


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale over the last axis, computed in float32.

  Args:
    dim: size of the normalised (last) axis.
    eps: added to the mean square.
    axis_name: logical axis of ``scale``.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = axes.EMBED,
               rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted for a uniform constructor
    self.eps = eps
    self.scale = param(jnp.ones((dim,), jnp.float32), axis_name, float32=True)

  def __call__(self, x, gate=None):
    """x: [..., dim]; optional gate [..., dim] multiplies by silu(gate) after
    normalising (the output gate of GLA / Mamba2). Returns x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...]
    if gate is not None:
      y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(x.dtype)


def standardize_heads(o, eps: float):
  """Per-head GroupNorm without the affine part (RetNet's and RWKV-7's output
  norm): [..., H, P] -> float32 [..., H * P], each head's P channels shifted
  to zero mean and scaled to unit variance (eps added to the variance)."""
  o = o.astype(jnp.float32)
  mean = jnp.mean(o, -1, keepdims=True)
  var = jnp.mean(jnp.square(o - mean), -1, keepdims=True)
  return ((o - mean) * jax.lax.rsqrt(var + eps)).reshape(*o.shape[:-2], -1)

