"""LSSL and S4D: conv mode against recurrent mode, decoding against the parallel
forward, ssm_scan impls against each other, gradients of both training paths,
the blocked convolution kernel against the whole Vandermonde product and its
compiled memory bound, the S4D-LegS init, the phase helper, sharding metadata
and constructor errors.

Compiles dominate the run time on CPU, so each test jits one function that
computes everything it compares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers import ssm
from lsm.layers.ssm import LSSL, S4D
from tests import numerics
from tests.layers import decoding

B, T, D, N = 2, 13, 16, 8
PREFIX = 5  # tokens prefilled through __call__ before decoding with step
INVARIANT = numerics.TOLERANCES[("invariant", "float32")]
CLASSES = [LSSL, S4D]


def _x(seed, t=T, d=D):
  return jax.random.normal(jax.random.key(seed), (B, t, d), jnp.float32)


def _layer(cls, **kw):
  return cls(D, state_size=N, rngs=nnx.Rngs(0), **kw)


def _jit_with(layer, fn):
  """jit(fn(module, *args)) with the module's state as a traced argument, so the
  function may set Python attributes (mode, impl) on its own copy."""
  graphdef, state = nnx.split(layer)
  run = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
  return lambda *args: run(state, *args)


def _all_paths(m, x):
  """conv, recurrent, and prefill + step-by-step decoding over x, plus the
  state after decoding and after one prefill over all of x."""
  m.mode = "conv"
  y_conv, _ = m(x)
  m.mode = "recurrent"
  y_rec, _ = m(x)
  y_dec, cache, cache_all = decoding.prefill_then_decode(m, x, PREFIX)
  return y_conv, y_rec, y_dec, cache["h"], cache_all["h"]


@pytest.mark.parametrize("cls, kw", [
    *((cls, dict(discretization=d)) for cls in CLASSES for d in ssm.DISCRETIZATIONS),
    (S4D, dict(init="inv")),
], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_conv_recurrent_and_decoding_agree(cls, kw):
  layer = _layer(cls, **kw)
  y_conv, y_rec, y_dec, h_dec, h_all = _jit_with(layer, _all_paths)(_x(1))
  assert y_conv.dtype == y_rec.dtype == y_dec.dtype == jnp.float32
  assert h_dec.shape == (B, D, N) and h_dec.dtype == jnp.float32
  name = f"{cls.__name__} {kw}"
  numerics.assert_close(y_rec, y_conv, rtol=INVARIANT, what=f"{name} recurrent")
  numerics.assert_close(y_dec, y_conv, rtol=INVARIANT, what=f"{name} decode")
  numerics.assert_close(h_dec, h_all, rtol=INVARIANT, what=f"{name} h")


def test_conv_matches_recurrent_long():
  """T = 1000 with large steps (dt up to 1): phases theta * t of hundreds of
  radians, where a plain exp(1j * theta * t) disagrees (2e-5 relative RMS)."""
  layer = S4D(4, state_size=16, dt_min=0.1, dt_max=1.0, impl="reference",
              rngs=nnx.Rngs(5))

  def both(m, x):
    m.mode = "conv"
    y_conv, _ = m(x)
    m.mode = "recurrent"
    return y_conv, m(x)[0]

  y_conv, y_rec = _jit_with(layer, both)(_x(6, t=1000, d=4))
  numerics.assert_close(y_rec, y_conv, rtol=INVARIANT, what="T=1000")


def test_rotation_matches_float64():
  theta = jax.random.uniform(jax.random.key(7), (512,), jnp.float32, -np.pi, np.pi)
  steps = jnp.array([0, 1, 2, 63, 4095, 4096, 4097, 9999, 20000], jnp.int32)
  got = jax.jit(ssm._rotation)(theta, steps)
  want = np.exp(1j * np.float64(theta)[None] * np.float64(steps)[:, None])
  for part in (np.real, np.imag):
    numerics.assert_close(part(got), part(want), rtol=INVARIANT, what="e^{i theta t}")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_conv_matches_recurrent_gradients(cls):
  """Both training paths give the same, finite, parameter gradients (this covers
  the FFT convolution's and the rotating frame's backward passes)."""
  layer = _layer(cls)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  w = jax.random.normal(jax.random.key(4), (B, T, D))

  def grads(params, x):
    out = []
    for mode in ssm.MODES:
      def loss(p, mode=mode):
        m = nnx.merge(graphdef, p, rest)
        m.mode = mode
        return jnp.sum(w * m(x)[0])
      out.append(jax.grad(loss)(params))
    return out

  g_conv, g_rec = jax.jit(grads)(params, _x(3))
  for (path, gc), (_, gr) in zip(nnx.to_flat_state(g_conv), nnx.to_flat_state(g_rec),
                                 strict=True):
    assert np.all(np.isfinite(gc[...])) and np.all(np.isfinite(gr[...])), path
    numerics.assert_close(gr[...], gc[...], rtol=INVARIANT, what=f"d{path}")


def _whole_kernel(m, length):
  """The kernel from the whole [L, H, M] Vandermonde matrix at once (the
  layer's form before it was blocked), as the expected value."""
  log_r, theta, cdb, _, _ = m._discretize()
  steps = jnp.arange(length, dtype=jnp.int32)
  return ssm._kernel_block(log_r, theta, cdb, steps)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_kernel_in_blocks_equals_the_whole_vandermonde(cls, monkeypatch):
  """Blocks of 4 steps (T = 13: three full blocks and a partial one) give the
  kernel and its parameter gradients of the unblocked product."""
  monkeypatch.setattr(ssm, "KERNEL_BLOCK", 4)
  layer = _layer(cls)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  w = jax.random.normal(jax.random.key(11), (D, T))

  def both(params):
    out = []
    for f in (lambda m: m.kernel(T), lambda m: _whole_kernel(m, T)):
      def loss(p, f=f):
        k = f(nnx.merge(graphdef, p, rest))
        return jnp.sum(w * k), k
      (_, k), g = jax.value_and_grad(loss, has_aux=True)(params)
      out.append((k, g))
    return out

  (k, g), (k_e, g_e) = jax.jit(both)(params)
  assert k.shape == (D, T)
  numerics.assert_close(k, k_e, rtol=INVARIANT, what="kernel")
  numerics.assert_pytrees_close(g, g_e, rtol=INVARIANT, what="grad ")


def test_conv_memory_does_not_hold_the_vandermonde_matrix():
  """Compiled fwd+bwd temp memory of S4D's conv mode at T = 4096 (H = 64, M =
  32) stays below half of ONE [T, H, M] complex64 Vandermonde matrix; the
  unblocked kernel (KERNEL_BLOCK >= T) needs more than two of them, so the bound
  is one that materialising breaks."""
  t, h = 4096, 64
  vand = t * h * 32 * 8

  def temp():
    m = S4D(h, state_size=64, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    f = jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0] ** 2))
    x = jax.ShapeDtypeStruct((1, t, h), jnp.float32)
    return jax.jit(f).lower(params, x).compile().memory_analysis(
        ).temp_size_in_bytes

  blocked = temp()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ssm, "KERNEL_BLOCK", t)
    unblocked = temp()
  assert blocked < 0.5 * vand, (blocked, vand)
  assert unblocked > 2 * vand, (unblocked, vand)


