"""Packed documents (``segment_ids``) in every op: a packed row equals running
each of its documents on its own from a zero state (h0 for a row's first
document), on outputs, final states and the gradients of every input and h0.

The expected values never use segment_ids: each document is run separately by
the float32 reference and the results are concatenated, so the masks of the
packed path are checked against plain sequence boundaries.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.ops import _dispatch
from lsm.ops.common import segments
from lsm.ops.delta_rule import delta_rule
from lsm.ops.gla import gla
from lsm.ops.ssm_scan import chunked as ssm_chunked
from lsm.ops.ssm_scan import ssm_scan
from tests import numerics

# Document lengths per row (T = 47, not a multiple of 16): a 1-token document,
# documents shorter and longer than a chunk of 16, one crossing two chunk edges,
# starts exactly at a chunk's first token (16) and last token (15, 31), and
# several starts inside one chunk. With chunk 64 every row is one short chunk.
LENGTHS = ((1, 13, 21, 12), (16, 17, 14), (15, 16, 16))
T = 47
B, H, K, V = len(LENGTHS), 2, 8, 6


def _segment_ids():
  ids = np.zeros((B, T), np.int32)
  for row, lengths in enumerate(LENGTHS):
    assert sum(lengths) == T
    ids[row] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
  return jnp.asarray(ids)


def _inputs(op: str, decay: str, seed: int = 0) -> dict:
  """float32 primals of ``op`` (by keyword), h0 included."""
  keys = jax.random.split(jax.random.key(seed), 6)
  normal = lambda i, shape: jax.random.normal(keys[i], shape, jnp.float32)
  strong = decay == "strong"
  if op == "ssm_scan":
    a = jax.random.uniform(keys[0], (B, T, H, K), minval=-1.0, maxval=1.0)
    if strong:  # zero and sign-flipping decays
      a = jnp.where(jnp.abs(a) < 0.3, 0.0, jnp.sign(a))
    return dict(a=a, b=normal(1, (B, T, H, K)), h0=normal(2, (B, H, K)))
  x = dict(q=normal(0, (B, T, H, K)), k=normal(1, (B, T, H, K)),
           v=normal(2, (B, T, H, V)), h0=normal(3, (B, H, K, V)))
  if op == "gla":
    # Mild: GLA's log-sigmoid / 16 (the fast form); strong: -5 per token and
    # worse (the stable form).
    if decay != "none":  # none: no gate at all (log_g=None)
      x["log_g"] = jax.nn.log_sigmoid(normal(4, (B, T, H, K))) * (
          8.0 if strong else 1 / 16)
  else:
    x["k"] = x["k"] / jnp.linalg.norm(x["k"], axis=-1, keepdims=True)
    x["beta"] = jax.random.uniform(keys[5], (B, T, H), maxval=2.0)  # [0, 2]
    x["log_g"] = jax.nn.log_sigmoid(normal(4, (B, T, H)) + (-3.0 if strong
                                                            else 2.0))
  return x


def _call(op: str, x: dict, **kw):
  if op == "gla":
    return gla(x["q"], x["k"], x["v"], x.get("log_g"), h0=x["h0"], **kw)
  if op == "delta_rule":
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], log_g=x["log_g"],
                      h0=x["h0"], **kw)
  form = kw.pop("form", None)
  if form is not None:  # one form of the chunked scan, whatever the platform
    ids = kw.pop("segment_ids")
    return ssm_chunked.ssm_scan(x["a"], x["b"], h0=x["h0"], form=form,
                                resets=segments.resets(ids))
  return ssm_scan(x["a"], x["b"], h0=x["h0"], **kw)


def _separately(op: str, x: dict):
  """Each document alone with the reference (h0 for the first of a row);
  outputs concatenated, final state of each row's last document."""
  outs, finals = [], []
  for row, lengths in enumerate(LENGTHS):
    start, pieces = 0, []
    for i, n in enumerate(lengths):
      doc = {name: (val[row:row + 1] if name == "h0" else
                    val[row:row + 1, start:start + n])
             for name, val in x.items()}
      if i:
        doc["h0"] = jnp.zeros_like(doc["h0"])
      o, h_t = _call(op, doc, impl="reference")
      pieces.append(o)
      start += n
    outs.append(jnp.concatenate(pieces, axis=1))
    finals.append(h_t)
  return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)


