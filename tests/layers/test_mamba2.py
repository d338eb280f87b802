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
from lsm.ops.gla import signed
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
  if layer.eigenvalue_range == "signed":
    a = 2 * a - 1
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


@pytest.mark.parametrize("eigenvalue_range", ["positive", "signed"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_mamba2_is_the_ssd_recurrence(impl, eigenvalue_range):
  layer = Mamba2(D, n_heads=H, state_size=N, chunk_size=8, impl=impl,
                 eigenvalue_range=eigenvalue_range, rngs=nnx.Rngs(0))
  # A in [8, 16]: with this input dt A spans about [-6, -0.01], so signed
  # decays of both signs occur (asserted below).
  layer.A_log[...] = jnp.log(jnp.linspace(8.0, 16.0, H))
  u = 3.0 * jax.random.normal(jax.random.key(1), (B, T, D))
  if eigenvalue_range == "signed":
    dt = jax.nn.softplus(layer._split(u)[2] + layer.dt_bias[...])
    a = 2 * jnp.exp(-jnp.exp(layer.A_log[...]) * dt) - 1
    assert 0.1 < float(jnp.mean(a < 0)) < 0.9, float(jnp.mean(a < 0))
  y, _ = layer(u)
  numerics.assert_close(y, _ssd_by_hand(layer, u), rtol=numerics.tolerance(
      "chunked", jnp.float32), what=f"mamba2 {impl} {eigenvalue_range}")


def test_signed_log_decay_and_parity():
  x = np.concatenate([-np.logspace(-7, 1.5, 60), [-np.log(2.0), 0.0]])
  log_mag, negative = signed.signed_log_decay(jnp.asarray(x, jnp.float32))
  a = 2 * np.exp(x) - 1  # float64
  np.testing.assert_array_equal(np.asarray(negative), a < 0)
  finite = np.abs(a) > 1e-6  # away from the zero at x = -log 2
  numerics.assert_close(log_mag[finite], np.log(np.abs(a[finite])), rtol=1e-5,
                        what="log|2 e^x - 1|")
  assert np.all(np.asarray(log_mag) >= signed.LOG_FLOOR)
  grad = jax.grad(lambda x: jnp.sum(signed.signed_log_decay(x)[0]))(
      jnp.asarray(x, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grad)))
  neg = jnp.asarray([[False, True, True, False, True]])
  np.testing.assert_array_equal(np.asarray(signed.parity(neg)),
                                [[1.0, -1.0, 1.0, 1.0, -1.0]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_heads=3), "n_heads=3; expected a divisor of the inner width"),
    (dict(n_heads=4, state_size=0), "state_size=0; expected a positive int"),
    (dict(n_heads=4, eigenvalue_range="negative"),
     "eigenvalue_range='negative'; expected one of"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Mamba2(D, rngs=nnx.Rngs(0), **kwargs)
