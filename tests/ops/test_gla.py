"""GLA: every impl against the float32 reference, the recurrence's invariants,
property tests and input checks."""

import functools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from lsm.ops import _dispatch
from lsm.ops.gla import gla, gla_step
from tests import numerics
from tests.ops import harness

FAST_IMPLS = ["chunked"]

# (B, T, H, K, V, chunk): awkward on purpose.
SHAPES = {
    "T63_KneV": (2, 63, 2, 16, 24, 16),  # T not a multiple of the chunk, K != V
    "T1_H1": (1, 1, 1, 8, 8, 64),  # one token, one head
    "TltC_H1": (2, 40, 1, 32, 16, 64),  # T shorter than one chunk
    "subchunks": (1, 100, 2, 16, 16, 32),  # several chunks of two sub-chunks
}


def make_inputs(seed, B, T, H, K, V, *, gate="channel", dtype=jnp.float32,
                log_g_value=None):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  gate_shape = {"channel": (B, T, H, K), "head": (B, T, H)}.get(gate)
  if gate_shape is None:
    log_g = None
  elif log_g_value is not None:
    log_g = jnp.full(gate_shape, log_g_value)
  else:
    log_g = jax.nn.log_sigmoid(jax.random.normal(ks[3], gate_shape) + 2.0)
  h0 = jax.random.normal(ks[4], (B, H, K, V))
  out = dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype))
  if log_g is not None:
    out["log_g"] = log_g.astype(dtype)
  out["h0"] = h0
  return out


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("gate", ["channel", "head", "none"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference_fp32(impl, gate, shape):
  *dims, chunk = SHAPES[shape]
  primals = make_inputs(0, *dims, gate=gate)
  harness.check_against_reference(gla, impl, chunk, primals, jax.random.key(1))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("gate", ["channel", "head", "none"])
@pytest.mark.parametrize("shape", ["T63_KneV", "subchunks"])
def test_matches_reference_bf16(impl, gate, shape):
  *dims, chunk = SHAPES[shape]
  primals = make_inputs(0, *dims, gate=gate, dtype=jnp.bfloat16)
  harness.check_against_reference(gla, impl, chunk, primals, jax.random.key(1))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("gate", ["channel", "head"])
@pytest.mark.parametrize("log_g_value", [-5.0, -50.0])
def test_strong_decay(impl, gate, log_g_value):
  """log_g = -5 per step on every channel over T = 1024: the naive exp(+-cumsum)
  split overflows here; -50 drives the in-chunk log-space path. Per head: the
  scalar-decay form's one path, exact at any decay."""
  primals = make_inputs(2, 1, 1024, 1, 16, 16, gate=gate,
                        log_g_value=log_g_value)
  harness.check_against_reference(gla, impl, 64, primals, jax.random.key(3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_gates_mixed_strong_and_mild(dtype):
  """Per-head gates that jump between -50, -5 and mild inside chunks, at an
  awkward shape (T = 150 over chunks of 64, K != V, two heads): every segment
  sum mixes strong and weak gates, where a difference of cumsums would lose
  the weak ones."""
  primals = make_inputs(12, 2, 150, 2, 16, 24, gate="head", dtype=dtype)
  pick = jax.random.randint(jax.random.key(13), (2, 150, 2), 0, 5)
  strong = jnp.asarray([-50.0, -5.0, 0.0, 0.0, 0.0])[pick]
  primals["log_g"] = jnp.where(strong < 0, strong,
                               primals["log_g"].astype(jnp.float32)).astype(dtype)
  harness.check_against_reference(gla, "chunked", 64, primals,
                                  jax.random.key(14))


@functools.cache
def _chunked(chunk_size):
  return jax.jit(functools.partial(gla, impl="chunked", chunk_size=chunk_size))


# -5 per step exceeds the single-pivot limit: the exact secondary-chunking form.
DECAYS = pytest.mark.parametrize("log_g_value", [None, -5.0], ids=["mild", "strong"])
GATES = pytest.mark.parametrize("gate", ["channel", "head"])


@GATES
@DECAYS
def test_split_sequence_equals_whole(log_g_value, gate):
  x = make_inputs(4, 2, 90, 2, 16, 8, gate=gate, log_g_value=log_g_value)
  o, h = _chunked(32)(x["q"], x["k"], x["v"], x["log_g"], h0=x["h0"])
  t = 37  # not a chunk boundary
  first = {n: a[:, :t] for n, a in x.items() if n != "h0"}
  rest = {n: a[:, t:] for n, a in x.items() if n != "h0"}
  o1, h1 = _chunked(32)(**first, h0=x["h0"])
  o2, h2 = _chunked(32)(**rest, h0=h1)
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  numerics.assert_close(jnp.concatenate([o1, o2], axis=1), o, rtol=rtol, what="o")
  numerics.assert_close(h2, h, rtol=rtol, what="h_T")


@GATES
@DECAYS
def test_chunk_size_does_not_matter(log_g_value, gate):
  x = make_inputs(5, 1, 70, 2, 16, 8, gate=gate, log_g_value=log_g_value)
  o, h = _chunked(64)(**x)
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  for c in (8, 16, 32):
    o_c, h_c = _chunked(c)(**x)
    numerics.assert_close(o_c, o, rtol=rtol, what=f"o, chunk {c}")
    numerics.assert_close(h_c, h, rtol=rtol, what=f"h_T, chunk {c}")


@pytest.mark.parametrize("gate", ["channel", "head", "none"])
def test_step_loop_equals_parallel(gate):
  x = make_inputs(6, 2, 20, 2, 8, 12, gate=gate)
  o, h = _chunked(16)(**x)
  step = jax.jit(gla_step)
  h_t = x["h0"]
  outs = []
  for t in range(20):
    log_g_t = x["log_g"][:, t] if "log_g" in x else None
    o_t, h_t = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], log_g_t, h_t)
    outs.append(o_t)
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  numerics.assert_close(jnp.stack(outs, axis=1), o, rtol=rtol, what="o")
  numerics.assert_close(h_t, h, rtol=rtol, what="h_T")


def test_auto_picks_chunked_on_cpu_and_never_reference():
  if _dispatch.platform() != "cpu":
    pytest.skip("auto resolves to a Pallas impl on accelerators")
  assert _dispatch.resolve_impl("auto", supported=("reference", "chunked"),
                                op="gla") == "chunked"
  x = make_inputs(7, 1, 20, 1, 8, 8)
  o_auto, _ = gla(**x, impl="auto")
  o_chunked, _ = _chunked(64)(**x)
  numerics.assert_close(o_auto, o_chunked,
                        rtol=numerics.TOLERANCES[("invariant", "float32")], what="o")


@settings(max_examples=3, deadline=None)  # each example compiles anew
@given(T=st.integers(1, 80), K=st.sampled_from([4, 12]), V=st.sampled_from([4, 8]),
       gate=st.sampled_from(["channel", "head", "none"]), seed=st.integers(0, 2**16))
def test_property_chunked_matches_reference(T, K, V, gate, seed):
  x = make_inputs(seed, 1, T, 2, K, V, gate=gate)
  o_e, h_e = gla(**x, impl="reference")
  o, h = _chunked(32)(**x)
  numerics.assert_outputs_close((o, h), (o_e, h_e), impl="chunked",
                                dtype=jnp.float32, names=("o", "h_t"))


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_one_strong_chunk_forces_the_exact_form(impl):
  """Mild gates except one chunk of -5 per step: the whole call takes the
  secondary-chunking form; gradients still match, including the mild chunks'."""
  primals = make_inputs(8, 1, 150, 2, 16, 8)
  primals["log_g"] = primals["log_g"].at[:, 64:128].set(-5.0)
  harness.check_against_reference(gla, impl, 64, primals, jax.random.key(9))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@GATES
def test_strong_decay_bf16(impl, gate):
  primals = make_inputs(10, 1, 200, 1, 16, 16, gate=gate, log_g_value=-5.0,
                        dtype=jnp.bfloat16)
  harness.check_against_reference(gla, impl, 64, primals, jax.random.key(11))


# -- one gate per head ([B, T, H]) ---------------------------------------------


@pytest.mark.parametrize("log_g_value", [None, -5.0, -50.0],
                         ids=["mild", "strong", "very_strong"])
def test_head_gates_equal_their_channel_broadcast(log_g_value):
  """[B, T, H] gates (the scalar-decay form) against the same gates broadcast
  to [B, T, H, K] (the per-channel forms: fast while mild, else stable):
  outputs, h_T and every gradient, the head gates' being the sum over K of
  the broadcast gates'."""
  x = make_inputs(15, 2, 75, 2, 12, 8, gate="head", log_g_value=log_g_value)
  broadcast = lambda g: jnp.broadcast_to(g[..., None], (*g.shape, 12))  # noqa: E731

  def run(x, per_channel):
    f = lambda x: gla(**dict(x, log_g=broadcast(x["log_g"]) if per_channel  # noqa: E731
                             else x["log_g"]), impl="chunked", chunk_size=32)
    (o, h_t), pull = jax.vjp(f, x)
    cts = (jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape),
           jnp.sin(jnp.arange(h_t.size, dtype=jnp.float32)).reshape(h_t.shape))
    (grads,) = pull(cts)
    return (o, h_t, *(grads[n] for n in sorted(grads)))

  names = ("o", "h_T", *(f"d{n}" for n in sorted(x)))
  numerics.assert_trees_close(
      jax.jit(run, static_argnums=1)(x, False),
      jax.jit(run, static_argnums=1)(x, True),
      rtol=numerics.TOLERANCES[("invariant", "float32")], names=names)


def _assert_against_float32(dtype, f, expected, x, cts):
  """f(x) against expected(x in float32): outputs, h_T and the gradients of
  every input under the cotangents ``cts``, each against its tolerance row."""
  def with_grads(f, x, cts):
    (o, h_t), pull = jax.vjp(f, x)
    (grads,) = pull(cts)
    return (o, h_t, *(grads[n] for n in sorted(grads)))

  got = jax.jit(functools.partial(with_grads, f))(x, cts)
  want = jax.jit(functools.partial(with_grads, expected))(
      {n: a.astype(jnp.float32) for n, a in x.items()},
      tuple(c.astype(jnp.float32) for c in cts))
  numerics.assert_outputs_close(
      got, want, impl="chunked", dtype=dtype,
      names=("o", "h_t", *(f"d{n}" for n in sorted(x))))


# -- key groups (q, k with G heads for v's H: Mamba-2's shared B and C) ---------

_G, _R = 2, 3  # 2 key groups of 3 heads


def _grouped_inputs(seed, dtype, log_g_value, *, B=2, T=37, G=_G, R=_R, K=8,
                    V=5):
  x = make_inputs(seed, B, T, G * R, K, V, gate="head", dtype=dtype,
                  log_g_value=log_g_value)
  x["q"], x["k"] = x["q"][:, :, :G], x["k"][:, :, :G]
  return x


def _repeat_groups(x, R=_R):
  return dict(x, q=jnp.repeat(x["q"], R, axis=2), k=jnp.repeat(x["k"], R, axis=2))


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("log_g_value", [None, -5.0], ids=["mild", "strong"])
def test_key_groups_equal_keys_repeated_per_head(log_g_value, dtype, documents):
  """Chunked with q, k [B, T, G, K] and per-head gates (T = 37: not a multiple
  of the chunk 16, K != V) against the float32 reference on q, k repeated to
  the H heads: outputs, h_T and the gradients of every input (q's and k's
  summed over each group's heads by the repeat)."""
  ids = (jnp.asarray([[1] * 10 + [2] * 20 + [3] * 7, [1] * 16 + [2] * 21],
                     jnp.int32) if documents else None)
  _check_key_groups(21, dtype, log_g_value, ids)


def _check_key_groups(seed, dtype, log_g_value, ids):
  """Chunked (chunk 16) on ``_grouped_inputs(seed, ...)`` against the float32
  reference on the keys repeated per head, with segment_ids ``ids``."""
  x = _grouped_inputs(seed, dtype, log_g_value)

  def grouped(x):
    return gla(**x, impl="chunked", chunk_size=16, segment_ids=ids)

  def repeated(x):
    return gla(**_repeat_groups(x), impl="reference", segment_ids=ids)

  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  cts = (jax.random.normal(k1, (2, 37, _G * _R, 5)).astype(dtype),
         jax.random.normal(k2, (2, _G * _R, 8, 5)))
  _assert_against_float32(dtype, grouped, repeated, x, cts)


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
@pytest.mark.parametrize("dtype,log_g_value", [(jnp.float32, None),
                                               (jnp.bfloat16, -5.0)],
                         ids=["fp32_mild", "bf16_strong"])
def test_head_gates_across_rematerialised_groups(dtype, log_g_value, documents,
                                                 monkeypatch):
  """The scalar-decay form's groups of chunks (chunked_scalar.GROUP_TOKENS)
  cut to 2 chunks of 16: T = 37 is 3 chunks, so two groups, the state
  carried between them and the last padded with an empty chunk (documents:
  one ends in the padded group, one starts in the second). Against the
  float32 reference: outputs, h_T and every gradient."""
  from lsm.ops.gla import chunked_scalar
  monkeypatch.setattr(chunked_scalar, "GROUP_TOKENS", 32)
  ids = (jnp.asarray([[1] * 10 + [2] * 27, [1] * 33 + [2] * 4], jnp.int32)
         if documents else None)
  _check_key_groups(23, dtype, log_g_value, ids)


def test_key_groups_are_never_copied_per_head():
  """The chunked fwd+bwd on key groups has no array with a per-head key axis
  (H, or G and R side by side, ahead of a last axis of K): q k^T is formed per
  group and the heads' terms are [C, C] and [C, V]."""
  # Sizes apart from each other: B 1, T 37 (3 chunks of 16), G 2, R 5, H 10,
  # K 8, V 7.
  G, R, K = 2, 5, 8
  H = G * R
  x = _grouped_inputs(23, jnp.float32, None, B=1, G=G, R=R, K=K, V=7)

  def loss(x):
    o, h_t = gla(**x, impl="chunked", chunk_size=16)
    return jnp.sum(o ** 2) + jnp.sum(h_t ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(x)
  per_head = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        shape = tuple(getattr(var.aval, "shape", ()))
        pairs = list(zip(shape[:-1], shape[1:-1]))
        if len(shape) >= 3 and shape[-1] == K and (
            H in shape[:-1] or (G, R) in pairs):
          per_head.append((eqn.primitive.name, shape))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            visit(sub)

  visit(jaxpr.jaxpr)
  assert not per_head, per_head
  # The check can fail: the same call on q, k repeated per head has them.
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: loss(_repeat_groups(x, R))))(x)
  visit(jaxpr.jaxpr)
  assert per_head


