"""Mamba: decoding against the parallel forward, selective_scan impls against
each other and against the layer's former path (materialised decays through
ssm_scan), the decay ranges of both eigenvalue modes, finite gradients, the
compiled memory bound, sharding metadata and constructor errors.

Compiles dominate the run time on CPU, so each test jits one function that
computes everything it compares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers import mamba
from lsm.layers.mamba import Mamba
from lsm.ops.ssm_scan import ssm_scan
from tests import numerics
from tests.layers import decoding

B, T, D, N, W = 2, 13, 16, 8, 4
E = 2 * D  # expand = 2
PREFIX = 5  # tokens prefilled through __call__ before decoding with step
INVARIANT = numerics.TOLERANCES[("invariant", "float32")]
RANGES = mamba.EIGENVALUE_RANGES


def _x(seed, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _layer(eigenvalue_range, **kw):
  return Mamba(D, state_size=N, conv_width=W, eigenvalue_range=eigenvalue_range,
               rngs=nnx.Rngs(0), **kw)


def _jit_with(layer, fn):
  """jit(fn(module, *args)) with the module's state as a traced argument, so the
  function may set Python attributes (impl) on its own copy."""
  graphdef, state = nnx.split(layer)
  run = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
  return lambda *args: run(state, *args)


def _parallel_and_decoded(m, x):
  """The parallel forward, prefill + step-by-step decoding, and the caches after
  decoding and after one prefill over all of x."""
  y, _ = m(x)
  y_dec, cache, cache_all = decoding.prefill_then_decode(m, x, PREFIX)
  return y, y_dec, cache, cache_all


@pytest.mark.parametrize("eigenvalue_range", RANGES)
def test_decode_matches_parallel(eigenvalue_range):
  layer = _layer(eigenvalue_range)
  y, y_dec, cache, cache_all = _jit_with(layer, _parallel_and_decoded)(_x(1))
  assert y.dtype == y_dec.dtype == jnp.float32
  assert cache["conv"].shape == (B, W - 1, E)
  assert cache["h"].shape == (B, E, N) and cache["h"].dtype == jnp.float32
  numerics.assert_close(y_dec, y, rtol=INVARIANT, what="decode")
  for name in ("conv", "h"):
    numerics.assert_close(cache[name], cache_all[name], rtol=INVARIANT, what=name)


@pytest.mark.parametrize("eigenvalue_range", RANGES)
def test_impls_agree(eigenvalue_range):
  layer = _layer(eigenvalue_range)

  def both(m, x, cache):
    out = []
    for impl in ("reference", "chunked"):
      m.impl = impl
      y, c = m(x, cache)
      out.append((y, c["h"]))
    return out

  cache = layer.init_cache(B, T)
  cache["h"] = jax.random.normal(jax.random.key(3), (B, E, N))
  cache["conv"] = jax.random.normal(jax.random.key(4), (B, W - 1, E))
  (y_r, h_r), (y_c, h_c) = _jit_with(layer, both)(_x(2), cache)
  rtol = numerics.tolerance("chunked", jnp.float32)
  numerics.assert_close(y_c, y_r, rtol=rtol, what="y")
  numerics.assert_close(h_c, h_r, rtol=rtol, what="h")


def _materialised(m, u, h0):
  """The layer as it was before selective_scan: decays and inputs formed as
  [B, T, E, N] arrays, the states from lsm.ops.ssm_scan (reference), the
  readout h_t C_t + D x_t, then the gate and out_proj."""
  x, z, _ = m._gate_and_input(u, None)
  x32 = x.astype(jnp.float32)
  dt = jax.nn.softplus(x32 @ m.dt_down[...] @ m.dt_up[...] + m.dt_bias[...])
  bc = jnp.einsum("bte,ekn->btkn", x32, m.bc_proj[...])
  a = jnp.exp(dt[..., None] * -jnp.exp(m.a_log[...]))
  if m.eigenvalue_range == "signed":
    a = 2 * a - 1
  b = (dt * x32)[..., None] * bc[:, :, None, 0]
  h, h_t = ssm_scan(a, b, h0=h0, impl="reference")
  y = jnp.einsum("bten,btn->bte", h, bc[:, :, 1]) + m.d[...] * x32
  y = y * jax.nn.silu(z.astype(jnp.float32))
  return (y @ m.out_proj[...]).astype(u.dtype), h_t


@pytest.mark.parametrize("eigenvalue_range", RANGES)
def test_matches_the_materialised_ssm_scan_path(eigenvalue_range):
  """Same outputs, final state and parameter gradients as the former path
  (chunk 4, so T = 13 spans several chunks and a partial one)."""
  layer = _layer(eigenvalue_range, chunk_size=4, impl="chunked")
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  h0 = jax.random.normal(jax.random.key(7), (B, E, N))
  w = jax.random.normal(jax.random.key(8), (B, T, D))

  def new_path(m, u):  # the layer's call from state h0 (empty conv window)
    y, cache = m(u, {"conv": m.conv.init_cache(u.shape[0]), "h": h0})
    return y, cache["h"]

  def both(params, u):
    out = []
    for f in (new_path, lambda m, u: _materialised(m, u, h0)):
      def loss(p):
        y, h_t = f(nnx.merge(graphdef, p, rest), u)
        return jnp.sum(w * y) + jnp.sum(jnp.sin(h_t)), (y, h_t)
      (_, (y, h_t)), g = jax.value_and_grad(loss, has_aux=True)(params)
      out.append((y, h_t, g))
    return out

  (y, h_t, g), (y_e, h_e, g_e) = jax.jit(both)(params, _x(9))
  rtol = numerics.tolerance("chunked", jnp.float32)
  numerics.assert_close(y, y_e, rtol=rtol, what="y")
  numerics.assert_close(h_t, h_e, rtol=rtol, what="h_T")
  numerics.assert_pytrees_close(g, g_e, rtol=rtol, what="grad ")


def test_memory_does_not_hold_the_states():
  """Compiled fwd+bwd temp memory of the layer at T = 4096 (E = 32, N = 64):
  below 3/4 of ONE [B, T, E, N] float32 array; with the reference impl (which
  keeps every state) above two, so the bound is one materialising breaks."""
  Tm, Nm = 4096, 64
  states = Tm * E * Nm * 4

  def temp(impl):
    m = Mamba(D, state_size=Nm, impl=impl, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    f = jax.grad(lambda p, u: jnp.sum(nnx.merge(graphdef, p, rest)(u)[0] ** 2))
    u = jax.ShapeDtypeStruct((1, Tm, D), jnp.float32)
    return jax.jit(f).lower(params, u).compile().memory_analysis(
        ).temp_size_in_bytes

  chunked, reference = temp("chunked"), temp("reference")
  assert chunked < 0.75 * states, (chunked, states)
  assert reference > 2 * states, (reference, states)


@pytest.mark.parametrize("eigenvalue_range", RANGES)
def test_decay_range_and_finite_gradients(eigenvalue_range):
  layer = _layer(eigenvalue_range)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  w = jax.random.normal(jax.random.key(5), (B, T, D))

  def decays_and_grads(params, x):
    def loss(p):
      return jnp.sum(w * nnx.merge(graphdef, p, rest)(x)[0])
    return nnx.merge(graphdef, params, rest).decays(x), jax.grad(loss)(params)

  # Inputs of scale 3 push some dt, hence some dt * |A|, past log 2, where the
  # signed decay 2 exp(dt A) - 1 turns negative.
  a, grads = jax.jit(decays_and_grads)(params, _x(6, scale=3.0))
  assert a.shape == (B, T, E, N) and a.dtype == jnp.float32
  if eigenvalue_range == "signed":
    assert -1 <= a.min() < 0, float(a.min())
    assert a.max() <= 1
  else:
    assert 0 <= a.min() and a.max() <= 1, (float(a.min()), float(a.max()))
  flat = nnx.to_flat_state(grads)
  assert len(flat) == len(nnx.to_flat_state(params))
  for path, g in flat:
    assert np.all(np.isfinite(g[...])), path
    assert np.any(g[...] != 0), path  # every parameter reaches the output


def test_every_param_has_sharding_metadata():
  params = nnx.to_flat_state(nnx.state(_layer("positive"), nnx.Param))
  assert params
  for path, p in params:
    names = p.get_metadata().get("out_sharding")
    assert names is not None and len(names) == p[...].ndim, (path, names)


@pytest.mark.parametrize("kw, words", [
    (dict(eigenvalue_range="negative"), ["eigenvalue_range", "positive", "signed"]),
    (dict(state_size=0), ["state_size", "positive int"]),
    (dict(expand=1.5), ["expand", "positive int"]),
    (dict(conv_width=0), ["conv_width", "positive int"]),
    (dict(chunk_size=0), ["chunk_size", "positive int"]),
    (dict(impl="cuda"), ["impl", "chunked", "reference"]),
    (dict(dt_min=0.0), ["dt_min", "dt_max"]),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_args_raise(kw, words):
  with pytest.raises(ValueError) as e:
    Mamba(D, rngs=nnx.Rngs(0), **kw)
  for w in ["Mamba", *words]:
    assert w in str(e.value), (w, str(e.value))