@functools.cache
def _runner(op: str, impl: str, chunk: int | None, packed: bool):
  """jit(primals, cotangents) -> (o, h_T, grads dict)."""
  def run(x, cts):
    if packed:
      kw = dict(segment_ids=_segment_ids())
      if impl.startswith("chunked-"):
        kw["form"] = impl.removeprefix("chunked-")
      else:
        kw["impl"] = impl
        if op != "ssm_scan":
          kw["chunk_size"] = chunk
        if impl.startswith("pallas"):  # each backend's interpret mode on CPU
          kw["interpret"] = True
      f = lambda x: _call(op, x, **kw)
    else:
      f = lambda x: _separately(op, x)
    (o, h_t), pull = jax.vjp(f, x)
    return o, h_t, pull(cts)[0]
  return jax.jit(run)


# (op, impl, chunk, dtype, decay): every impl that takes segment_ids, float32
# and bfloat16, both GLA forms (mild gates: fast; strong: stable), gated delta
# rule with beta in [0, 2] and strong decay, signed and zero SSM decays.
CASES = [
    (op, impl, chunk, dtype, decay)
    for op in ("gla", "delta_rule", "ssm_scan")
    for impl, chunk, dtype, decay in (
        ("reference", 16, "float32", "mild"),
        ("chunked", 16, "float32", "mild"),
        ("chunked", 64, "float32", "mild"),
        ("chunked", 16, "float32", "strong"),
        ("chunked", 16, "bfloat16", "mild"),
    )
    if not (op == "ssm_scan" and chunk == 64)  # ssm_scan has no chunk size
] + [("gla", "chunked", 16, dtype, "none")  # no gate: chunked's own form
       for dtype in ("float32", "bfloat16")
] + [("ssm_scan", "chunked-associative", None, "float32", "strong"),
     ("ssm_scan", "chunked-sequential", None, "float32", "strong")] + [
    # The Pallas kernels in interpret mode: chunk 16 (boundaries at a chunk's
    # first and last token, several in one chunk) and 32 (two sub-chunks per
    # chunk, so the pair masks cross sub-chunk blocks); both backends share
    # the tile math, the TPU kernels get their plumbing checked once.
    (op, impl, chunk, dtype, decay)
    for op in ("gla", "delta_rule")
    for impl, chunk, dtype, decay in (
        ("pallas_triton", 16, "float32", "mild"),
        ("pallas_triton", 32, "float32", "strong"),
        ("pallas_triton", 32, "bfloat16", "mild"),
        ("pallas_tpu", 32, "float32", "mild"),
        # Mosaic GPU: chunk 64 and 16-bit inputs only (one chunk here; its
        # own tests pack T = 150)
        ("pallas_mosaic_gpu", 64, "bfloat16", "strong"),
    )]


