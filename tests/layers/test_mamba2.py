"""Mamba-2 (SSD): the mixer computes the paper's recurrence. The expected value
is a float64 numpy token loop over the SSD equations from the layer's own
parameters and its (plain) input projection and short convolution; it never
calls gla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.mamba2 import Mamba2
from tests import numerics

D, H, N, B, T = 16, 4, 8, 2, 11


def _ssd_by_hand(layer, u):
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  e, p = layer.inner, layer.inner // H
  zxbcdt = f64(layer.in_proj(u))
  z, xbc, dt = zxbcdt[..., :e], zxbcdt[..., e:2 * e + 2 * N], zxbcdt[..., 2 * e + 2 * N:]
  xbc = f64(layer.conv(jnp.asarray(xbc, jnp.float32))[0])
  x, b, c = xbc[..., :e], xbc[..., e:e + N], xbc[..., e + N:]
  dt = np.log1p(np.exp(dt + f64(layer.dt_bias[...])))  # softplus, [B, T, H]
  a = np.exp(-np.exp(f64(layer.A_log[...])) * dt)  # [B, T, H]
  x = x.reshape(B, T, H, p)
  h = np.zeros((B, H, N, p))
  ys = []
  for t in range(T):
    h = (a[:, t, :, None, None] * h
         + b[:, t, None, :, None] * (dt[:, t, :, None] * x[:, t])[:, :, None, :])
    ys.append(np.einsum("bn,bhnp->bhp", c[:, t], h)
              + f64(layer.D[...])[:, None] * x[:, t])
  y = np.stack(ys, axis=1) * (z.reshape(B, T, H, p) / (1 + np.exp(-z.reshape(B, T, H, p))))
  y = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + layer.norm.eps)
  y = y * f64(layer.norm.scale[...])
  return y.reshape(B, T, e) @ f64(layer.out_proj.kernel[...])


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_mamba2_is_the_ssd_recurrence(impl):
  layer = Mamba2(D, n_heads=H, state_size=N, chunk_size=8, impl=impl,
                 rngs=nnx.Rngs(0))
  u = jax.random.normal(jax.random.key(1), (B, T, D))
  y, _ = layer(u)
  numerics.assert_close(y, _ssd_by_hand(layer, u), rtol=numerics.tolerance(
      "chunked", jnp.float32), what=f"mamba2 {impl}")


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_heads=3), "n_heads=3; expected a divisor of the inner width"),
    (dict(n_heads=4, state_size=0), "state_size=0; expected a positive int"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Mamba2(D, rngs=nnx.Rngs(0), **kwargs)
