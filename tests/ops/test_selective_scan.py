"""Selective scan: the chunked impl (each chunk-body form) against the float32
reference on outputs, final states and the gradients of every input; the
reference against a float64 numpy loop and against the old path (decays and
inputs materialised, ``ssm_scan``, readout); split runs, chunk sizes, step-by-step
decoding, packed documents, bad inputs, and the compiled memory bound."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.ops import _dispatch
from lsm.ops.selective_scan import api, chunked, selective_scan, selective_scan_step
from lsm.ops.ssm_scan import ssm_scan
from tests import numerics
from tests.ops import test_segments

NAMES = ("x", "dt", "A", "B", "C", "D", "h0")
RANGES = api.EIGENVALUE_RANGES
# (B, T, E, N, G, chunk): T not a multiple of the chunk, T shorter than a chunk
# (a single token), grouped B / C (G = 2) with E != N. Chunk 1 and 7:
# test_chunk_size_does_not_change_the_result.
SHAPES = [(2, 37, 6, 5, None, 16), (2, 1, 4, 3, None, 16), (1, 9, 4, 8, 2, 4)]


def _inputs(Bsz, T, E, N, G, dtype=jnp.float32, seed=0):
  """Primals (x, dt, A, B, C, D, h0) by name and cotangents (dy, dh).

  dt: softplus of a normal, with some exact zeros (a = 1) and some 200s, where
  exp(dt A) underflows to exactly 0 (signed: exactly -1). A <= -0.5. x, dt, B,
  C and dy in ``dtype``; A, D, h0 and dh float32 (parameters and states)."""
  k = jax.random.split(jax.random.key(seed), 10)
  n = lambda i, s: jax.random.normal(k[i], s, jnp.float32)  # noqa: E731
  bc = (Bsz, T, N) if G is None else (Bsz, T, G, N)
  u = jax.random.uniform(k[7], (Bsz, T, E))
  dt = jax.nn.softplus(n(1, (Bsz, T, E)) - 1.0)
  dt = jnp.where(u < 0.1, 0.0, jnp.where(u < 0.2, 200.0, dt))
  low = lambda v: v.astype(dtype)  # noqa: E731
  x = {"x": low(n(0, (Bsz, T, E))), "dt": low(dt),
       "A": -0.5 - jnp.exp(n(2, (E, N))), "B": low(n(3, bc)), "C": low(n(4, bc)),
       "D": n(5, (E,)), "h0": n(6, (Bsz, E, N))}
  cts = (low(n(8, (Bsz, T, E))), n(9, (Bsz, E, N)))
  return x, cts


@functools.cache
def _runner(impl, eigenvalue_range, chunk_size=16, form=None):
  """jit(primals dict, cotangents) -> (y, h_T, *grads in NAMES order)."""
  def f(x):
    if form is not None:
      B, C = x["B"], x["C"]
      if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
      return chunked.selective_scan(
          x["x"], x["dt"], x["A"], B, C, D=x["D"], h0=x["h0"],
          chunk_size=chunk_size, eigenvalue_range=eigenvalue_range, form=form)
    return selective_scan(x["x"], x["dt"], x["A"], x["B"], x["C"], D=x["D"],
                          h0=x["h0"], chunk_size=chunk_size, impl=impl,
                          eigenvalue_range=eigenvalue_range)

  def run(x, cts):
    (y, h_t), pull = jax.vjp(f, x)
    g = pull(cts)[0]
    return (y, h_t, *(g[n] for n in NAMES))
  return jax.jit(run)


def _as_f32(x, cts):
  return ({n: v.astype(jnp.float32) for n, v in x.items()},
          tuple(c.astype(jnp.float32) for c in cts))


def _check(got, want, impl, dtype, what):
  """Each of (y, h_t, *grads) against its own row of (impl, dtype, output)."""
  numerics.assert_outputs_close(got, want, impl=impl, dtype=dtype, what=what,
                                names=("y", "h_t", *(f"d{n}" for n in NAMES)))


@pytest.mark.parametrize("eigenvalue_range", RANGES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", chunked.FORMS)
def test_chunked_forms_match_reference(form, shape, eigenvalue_range):
  *dims, chunk = shape
  x, cts = _inputs(*dims)
  got = _runner("chunked", eigenvalue_range, chunk, form)(x, cts)
  want = _runner("reference", eigenvalue_range)(x, cts)
  _check(got, want, "chunked", jnp.float32, f"{form} {eigenvalue_range}")


@pytest.mark.parametrize("eigenvalue_range", RANGES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=lambda d: jnp.dtype(d).name)
def test_chunked_matches_reference_dtypes(dtype, eigenvalue_range):
  """The public op (the platform's form) in float32 and bfloat16: y and the
  gradients come back in the input dtypes, the state float32."""
  x, cts = _inputs(2, 37, 6, 5, None, dtype, seed=1)
  got = _runner("chunked", eigenvalue_range)(x, cts)
  want = _runner("reference", eigenvalue_range)(*_as_f32(x, cts))
  assert [g.dtype for g in got] == [x["x"].dtype, jnp.float32,
                                    *(x[n].dtype for n in NAMES)]
  _check(got, want, "chunked", dtype,
         f"{jnp.dtype(dtype).name} {eigenvalue_range}")


def test_zero_and_unit_decays_occur():
  """The inputs above hold exact a = 0 ("positive"), a = -1 ("signed") and a =
  1 (dt = 0), so the comparisons cover them."""
  x, _ = _inputs(2, 37, 6, 5, None)
  a = jnp.exp(x["dt"][..., None] * x["A"])
  assert jnp.any(a == 0) and jnp.any(a == 1)
  assert jnp.any(2 * a - 1 == -1)


def test_reference_matches_numpy_loop():
  """The definition, in float64 numpy, grouped B / C and signed decays."""
  x, _ = _inputs(1, 9, 4, 8, 2)
  got = _runner("reference", "signed")(x, _inputs(1, 9, 4, 8, 2)[1])[:2]
  v = {n: np.asarray(a, np.float64) for n, a in x.items()}
  E, G = v["A"].shape[0], v["B"].shape[2]
  g = np.arange(E) // (E // G)
  h, ys = v["h0"], []
  for t in range(v["x"].shape[1]):
    a = 2 * np.exp(v["dt"][:, t, :, None] * v["A"]) - 1
    h = a * h + (v["dt"][:, t] * v["x"][:, t])[..., None] * v["B"][:, t][:, g]
    ys.append(np.sum(h * v["C"][:, t][:, g], -1) + v["D"] * v["x"][:, t])
  numerics.assert_trees_close(got, (np.stack(ys, 1), h),
                              rtol=numerics.tolerance("invariant", jnp.float32),
                              names=("y", "h_T"))


@pytest.mark.parametrize("eigenvalue_range", RANGES)
def test_reference_equals_the_ssm_scan_path(eigenvalue_range):
  """What lsm.layers.mamba computed before this op: decays and inputs
  materialised as [B, T, E, N], lsm.ops.ssm_scan, readout with C; outputs and
  every gradient."""
  x, cts = _inputs(2, 11, 4, 3, None, seed=2)

  def old(x):
    a = jnp.exp(x["dt"][..., None] * x["A"])
    if eigenvalue_range == "signed":
      a = 2 * a - 1
    b = (x["dt"] * x["x"])[..., None] * x["B"][:, :, None]
    h, h_t = ssm_scan(a, b, h0=x["h0"], impl="reference")
    y = jnp.einsum("bten,btn->bte", h, x["C"], precision="highest")
    return y + x["D"] * x["x"], h_t

  @jax.jit
  def run(x, cts):
    (y, h_t), pull = jax.vjp(old, x)
    g = pull(cts)[0]
    return (y, h_t, *(g[n] for n in NAMES))

  _check(_runner("reference", eigenvalue_range)(x, cts), run(x, cts),
         "invariant", jnp.float32, "reference vs ssm_scan")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_split_equals_one_run(impl):
  x, _ = _inputs(2, 20, 4, 3, None, seed=3)
  f = jax.jit(lambda x, h0: selective_scan(
      x["x"], x["dt"], x["A"], x["B"], x["C"], D=x["D"], h0=h0, impl=impl,
      chunk_size=8, eigenvalue_range="signed"))
  def cut(lo, hi):
    return {n: (v[:, lo:hi] if v.ndim == 3 and n != "h0" else v)
            for n, v in x.items()}

  y, h_t = f(x, x["h0"])
  rtol = numerics.tolerance("invariant", jnp.float32)
  for t in (1, 13):
    y1, h_mid = f(cut(0, t), x["h0"])
    y2, h_end = f(cut(t, None), h_mid)
    numerics.assert_close(jnp.concatenate([y1, y2], axis=1), y, rtol=rtol,
                          what=f"{impl} y split at {t}")
    numerics.assert_close(h_end, h_t, rtol=rtol, what=f"{impl} h_T split at {t}")


def test_chunk_size_does_not_change_the_result():
  x, cts = _inputs(2, 37, 6, 5, None, seed=4)
  want = _runner("chunked", "positive", 16)(x, cts)
  for chunk in (1, 7, 64):
    _check(_runner("chunked", "positive", chunk)(x, cts), want,
           "invariant", jnp.float32, f"chunk {chunk}")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_step_loop_equals_forward(impl):
  x, _ = _inputs(2, 12, 4, 3, 2, seed=5)
  y, h_t = selective_scan(x["x"], x["dt"], x["A"], x["B"], x["C"], D=x["D"],
                          h0=x["h0"], impl=impl, chunk_size=5,
                          eigenvalue_range="signed")
  step = jax.jit(functools.partial(selective_scan_step, eigenvalue_range="signed"))
  h, ys = x["h0"], []
  for t in range(x["x"].shape[1]):
    y_t, h = step(x["x"][:, t], x["dt"][:, t], x["A"], x["B"][:, t],
                  x["C"][:, t], h, D=x["D"])
    ys.append(y_t)
  rtol = numerics.tolerance("invariant", jnp.float32)
  numerics.assert_close(jnp.stack(ys, axis=1), y, rtol=rtol, what=f"{impl} y")
  numerics.assert_close(h, h_t, rtol=rtol, what=f"{impl} h_T")


# Packed documents: test_segments.py's rows (T = 47, documents of 1 to 21
# tokens, starts at and inside chunk edges of 16), each document run alone by
# the reference as the expected value.
_SEG_T, _SEG_B = test_segments.T, test_segments.B


def _seg_inputs(dtype):
  x, _ = _inputs(_SEG_B, _SEG_T, 4, 3, None, dtype, seed=6)
  k1, k2 = jax.random.split(jax.random.key(7))
  cts = (jax.random.normal(k1, (_SEG_B, _SEG_T, 4)).astype(dtype),
         jax.random.normal(k2, (_SEG_B, 4, 3)))
  return x, cts


def _separately(x, eigenvalue_range):
  outs, finals = [], []
  for row, lengths in enumerate(test_segments.LENGTHS):
    start, pieces = 0, []
    for i, n in enumerate(lengths):
      doc = {k: (v[row:row + 1] if k in ("h0",) else v if k in ("A", "D") else
                 v[row:row + 1, start:start + n]) for k, v in x.items()}
      h0 = doc["h0"] if i == 0 else jnp.zeros_like(doc["h0"])
      y, h_t = selective_scan(doc["x"], doc["dt"], doc["A"], doc["B"], doc["C"],
                              D=doc["D"], h0=h0, impl="reference",
                              eigenvalue_range=eigenvalue_range)
      pieces.append(y)
      start += n
    outs.append(jnp.concatenate(pieces, axis=1))
    finals.append(h_t)
  return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)


def _grads(f, x, cts):
  (y, h_t), pull = jax.vjp(f, x)
  g = pull(cts)[0]
  return (y, h_t, *(g[n] for n in NAMES))


@functools.cache
def _separately_runner(eigenvalue_range):
  return jax.jit(lambda x, c: _grads(
      lambda x: _separately(x, eigenvalue_range), x, c))


@pytest.mark.parametrize("impl, dtype, eigenvalue_range", [
    ("reference", "float32", "signed"), ("chunked", "float32", "positive"),
    ("chunked", "bfloat16", "signed")])
def test_packed_row_equals_documents_run_alone(impl, dtype, eigenvalue_range):
  dt_ = jnp.dtype(dtype)
  x, cts = _seg_inputs(dt_)
  ids = test_segments._segment_ids()

  def packed(x):
    return selective_scan(x["x"], x["dt"], x["A"], x["B"], x["C"], D=x["D"],
                          h0=x["h0"], impl=impl, chunk_size=16,
                          eigenvalue_range=eigenvalue_range, segment_ids=ids)

  got = jax.jit(lambda x, c: _grads(packed, x, c))(x, cts)
  want = _separately_runner(eigenvalue_range)(*_as_f32(x, cts))
  _check(got, want, impl if impl == "chunked" else "invariant", dt_,
         f"{impl} {dtype} {eigenvalue_range} packed")


def test_memory_does_not_hold_the_states():
  """Compiled fwd+bwd temp memory at T = 4096: the chunked impl stays below half
  of ONE [B, T, E, N] float32 array; the reference (which keeps every state)
  needs more than two, so the bound is one that materialising would break."""
  Bsz, T, E, N = 1, 4096, 32, 16
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  states = Bsz * T * E * N * 4

  def temp(impl):
    f = jax.grad(lambda *a: jnp.sum(selective_scan(*a, impl=impl)[0] ** 2),
                 argnums=range(5))
    return jax.jit(f).lower(s(Bsz, T, E), s(Bsz, T, E), s(E, N), s(Bsz, T, N),
                            s(Bsz, T, N)).compile().memory_analysis(
                            ).temp_size_in_bytes

  chunked_temp, reference_temp = temp("chunked"), temp("reference")
  assert chunked_temp < 0.5 * states, (chunked_temp, states)
  assert reference_temp > 2 * states, (reference_temp, states)


def test_auto_resolves_to_chunked_on_cpu():
  if _dispatch.platform() != "cpu":
    pytest.skip("checks the CPU choice")
  assert _dispatch.resolve_impl("auto", supported=api._IMPLS,
                                op="selective_scan") == "chunked"


def test_unknown_form_raises():
  x, _ = _inputs(1, 2, 2, 2, None)
  with pytest.raises(ValueError, match="form='loop'"):
    chunked.selective_scan(x["x"], x["dt"], x["A"], x["B"][:, :, None],
                           x["C"][:, :, None], D=None, h0=x["h0"], form="loop")


_X = jnp.zeros((2, 5, 4), jnp.float32)
_A = jnp.zeros((4, 3), jnp.float32)
_BC = jnp.zeros((2, 5, 3), jnp.float32)
_H = jnp.zeros((2, 4, 3), jnp.float32)
ss = selective_scan
step = selective_scan_step


@pytest.mark.parametrize("call, match", [
    (lambda: ss(_X[:, :4], _X, _A, _BC, _BC),
     r"selective_scan: dt has shape \(2, 5, 4\); expected \[B, T, E\] = "
     r"\(2, 4, 4\)"),
    (lambda: ss(_X[0], _X[0], _A, _BC, _BC),
     r"x has shape \(5, 4\); expected \[B, T, E\]"),
    (lambda: ss(_X, _X, _A[:3], _BC, _BC),
     r"A has shape \(3, 3\); expected \[E, N\] = \(4, \?\)"),
    (lambda: ss(_X, _X, _A, _BC[..., :2], _BC),
     r"B has shape \(2, 5, 2\); expected \[B, T, N\] = \(2, 5, 3\)"),
    (lambda: ss(_X, _X, _A, _BC, _BC[:, :4]), "C has shape"),
    (lambda: ss(_X, _X, _A, jnp.zeros((2, 5, 3, 3)), jnp.zeros((2, 5, 3, 3))),
     "B has 3 groups .*divides E=4"),
    (lambda: ss(_X, _X, _A, jnp.zeros((2, 5, 2, 3)), jnp.zeros((2, 5, 1, 3))),
     "B has 2 groups and C 1"),
    (lambda: ss(_X, _X, _A, _BC, _BC, D=jnp.zeros((3,))),
     r"D has shape \(3,\); expected \[E\]"),
    (lambda: ss(_X, _X, _A, _BC, _BC, h0=_H[:, :3]), r"h0 has shape \(2, 3, 3\)"),
    (lambda: ss(_X, _X, _A, _BC, _BC, h0=_H.astype(jnp.bfloat16)),
     "h0 has dtype bfloat16"),
    (lambda: ss(_X.astype(jnp.int32), _X, _A, _BC, _BC), "x has dtype int32"),
    (lambda: ss(_X, _X, _A, _BC, _BC, chunk_size=0),
     "chunk_size=0; expected a positive int"),
    (lambda: ss(_X, _X, _A, _BC, _BC, eigenvalue_range="negative"),
     "eigenvalue_range='negative'; expected one of"),
    (lambda: ss(_X, _X, _A, _BC, _BC, impl="bogus"), "impl='bogus'"),
    (lambda: ss(_X, _X, _A, _BC, _BC, segment_ids=jnp.ones((2, 4), jnp.int32)),
     r"segment_ids has shape \(2, 4\)"),
    (lambda: step(_X[:, 0], _X[:, 0], _A, _BC[:, 0], _BC[:, 0], _H[:, :2]),
     r"selective_scan_step: h has shape \(2, 2, 3\)"),
    (lambda: step(_X[:, 0], _X[:1, 0], _A, _BC[:, 0], _BC[:, 0], _H),
     "selective_scan_step: dt_t has shape"),
], ids=["dt_time", "x_rank", "A_E", "B_N", "C_T", "G_divides", "G_same",
        "D_shape", "h0_shape", "h0_dtype", "x_int", "chunk", "range", "impl",
        "segment_ids", "step_h", "step_dt"])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
