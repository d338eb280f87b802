"""LSSL and S4D: conv mode against recurrent mode, decoding against the parallel
forward, ssm_scan impls against each other, the S4D-LegS init, the phase helper,
parameter sharding metadata and constructor errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers import ssm
from lsm.layers.ssm import LSSL, S4D
from tests import numerics

B, T, D, N = 2, 13, 16, 8
PREFIX = 5  # tokens prefilled through __call__ before decoding with step
INVARIANT = numerics.TOLERANCES[("invariant", "float32")]
CLASSES = [LSSL, S4D]


def _x(seed=1, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D), jnp.float32)


def _layer(cls, **kw):
  return cls(D, state_size=N, rngs=nnx.Rngs(0), **kw)


def _forward(layer, x, cache=None):
  return layer(x, cache)


def _forward_with_mode(layer, mode, x):
  layer.mode = mode
  return _forward(layer, x)[0]


def _prefill_then_decode(layer, x, prefix):
  """__call__ over x[:, :prefix] from an empty cache, then step per token."""
  y, cache = _forward(layer, x[:, :prefix], layer.init_cache(x.shape[0], x.shape[1]))
  ys = [y]
  for t in range(prefix, x.shape[1]):
    y_t, cache = layer.step(x[:, t], cache)
    ys.append(y_t[:, None])
  return jnp.concatenate(ys, axis=1), cache


@pytest.mark.parametrize("mode", ssm.MODES)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_decode_matches_parallel(cls, mode):
  layer = _layer(cls, mode=mode)
  x = _x()
  y, _ = _forward(layer, x)
  y_dec, cache = _prefill_then_decode(layer, x, PREFIX)
  assert y_dec.dtype == y.dtype == jnp.float32
  assert cache["h"].shape == (B, D, N) and cache["h"].dtype == jnp.float32
  numerics.assert_close(y_dec, y, rtol=INVARIANT, what=f"{cls.__name__} decode")
  # The state after decoding is the state after one prefill over everything.
  _, cache_all = _forward(layer, x, layer.init_cache(B, T))
  numerics.assert_close(cache["h"], cache_all["h"], rtol=INVARIANT, what="h")


@pytest.mark.parametrize("kw", [dict(discretization="zoh"),
                                dict(discretization="bilinear"),
                                dict(discretization="zoh", init="inv")], ids=str)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_conv_matches_recurrent(cls, kw):
  if "init" in kw and cls is not S4D:
    pytest.skip("init is an S4D option")
  layer = _layer(cls, **kw)
  x = _x(seed=2)
  numerics.assert_close(_forward_with_mode(layer, "recurrent", x),
                        _forward_with_mode(layer, "conv", x), rtol=INVARIANT,
                        what=f"{cls.__name__} {kw}")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_conv_matches_recurrent_gradients(cls):
  """Both training paths give the same parameter gradients (this covers the
  FFT convolution's and the rotating frame's backward passes)."""
  layer = _layer(cls)
  x = _x(seed=3)
  w = jax.random.normal(jax.random.key(4), (B, T, D))

  def grads(mode):
    layer.mode = mode
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p):
      return jnp.sum(w * nnx.merge(graphdef, p, rest)(x)[0])

    return jax.grad(loss)(params)

  g_conv, g_rec = nnx.to_flat_state(grads("conv")), nnx.to_flat_state(grads("recurrent"))
  for (path, gc), (_, gr) in zip(g_conv, g_rec, strict=True):
    assert np.all(np.isfinite(gc[...])), path
    numerics.assert_close(gr[...], gc[...], rtol=INVARIANT, what=f"d{path}")


def test_conv_matches_recurrent_long():
  """T = 600 with large steps (dt up to 1): phases theta * t of hundreds of
  radians, where a plain exp(1j * theta * t) would already disagree."""
  layer = S4D(4, state_size=16, dt_min=0.1, dt_max=1.0, rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.key(6), (1, 600, 4))
  numerics.assert_close(_forward_with_mode(layer, "recurrent", x),
                        _forward_with_mode(layer, "conv", x), rtol=INVARIANT,
                        what="T=600")


def test_rotation_matches_float64():
  theta = jax.random.uniform(jax.random.key(7), (512,), jnp.float32, -np.pi, np.pi)
  steps = jnp.array([0, 1, 2, 63, 4095, 4096, 4097, 9999, 20000], jnp.int32)
  got = ssm._rotation(theta, steps)
  want = np.exp(1j * np.float64(theta)[None] * np.float64(steps)[:, None])
  for part in (np.real, np.imag):
    numerics.assert_close(part(got), part(want), rtol=INVARIANT, what="e^{i theta t}")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_impls_agree(cls):
  layer = _layer(cls, mode="recurrent")
  x = _x(seed=8)
  h0 = jax.random.normal(jax.random.key(9), (B, D, N))
  out = {}
  for impl in ("reference", "chunked"):
    layer.impl = impl
    out[impl] = _forward(layer, x, {"h": h0})
  (y_c, c_c), (y_r, c_r) = out["chunked"], out["reference"]
  rtol = numerics.tolerance("chunked", jnp.float32)
  numerics.assert_close(y_c, y_r, rtol=rtol, what="y")
  numerics.assert_close(c_c["h"], c_r["h"], rtol=rtol, what="h")


def test_lssl_init_is_legs_normal_part():
  """The kept modes (one per conjugate pair) reproduce the Markov parameters
  C A_normal^k B of LegS's normal part, A_normal = A_LegS + P P^T."""
  n = np.arange(N, dtype=np.float64)
  q = np.sqrt(2 * n + 1)
  a_legs = -np.tril(np.outer(q, q), -1) - np.diag(n + 1)
  a_normal = a_legs + np.outer(np.sqrt(n + 0.5), np.sqrt(n + 0.5))
  lam, b = LSSL(1, state_size=N, rngs=nnx.Rngs(0))._init_ab(N)
  np.testing.assert_allclose(lam.real, -0.5)
  assert np.all(lam.imag > 0) and lam.shape == (N // 2,)
  # Markov parameters of the real system against the diagonal one, with C = e_j.
  _, v = np.linalg.eigh(-1j * (a_normal + 0.5 * np.eye(N)))
  v = v[:, np.argsort(np.linalg.eigvalsh(-1j * (a_normal + 0.5 * np.eye(N))))[N // 2:]]
  for k in range(4):
    want = np.linalg.matrix_power(a_normal, k) @ q  # [N]: every C = e_j at once
    got = 2 * np.real(v @ (lam ** k * b))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_param_has_sharding_metadata(cls):
  params = nnx.to_flat_state(nnx.state(_layer(cls), nnx.Param))
  assert params
  for path, p in params:
    names = p.get_metadata().get("out_sharding")
    assert names is not None and len(names) == p[...].ndim, (path, names)


@pytest.mark.parametrize("kw, words", [
    (dict(discretization="euler"), ["discretization", "bilinear", "zoh"]),
    (dict(mode="fft"), ["mode", "conv", "recurrent"]),
    (dict(state_size=7), ["state_size", "even"]),
    (dict(impl="cuda"), ["impl", "chunked", "reference"]),
    (dict(dt_min=0.1, dt_max=0.01), ["dt_min", "dt_max"]),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bad_args_raise(cls, kw, words):
  with pytest.raises(ValueError) as e:
    cls(D, rngs=nnx.Rngs(0), **kw)
  for w in [cls.__name__, *words]:
    assert w in str(e.value), (w, str(e.value))


def test_s4d_bad_init_raises():
  with pytest.raises(ValueError, match=r"S4D: init='legs' is not one of \['inv', 'lin'\]"):
    S4D(D, init="legs", rngs=nnx.Rngs(0))