def test_conv_step_ffts_are_one_chain():
  """Two conv layers, forward and backward: each FFT of the compiled step
  depends on the one before (one transform per layer and direction for the
  kernel and the input together). XLA:CPU deadlocks when as many independent
  FFTs as intra-op workers run at once (jax 0.11.2, lsm/layers/ssm.py);
  separate transforms of the kernel and the input make 3 per layer and
  direction, and the kernels' transforms depend on parameters only."""
  layers = [S4D(D, state_size=N, rngs=nnx.Rngs(i)) for i in range(2)]
  graphdef, params, rest = nnx.split(nnx.List(layers), nnx.Param, ...)

  def loss(p, x):
    for m in nnx.merge(graphdef, p, rest):
      x = x + m(x)[0]
    return jnp.sum(x ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(params, _x(0)).compile().as_text()
  assert hlo.count(" fft(") == 2 * 2 * 2, hlo.count(" fft(")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_impls_agree(cls):
  layer = _layer(cls, mode="recurrent")

  def both(m, x, h0):
    out = []
    for impl in ("reference", "chunked"):
      m.impl = impl
      y, cache = m(x, {"h": h0})
      out.append((y, cache["h"]))
    return out

  h0 = jax.random.normal(jax.random.key(9), (B, D, N))
  (y_r, h_r), (y_c, h_c) = _jit_with(layer, both)(_x(8), h0)
  rtol = numerics.tolerance("chunked", jnp.float32)
  numerics.assert_close(y_c, y_r, rtol=rtol, what="y")
  numerics.assert_close(h_c, h_r, rtol=rtol, what="h")


def test_lssl_init_is_legs_normal_part():
  """The kept modes (one per conjugate pair) reproduce the Markov parameters
  A_normal^k B of LegS's normal part, A_normal = A_LegS + P P^T, read out by
  every C = e_j."""
  n = np.arange(N, dtype=np.float64)
  q = np.sqrt(2 * n + 1)
  a_legs = -np.tril(np.outer(q, q), -1) - np.diag(n + 1)
  a_normal = a_legs + np.outer(np.sqrt(n + 0.5), np.sqrt(n + 0.5))
  lam, b = LSSL(1, state_size=N, rngs=nnx.Rngs(0))._init_ab(N)
  assert lam.shape == b.shape == (N // 2,)
  np.testing.assert_allclose(lam.real, -0.5)
  assert np.all(lam.imag > 0)
  # The eigenvectors of the kept modes, to map the diagonal state back.
  omega, v = np.linalg.eigh(-1j * (a_normal + 0.5 * np.eye(N)))
  v = v[:, np.argsort(omega)[N // 2:]]
  for k in range(4):
    want = np.linalg.matrix_power(a_normal, k) @ q
    got = 2 * np.real(v @ (lam ** k * b))
    tol = numerics.TOLERANCES[("init", "float64")]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


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
  with pytest.raises(ValueError,
                     match=r"S4D: init='legs' is not one of \['inv', 'lin'\]"):
    S4D(D, init="legs", rngs=nnx.Rngs(0))