def test_key_groups_must_divide_the_heads():
  x = make_inputs(24, 1, 8, 6, 4, 4, gate="head")
  with pytest.raises(ValueError, match=r"gla: v has 6 heads and q, k have 4; "
                     r"expected q, k with H heads or a divisor of H"):
    gla(x["q"][:, :, :4], x["k"][:, :, :4], x["v"], x["log_g"])


# Packed rows (T = 47, chunk 16): a 1-token document, documents shorter and
# longer than a chunk, starts at a chunk's first and last token, several in one
# chunk.
_DOC_LENGTHS = ((1, 13, 21, 12), (16, 17, 14))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("log_g_value", [None, -5.0], ids=["mild", "strong"])
def test_head_gates_packed_row_equals_documents_run_alone(log_g_value, dtype):
  """Chunked with [B, T, H] gates and segment_ids against each document run
  alone by the reference (h0 entering each row's first document only):
  outputs, final states and the gradients of every input."""
  T = sum(_DOC_LENGTHS[0])
  x = make_inputs(16, len(_DOC_LENGTHS), T, 2, 8, 6, gate="head",
                  log_g_value=log_g_value, dtype=dtype)
  ids = jnp.asarray([[i for i, n in enumerate(row) for _ in range(n)]
                     for row in _DOC_LENGTHS], jnp.int32)

  def packed(x):
    return gla(**x, impl="chunked", chunk_size=16, segment_ids=ids)

  def alone(x):
    outs, finals = [], []
    for row, lengths in enumerate(_DOC_LENGTHS):
      start, pieces, h = 0, [], x["h0"][row:row + 1]
      for i, n in enumerate(lengths):
        doc = {name: a[row:row + 1, start:start + n]
               for name, a in x.items() if name != "h0"}
        o, h = gla(**doc, h0=h if i == 0 else jnp.zeros_like(h),
                   impl="reference")
        pieces.append(o)
        start += n
      outs.append(jnp.concatenate(pieces, axis=1))
      finals.append(h)
    return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)

  o_shape, h_shape = (2, T, 2, 6), (2, 2, 8, 6)
  k1, k2 = jax.random.split(jax.random.key(17))
  cts = (jax.random.normal(k1, o_shape).astype(dtype),
         jax.random.normal(k2, h_shape))
  _assert_against_float32(dtype, packed, alone, x, cts)