@pytest.mark.parametrize("op, impl, chunk, dtype, decay", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_packed_row_equals_documents_run_alone(op, impl, chunk, dtype, decay):
  x = _inputs(op, decay)
  dt = jnp.dtype(dtype)
  # Low-precision inputs except the float32 state; the expected values use
  # the same (rounded) values in float32.
  x_in = {n: (v if n == "h0" else v.astype(dt)) for n, v in x.items()}
  x_32 = {n: v.astype(jnp.float32) for n, v in x_in.items()}
  o_shape = (B, T, H, K) if op == "ssm_scan" else (B, T, H, V)
  k1, k2 = jax.random.split(jax.random.key(1))
  cts = (jax.random.normal(k1, o_shape).astype(dt),
         jax.random.normal(k2, x["h0"].shape))
  got = _runner(op, impl, chunk, True)(x_in, cts)
  want = _runner(op, "reference", None, False)(
      x_32, tuple(c.astype(jnp.float32) for c in cts))
  names = sorted(x)
  assert got[0].dtype == dt and got[1].dtype == jnp.float32
  o_name = "y" if op == "ssm_scan" else "o"
  numerics.assert_outputs_close(
      (got[0], got[1], *(got[2][n] for n in names)),
      (want[0], want[1], *(want[2][n] for n in names)),
      impl="invariant" if impl == "reference" else impl, dtype=dt,
      names=[o_name, "h_t", *(f"d{n}" for n in names)], what=f"{op} {impl}")


def test_gla_forms_agree_with_documents(monkeypatch):
  """Both GLA chunked forms, each forced, on one packed input with mild gates
  (where both are exact)."""
  from lsm.ops.gla import chunked
  x = _inputs("gla", "mild")
  ids = _segment_ids()
  results = []
  for use_fast in (True, False):
    monkeypatch.setattr(chunked, "_use_fast", lambda g, c, f=use_fast: f)
    (o, h_t), pull = jax.vjp(
        lambda x: _call("gla", x, impl="chunked", chunk_size=16, segment_ids=ids),
        x)
    grads = pull((jnp.cos(o), jnp.sin(h_t)))[0]
    results.append((o, h_t, *(grads[n] for n in sorted(grads))))
  numerics.assert_trees_close(results[0], results[1],
                              rtol=numerics.TOLERANCES[("invariant", "float32")],
                              names=("o", "h_T", *sorted(x)))


def test_one_document_per_row_equals_no_segment_ids():
  x = _inputs("delta_rule", "mild")
  ones = jnp.ones((B, T), jnp.int32)
  for impl in ("reference", "chunked"):
    got = _call("delta_rule", x, impl=impl, segment_ids=ones)
    want = _call("delta_rule", x, impl=impl)
    numerics.assert_trees_close(got, want,
                                rtol=numerics.TOLERANCES[("invariant", "float32")],
                                names=(f"{impl} o", "h_T"))


def test_resets_flags():
  ids = jnp.array([[1, 1, 2, 2, 2, 0, 0], [3, 1, 1, 3, 3, 3, 1]])
  want = np.array([[0, 0, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0, 1]], bool)
  np.testing.assert_array_equal(segments.resets(ids), want)


_Q = jnp.zeros((2, 5, 1, 4))


@pytest.mark.parametrize("call, match", [
    (lambda: gla(_Q, _Q, _Q, segment_ids=jnp.ones((2, 4), jnp.int32)),
     r"gla: segment_ids has shape \(2, 4\); expected \[B, T\] = \(2, 5\)"),
    (lambda: gla(_Q, _Q, _Q, segment_ids=jnp.ones((2, 5))),
     "gla: segment_ids has dtype float32; expected an integer dtype"),
    # An impl without the masks (none of gla's and delta_rule's today) is
    # refused by name, never run without them.
    (lambda: segments.resolve(
        "gla", "pallas_mosaic_gpu",
        {"chunked": _dispatch.ANYTHING,
         "pallas_mosaic_gpu": _dispatch.Accepts(documents=False)},
        _dispatch.Call.of("float32", 4, 4, 64, documents=True),
        jnp.ones((2, 5), jnp.int32), 2, 5),
     "gla: impl='pallas_mosaic_gpu' does not take segment_ids yet"),
    (lambda: ssm_scan(_Q, _Q, segment_ids=jnp.ones((5,), jnp.int32)),
     "ssm_scan: segment_ids has shape"),
], ids=["shape", "dtype", "pallas", "ssm_rank"])
def test_bad_segment_ids_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
