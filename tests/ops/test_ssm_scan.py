"""Diagonal SSM scan: every impl against the float32 reference, and the
recurrence's invariants (split runs, step-by-step decoding)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lsm.ops import _dispatch
from lsm.ops.ssm_scan import api, chunked, ssm_scan, ssm_scan_step
from tests import numerics

FAST_IMPLS = ["chunked"]
ALL_IMPLS = ["reference", *FAST_IMPLS]
# [B, T, ...]: a single token, an odd length that is no power of two, a [B, T, D]
# linear RNN and a [B, T, H, K, V] per-head SSM state.
SHAPES = [(2, 1, 4), (2, 63, 3), (2, 16, 5), (1, 9, 2, 3, 2)]
DTYPES = [jnp.float32, jnp.bfloat16]


def _inputs(shape, dtype, seed=0):
  """a in [-1, 1] with exact 0, -1 and 1 entries; b, h0 and cotangents normal.

  a and b are in ``dtype`` (0, +-1 are exact in bfloat16); h0 and the final-state
  cotangent are float32 by contract; dy is in b's dtype, as y is.
  """
  ka, ku, kb, kh, ky, kt = jax.random.split(jax.random.key(seed), 6)
  state_shape = (shape[0], *shape[2:])
  a = jax.random.uniform(ka, shape, minval=-1.0, maxval=1.0)
  u = jax.random.uniform(ku, shape)
  a = jnp.where(u < 0.1, 0.0, jnp.where(u < 0.2, -1.0, jnp.where(u < 0.25, 1.0, a)))
  b = jax.random.normal(kb, shape)
  h0 = jax.random.normal(kh, state_shape)
  dy = jax.random.normal(ky, shape)
  dh = jax.random.normal(kt, state_shape)
  return a.astype(dtype), b.astype(dtype), h0, dy.astype(dtype), dh


@functools.cache
def _forward(impl):
  return jax.jit(lambda a, b, h0: ssm_scan(a, b, h0=h0, impl=impl))


@functools.cache
def _forward_backward(impl):
  """(y, h_T, da, db, dh0) for given cotangents (dy, dh) on (y, h_T)."""
  def run(a, b, h0, dy, dh):
    (y, h_t), vjp = jax.vjp(lambda a, b, h0: ssm_scan(a, b, h0=h0, impl=impl),
                            a, b, h0)
    return (y, h_t, *vjp((dy, dh)))
  return jax.jit(run)


_step = jax.jit(ssm_scan_step)
_NAMES = ("y", "h_t", "da", "db", "dh0")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_matches_reference(impl, shape, dtype):
  a, b, h0, dy, dh = _inputs(shape, dtype)
  got = _forward_backward(impl)(a, b, h0, dy, dh)
  # The expected values: the reference on the same values upcast to float32.
  f32 = jnp.float32
  want = _forward_backward("reference")(a.astype(f32), b.astype(f32), h0,
                                        dy.astype(f32), dh)
  assert [x.dtype for x in got] == [b.dtype, f32, a.dtype, b.dtype, f32]
  numerics.assert_outputs_close(got, want, impl=impl, dtype=dtype, names=_NAMES,
                                what=impl)


@functools.cache
def _form_forward_backward(form):
  """``_forward_backward("chunked")`` with one form forced, whatever the
  platform (the other is what a GPU or TPU runs)."""
  def run(a, b, h0, dy, dh):
    (y, h_t), vjp = jax.vjp(
        lambda a, b, h0: chunked.ssm_scan(a, b, h0=h0, form=form), a, b, h0)
    return (y, h_t, *vjp((dy, dh)))
  return jax.jit(run)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", chunked.FORMS)
def test_each_chunked_form_matches_reference(form, shape, dtype):
  a, b, h0, dy, dh = _inputs(shape, dtype)
  got = _form_forward_backward(form)(a, b, h0, dy, dh)
  f32 = jnp.float32
  want = _forward_backward("reference")(a.astype(f32), b.astype(f32), h0,
                                        dy.astype(f32), dh)
  assert [x.dtype for x in got] == [b.dtype, f32, a.dtype, b.dtype, f32]
  numerics.assert_outputs_close(got, want, impl="chunked", dtype=dtype,
                                names=_NAMES, what=form)


def test_chunked_picks_the_sequential_form_on_cpu():
  """On CPU the lowered chunked scan is the loop (a while op), with no
  associative scan left in it; forcing "associative" gives no loop."""
  a, b, h0, dy, dh = _inputs((2, 16, 3), jnp.float32)
  if _dispatch.platform() != "cpu":
    pytest.skip("checks the CPU choice")
  hlo = lambda f: f.lower(a, b, h0, dy, dh).as_text()
  # One loop for the forward states, one for the backward adjoint.
  assert hlo(_forward_backward("chunked")).count("stablehlo.while") == 2
  assert "stablehlo.while" not in hlo(_form_forward_backward("associative"))


def test_unknown_form_raises():
  x = jnp.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="form='loop'"):
    chunked.ssm_scan(x, x, h0=x[:, 0], form="loop")


def test_reference_matches_numpy_loop():
  """The definition itself, against float64 numpy, gradients included (by hand:
  the adjoint recurrence written as a plain loop)."""
  a, b, h0, dy, dh = (np.asarray(x, np.float64) for x in _inputs((2, 7, 3),
                                                                 jnp.float32))
  T = a.shape[1]
  h, hs = h0, []
  for t in range(T):
    h = a[:, t] * h + b[:, t]
    hs.append(h)
  y = np.stack(hs, axis=1)
  lam, da, db = dh, np.zeros_like(a), np.zeros_like(b)
  for t in reversed(range(T)):
    lam = lam + dy[:, t]
    db[:, t] = lam
    da[:, t] = lam * (hs[t - 1] if t else h0)
    lam = a[:, t] * lam
  got = _forward_backward("reference")(*_inputs((2, 7, 3), jnp.float32))
  numerics.assert_trees_close(got, (y, h, da, db, lam),
                              rtol=numerics.tolerance("invariant", jnp.float32),
                              names=[f"reference {n}" for n in _NAMES])


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_split_equals_one_run(impl):
  a, b, h0, _, _ = _inputs((2, 20, 3), jnp.float32, seed=1)
  f = _forward(impl)
  y, h_t = f(a, b, h0)
  rtol = numerics.tolerance("invariant", jnp.float32)
  for t in (1, 13):
    y1, h_mid = f(a[:, :t], b[:, :t], h0)
    y2, h_end = f(a[:, t:], b[:, t:], h_mid)
    numerics.assert_close(jnp.concatenate([y1, y2], axis=1), y, rtol=rtol,
                          what=f"{impl} y split at {t}")
    numerics.assert_close(h_end, h_t, rtol=rtol, what=f"{impl} h_T split at {t}")


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_step_loop_equals_forward(impl):
  a, b, h0, _, _ = _inputs((2, 12, 2, 3), jnp.float32, seed=2)
  y, h_t = _forward(impl)(a, b, h0)
  h, ys = h0, []
  for t in range(a.shape[1]):
    y_t, h = _step(a[:, t], b[:, t], h)
    ys.append(y_t)
  rtol = numerics.tolerance("invariant", jnp.float32)
  numerics.assert_close(jnp.stack(ys, axis=1), y, rtol=rtol, what=f"{impl} y")
  numerics.assert_close(h, h_t, rtol=rtol, what=f"{impl} h_T")


def test_auto_resolves_to_chunked_on_cpu():
  if _dispatch.platform() != "cpu":
    pytest.skip("checks the CPU choice")
  assert _dispatch.resolve_impl("auto", supported=api._IMPLS,
                                op="ssm_scan") == "chunked"


def test_unknown_impl_raises():
  x = jnp.zeros((1, 2, 3))
  with pytest.raises(ValueError, match="impl='bogus'"):
    ssm_scan(x, x, impl="bogus")


_X = jnp.zeros((2, 5, 3), jnp.float32)
_H = jnp.zeros((2, 3), jnp.float32)


@pytest.mark.parametrize("call, match", [
    (lambda: ssm_scan(_X[:, :4], _X), r"ssm_scan: a has shape \(2, 4, 3\)"),
    (lambda: ssm_scan(_X[..., None], _X), "a has shape"),
    (lambda: ssm_scan(_X, _X, h0=_H[:1]), r"h0 has shape \(1, 3\)"),
    (lambda: ssm_scan(_X, _X, h0=_X), "h0 has shape"),
    (lambda: ssm_scan(_X, _X, h0=_H.astype(jnp.float16)), "h0 has dtype float16"),
    (lambda: ssm_scan(_X, _X.astype(jnp.int32)), "b has dtype int32"),
    (lambda: ssm_scan(_X.astype(jnp.int32), _X), "a has dtype int32"),
    (lambda: ssm_scan(_X[0, 0], _X[0, 0]), "b has shape"),
    (lambda: ssm_scan_step(_H[:1], _H, _H), "ssm_scan_step: a_t has shape"),
    (lambda: ssm_scan_step(_H, _H, _H[:, :2]), "h has shape"),
    (lambda: ssm_scan_step(_H, _H, _H.astype(jnp.bfloat16)), "h has dtype"),
], ids=["a_time", "a_rank", "h0_batch", "h0_rank", "h0_f16", "b_int", "a_int",
        "b_rank1", "step_a_t", "step_h", "step_h_bf16"])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@settings(max_examples=3, deadline=None)  # each example compiles anew
@given(T=st.integers(1, 40), D=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_property_chunked_matches_reference(T, D, seed):
  a, b, h0, _, _ = _inputs((2, T, D), jnp.float32, seed=seed)
  got = _forward("chunked")(a, b, h0)
  want = _forward("reference")(a, b, h0)
  numerics.assert_outputs_close(got, want, impl="chunked", dtype=jnp.float32,
                                names=("y", "h_t"))