def test_head_gates_reach_the_impls_as_they_are(monkeypatch):
  """[B, T, H] gates reach every impl (``api._HEAD_GATES``: reference,
  chunked, and the Triton, TPU and Mosaic GPU kernels) as float32 [B, T, H],
  never broadcast to [B, T, H, K]."""
  from lsm.ops.gla import api
  seen = {}

  def recorder(name):
    def impl(q, k, v, log_g, **kwargs):
      del k, kwargs
      seen[name] = (log_g.shape, log_g.dtype)
      return jnp.zeros((*q.shape[:-1], v.shape[-1]), q.dtype), None
    return impl

  for name in api._IMPLS:
    monkeypatch.setitem(api._IMPLS, name, recorder(name))
  x = make_inputs(18, 1, 16, 2, 8, 8, gate="head", dtype=jnp.bfloat16)
  for name in api._IMPLS:
    gla(**x, impl=name, chunk_size=64 if name == "pallas_mosaic_gpu" else 16)
  for name, got in seen.items():
    assert got == ((1, 16, 2), jnp.float32), (name, got)
  assert set(api._HEAD_GATES) == set(seen) == set(api._IMPLS)


def gate_broadcasts(jaxpr, lead_shapes, K: int):
  """The ``broadcast_in_dim`` equations anywhere in ``jaxpr`` (nested jaxprs
  of jit, scan, custom_vjp, shard_map, ... included) that widen a non-scalar
  float32 operand to [B, T', H, K] for a (B, T', H) in ``lead_shapes``: what
  broadcasting [B, T, H] gates over K in the time-major layout looks like
  (zero cotangents, broadcast from scalars, are not counted)."""
  targets = {(*lead, K) for lead in lead_shapes}
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "broadcast_in_dim":
      (x,), (y,) = eqn.invars, eqn.outvars
      if (y.aval.dtype == jnp.float32 and tuple(y.aval.shape) in targets
          and x.aval.ndim > 0 and tuple(x.aval.shape) != tuple(y.aval.shape)):
        found.append(f"{x.aval.str_short()} -> {y.aval.str_short()}")
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += gate_broadcasts(sub, lead_shapes, K)
  return found


def test_no_gate_is_broadcast_over_K():
  """Forward and backward of chunked GLA with [B, T, H] gates (and documents)
  never widen a [B, T, H] array to a float32 [B, T, H, K] one (nor the padded
  [B, Tp, H, K]); the same gates given broadcast by the caller are, which
  shows the check sees such a broadcast."""
  B, T, H, K, V, C = 2, 40, 3, 24, 12, 16  # distinct sizes; Tp = 48
  x = make_inputs(19, B, T, H, K, V, gate="head")
  ids = jnp.asarray([[0] * 9 + [1] * 31, [0] * 40], jnp.int32)

  def vjp(widen, segment_ids):
    def run(x):
      g = x["log_g"]
      if widen:
        g = jnp.broadcast_to(g[..., None], (B, T, H, K))
      f = lambda x: gla(**dict(x, log_g=g), impl="chunked", chunk_size=C,  # noqa: E731
                        segment_ids=segment_ids)
      ys, pull = jax.vjp(f, x)
      return pull(tuple(jnp.ones_like(y) for y in ys))
    return jax.make_jaxpr(run)(x).jaxpr

  leads = [(B, T, H), (B, 48, H)]
  for segment_ids in (None, ids):
    assert not gate_broadcasts(vjp(False, segment_ids), leads, K)
  assert gate_broadcasts(vjp(True, None), leads, K)


def _zeros(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=_zeros(2, 8, 2)), r"q has shape \(2, 8, 2\); expected \[B, T, H, K\]"),
    (dict(k=_zeros(2, 7, 2, 4)), r"k has shape \(2, 7, 2, 4\); expected .* = \(2, 8, 2, 4\)"),
    (dict(v=_zeros(2, 8, 3, 5)), r"v has 3 heads and q, k have 2; expected q, k "
                                 r"with H heads or a divisor of H"),
    (dict(v=_zeros(2, 7, 4, 5)), r"v has shape \(2, 7, 4, 5\); expected .* = \(2, 8, \?, \?\)"),
    (dict(v=_zeros(2, 8, 2, 5, dtype=jnp.bfloat16)), r"v has dtype bfloat16; expected float32"),
    (dict(q=_zeros(2, 8, 2, 4, dtype=jnp.int32), k=_zeros(2, 8, 2, 4, dtype=jnp.int32)),
     r"q has dtype int32; expected a floating dtype"),
    (dict(log_g=_zeros(2, 8, 2, 3)), r"log_g has shape \(2, 8, 2, 3\)"),
    (dict(log_g=_zeros(2, 8)), r"log_g has shape \(2, 8\)"),
    (dict(h0=_zeros(2, 2, 5, 4)), r"h0 has shape \(2, 2, 5, 4\); expected \[B, H, K, V\] = \(2, 2, 4, 5\)"),
    (dict(h0=_zeros(2, 2, 4, 5, dtype=jnp.bfloat16)), r"h0 has dtype bfloat16; expected float32"),
    (dict(chunk_size=24), r"chunk_size=24; expected a positive int"),
    (dict(chunk_size=0), r"chunk_size=0"),
    (dict(impl="mosaic"), r"impl='mosaic' is not one of"),
    (dict(impl="pallas_triton", chunk_size=48), r"impl='pallas_triton' needs chunk_size in"),
])
def test_bad_input_names_the_argument(kwargs, match):
  args = dict(q=_zeros(2, 8, 2, 4), k=_zeros(2, 8, 2, 4), v=_zeros(2, 8, 2, 5),
              log_g=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    gla(**args)


def test_step_bad_state_dtype():
  with pytest.raises(ValueError, match=r"gla_step: h has dtype bfloat16"):
    gla_step(_zeros(1, 2, 4), _zeros(1, 2, 4), _zeros(1, 2, 3), None,
             _zeros(1, 2, 4, 3, dtype=jnp.bfloat16))


# (64, 16): several sub-chunks; (16, 16): one, the early-return path, which the
# default run also reaches through test_chunk_size_does_not_matter[strong].
@pytest.mark.parametrize("chunk, sub", [
    (64, 16), pytest.param(32, 16, marks=pytest.mark.slow),
    pytest.param(16, 16, marks=pytest.mark.slow)])
def test_fast_and_stable_forms_agree(chunk, sub, monkeypatch):
  del sub  # the op's own: min(chunk, 16)
  """The chunked op's two forms (fast: one split per chunk and a hand-written
  VJP; stable: secondary chunking, autodiff) where both are exact: mild gates.
  The op picks one per call, so each is forced in turn; outputs, h_T and the
  gradients of every input and of h0 must agree."""
  from lsm.ops.gla import chunked
  x = make_inputs(chunk, 2, 2 * chunk + 5, 3, 12, 8, gate="channel")

  def run(x):
    return gla(**x, chunk_size=chunk, impl="chunked")

  results = []
  for use_fast in (True, False):
    monkeypatch.setattr(chunked, "_use_fast", lambda g, c, f=use_fast: f)
    (o, h_t), pull = jax.vjp(run, x)
    cts = (jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape),
           jnp.sin(jnp.arange(h_t.size, dtype=jnp.float32)).reshape(h_t.shape))
    (grads,) = pull(cts)
    results.append((o, h_t, *(grads[n] for n in sorted(grads))))
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  numerics.assert_trees_close(results[0], results[1], rtol=rtol,
                              names=("o", "h_T", *(f"d{n}" for n in sorted(x))))
  # The forcing works: at log_g = -50 per token the fast split overflows.
  strong = dict(x, log_g=jnp.full_like(x["log_g"], -50.0))
  finite = []
  for use_fast in (True, False):
    monkeypatch.setattr(chunked, "_use_fast", lambda g, c, f=use_fast: f)
    finite.append(bool(jnp.all(jnp.isfinite(run(strong)[0]))))
  assert finite == [False, True]
