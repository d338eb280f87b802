"""GLA on Mosaic GPU (``lsm.ops.gla.pallas_mosaic_gpu``): against the float32
reference in the Mosaic GPU interpreter on CPU (outputs, h_T, gradients of every
input and h0), a race-detecting run of every kernel, lowering for CUDA without a
GPU (forward and backward, both dtypes, both head dims) with each kernel's SMEM
checked against the H100 limit, input limits, and real-device runs marked gpu.
Both gate forms: per key channel [B, T, H, K], and one per head [B, T, H], which
the kernels' head-gate forms read as it is (never broadcast over K).

Kept small: the interpreter runs each grid point of each kernel in turn, so
shapes have one or two heads and a few chunks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import mosaic_gpu as plgpu

from lsm.ops.common import cuda_targets
from lsm.ops.common import segments
from lsm.ops.gla import gla
from lsm.ops.gla import api as gla_api
from lsm.ops.gla import pallas_mosaic_gpu as mgpu_gla
from tests import numerics
from tests.ops import harness
from tests.ops.test_gla import gate_broadcasts, make_inputs
from tests.ops.test_gla_pallas import _gate_sized_f32

IMPL = "pallas_mosaic_gpu"
INTERPRET = plgpu.InterpretGPUParams()  # uninitialised SMEM reads as NaN
H100_SMEM = cuda_targets.TARGETS["h100"].smem_per_block  # 232,448 B


def _op(q, k, v, log_g=None, h0=None, *, impl, chunk_size=64, interpret=False):
  """The public op (gate broadcasting, scale, checks, dispatch)."""
  kw = {} if interpret is False else {"interpret": interpret}
  return gla(q, k, v, log_g, h0=h0, impl=impl, chunk_size=chunk_size, **kw)


def _check(B, T, H, K, V, *, dtype=jnp.bfloat16, interpret=INTERPRET, seed=0,
           gate_scale=1.0, **kwargs):
  """``gate_scale`` multiplies the log gates (below 1: weak decay, so the
  terms through the chunk states are as large as the ones inside a chunk)."""
  primals = make_inputs(seed, B, T, H, K, V, dtype=dtype, **kwargs)
  if gate_scale != 1.0:
    primals["log_g"] = (primals["log_g"] * gate_scale).astype(dtype)
  harness.check_against_reference(
      _op, IMPL, 64, primals, jax.random.key(seed + 1), interpret=interpret)


# ---------------------------------------------------------- interpreter ---


@pytest.mark.parametrize("B, T, H, K, V", [
    (2, 63, 1, 64, 128),  # T < C, K != V
    (1, 150, 2, 128, 64),  # three chunks (both state buffers), K != V
    (1, 70, 1, 40, 96),  # head dims padded to 64 and 128
])
def test_interpret_matches_reference_bf16(B, T, H, K, V):
  _check(B, T, H, K, V)


def test_interpret_matches_reference_d128():
  _check(1, 100, 1, 128, 128, seed=3)


def test_interpret_wide_values():
  """V = 256: two V blocks of 128 in the output and dv kernels' loops and in
  dq/dk/d log_g's V sums (``mosaic_gpu.v_block``), four 64-row programs in
  the state passes."""
  _check(1, 64, 1, 64, 256, seed=8)


@pytest.mark.slow
@pytest.mark.parametrize("T, K, V", [
    (128, 64, 512),  # four V blocks, two chunks
    (100, 128, 512),  # K = 128: two dq/dk/d log_g programs per chunk
    (70, 40, 200),  # V padded to 256, K to 64
])
def test_interpret_wide_values_slow(T, K, V):
  _check(1, T, 1, K, V, seed=9)


@pytest.mark.slow
def test_interpret_documents_wide_values():
  """Packed documents with two V blocks: every mask applies in each block
  (A and the state terms are cut once, before the V loop or after the V
  sums)."""
  _check_documents(64, 256, gate_scale=0.125, seed=4)


@pytest.mark.parametrize("gate", ["head", "none"])
def test_interpret_gate_forms(gate):
  """Per-head gates, and no gate (zeros [B, T, H] from the api), reach the
  kernels' head-gate forms as [B, T, H] arrays."""
  _check(1, 80, 2, 64, 64, gate=gate, seed=5)


# ----------------------------------------------------------- head gates ---
# One gate per head [B, T, H] (Mamba-2, RetNet, Lightning): each kernel's
# head-gate form reads a [1, C] row of gate sums per chunk, forms A as
# (q k^T) exp(b_t - b_s), and sums d log_g over the key columns inside the
# kernel (over the key blocks outside). Outputs, h_T and the gradients of q,
# k, v, the [B, T, H] gates and h0 against the float32 reference.


@pytest.mark.parametrize("B, T, H, K, V, log_g_value, gate_scale", [
    # T % 64 != 0, K != V, K = 128: two key blocks whose d log_g shares add up
    (1, 150, 2, 128, 64, None, 1.0),
    # V = 256: two V blocks, T % 64 != 0; weak decay (about -1 a chunk), so
    # the state terms (d log_g's exp(b_C) sum S dS among them) count
    (1, 100, 1, 64, 256, None, 0.125),
    # -5 per token overflows any exp(-b) within a chunk, -50 also every
    # cross-chunk term: A's exponents must all be <= 0, d log_g must not be
    # the rounding noise of cancelling O(1) terms
    (1, 140, 1, 64, 128, -5.0, 1.0),
    (1, 140, 1, 64, 128, -50.0, 1.0),
], ids=["T150-K128-V64", "T100-V256-weak", "decay5", "decay50"])
def test_interpret_head_gates(B, T, H, K, V, log_g_value, gate_scale):
  _check(B, T, H, K, V, gate="head", log_g_value=log_g_value,
         gate_scale=gate_scale, seed=11)


def test_interpret_head_gates_fp16():
  _check(1, 90, 1, 64, 64, gate="head", dtype=jnp.float16, seed=12)


@pytest.mark.slow
@pytest.mark.parametrize("T, K, V", [
    (128, 64, 512),  # four V blocks, two chunks
    (70, 40, 200),  # K padded to 64, V to 256
])
def test_interpret_head_gates_wide_values_slow(T, K, V):
  _check(1, T, 1, K, V, gate="head", seed=13)


def test_interpret_head_gates_documents():
  """Packed documents with head gates, K = 128 (two key blocks), weak decay
  (a term a mask should cut is as large as the kept ones): every mask of
  the head-gate forms, against each document run alone."""
  _check_documents(128, 64, gate="head", gate_scale=0.125, seed=5)


@pytest.mark.parametrize("log_g_value", [
    -5.0, pytest.param(-50.0, marks=pytest.mark.slow)])
def test_interpret_head_gates_documents_strong_decay(log_g_value):
  _check_documents(64, 64, gate="head", log_g_value=log_g_value, seed=6)


@pytest.mark.slow
def test_interpret_head_gates_documents_wide_values():
  _check_documents(64, 256, gate="head", gate_scale=0.125, seed=7)


def test_interpret_head_gates_documents_through_api():
  """segment_ids with head gates through the public op, against the
  reference with the same segment_ids."""
  x = make_inputs(8, 2, 100, 1, 64, 64, gate="head", dtype=jnp.bfloat16)
  ids = jnp.asarray(np.stack([np.repeat([1, 2, 3], [30, 5, 65]),
                              np.repeat([4, 5], [64, 36])]).astype(np.int32))
  harness.check_against_reference(
      functools.partial(gla, segment_ids=ids), IMPL, 64, x,
      jax.random.key(9), interpret=INTERPRET)


def test_head_gates_are_never_widened_to_K():
  """Forward and backward through the public op with [B, T, H] gates and
  documents, bf16: the jaxpr has no broadcast of a [B, T, H] array to float32
  [B, T, H, K] (``test_gla.gate_broadcasts``) and the module lowered for
  CUDA no float32 [B, T', H, K'] or [B, H, T', K'] tensor at all (T' in T,
  Tp; K' in K, Kp), for the gates or their gradient; with per-channel gates
  it has them, which shows the check sees one."""
  B, T, Tp, H, K, Kp, V = 1, 130, 192, 2, 96, 128, 64  # distinct sizes
  ids = jnp.broadcast_to(jnp.arange(T) * 3 // T, (B, T)).astype(jnp.int32)

  def vjp(q, k, v, log_g, h0, do, dh):
    (o, h_t), pullback = jax.vjp(
        lambda *a: gla(*a[:4], h0=a[4], impl=IMPL, segment_ids=ids),
        q, k, v, log_g, h0)
    return o, h_t, pullback((do, dh))

  def lowered_text(gate):
    return cuda_targets.lower_for_cuda(
        vjp, *_structs(K, jnp.bfloat16, B=B, T=T, H=H, V=V, gate=gate)
    ).as_text()

  jaxpr = jax.make_jaxpr(vjp)(
      *_structs(K, jnp.bfloat16, B=B, T=T, H=H, V=V, gate="head")).jaxpr
  for width in (K, Kp):
    assert not gate_broadcasts(jaxpr, [(B, T, H), (B, Tp, H)], width)
  assert _gate_sized_f32(lowered_text("head"), B, T, Tp, H, K, Kp) == []
  assert _gate_sized_f32(lowered_text("channel"), B, T, Tp, H, K, Kp)


def test_documents_through_api_and_auto_takes_mosaic_gpu(monkeypatch):
  """The api passes segment_ids to the kernels (one document per row equals
  none), and "auto" on Hopper picks Mosaic GPU with and without them."""
  x = make_inputs(0, 1, 16, 1, 64, 64, dtype=jnp.bfloat16)
  ids = jnp.ones((1, 16), jnp.int32)
  numerics.assert_trees_close(
      gla(**x, impl=IMPL, segment_ids=ids, interpret=True),
      gla(**x, impl=IMPL, interpret=True),
      rtol=numerics.TOLERANCES[("invariant", "float32")], names=("o", "h_T"))
  from lsm.ops import _dispatch  # pylint: disable=g-import-not-at-top
  with _dispatch.assume_platform("gpu", "hopper"):
    for docs in (ids, None):
      call = _dispatch.Call.of(jnp.bfloat16, 64, 64, 64, "channel",
                               docs is not None)
      assert segments.resolve("gla", "auto", gla_api._ACCEPTS, call, docs, 1,
                              16)[0] == IMPL



@pytest.mark.parametrize("K, V, want", [
    (128, 128, IMPL), (64, 64, IMPL), (128, 512, IMPL), (64, 256, IMPL),
    (100, 400, IMPL),
    # K = 256: wider than the Mosaic GPU kernels take, to Triton on Hopper
    (256, 512, "pallas_triton"), (256, 256, "pallas_triton"),
    (256, 64, "pallas_triton"),
    # V past 512: past Triton's limit too
    (128, 1024, "chunked")])
def test_auto_on_hopper_sends_wide_heads_to_triton(K, V, want):
  from lsm.ops import _dispatch  # pylint: disable=g-import-not-at-top
  with _dispatch.assume_platform("gpu", "hopper"):
    call = _dispatch.Call.of(jnp.bfloat16, K, V, 64, "channel", False)
    assert _dispatch.resolve("gla", "auto", gla_api._ACCEPTS, call) == want

# Packed rows (T = 150: chunks [0, 64), [64, 128), [128, 150) padded to 192):
# row 0 has a document start at a chunk's last token (63), a 1-token document,
# a start at a chunk's first token (64) and a document crossing the edge at
# 128; row 1 has several starts in one chunk (20, 21, 62) and a document
# crossing both edges. Row 1's third document ends two tokens before the
# chunk edge, so its last tokens would reach the outgoing state with weights
# near 1 if the tail mask were missing (a document ending far from the edge
# would hide that behind the decay).
DOC_LENGTHS = ((63, 1, 86), (20, 1, 41, 88))
DOC_T = 150


def _doc_ids(lengths=DOC_LENGTHS):
  return jnp.asarray(np.stack([np.repeat(np.arange(1, len(row) + 1), row)
                               for row in lengths]).astype(np.int32))


def _alone(x, scale, lengths=DOC_LENGTHS):
  """Each document run alone by the float32 reference from a zero state (h0
  for a row's first document): outputs concatenated, final state of each
  row's last document."""
  outs, finals = [], []
  for row, row_lengths in enumerate(lengths):
    start, pieces = 0, []
    for i, n in enumerate(row_lengths):
      doc = {name: val[row:row + 1] if name == "h0" else
             val[row:row + 1, start:start + n] for name, val in x.items()}
      if i:
        doc["h0"] = jnp.zeros_like(doc["h0"])
      o, h_t = gla(doc["q"], doc["k"], doc["v"], doc["log_g"], h0=doc["h0"],
                   scale=scale, impl="reference")
      pieces.append(o)
      start += n
    outs.append(jnp.concatenate(pieces, axis=1))
    finals.append(h_t)
  return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)


def _check_documents(K, V, *, log_g_value=None, gate_scale=1.0, seed=0,
                     interpret=INTERPRET, gate="channel"):
  """A packed bf16 batch (``DOC_LENGTHS``) through the kernels equals each
  document run alone with the float32 reference: o, h_T and the gradients
  of q, k, v, log_g and h0. ``gate_scale`` multiplies the log gates;
  ``gate``: "channel" [B, T, H, K] or "head" [B, T, H] gates."""
  B = len(DOC_LENGTHS)
  x = make_inputs(seed, B, DOC_T, 1, K, V, dtype=jnp.bfloat16,
                  log_g_value=log_g_value, gate=gate)
  x["log_g"] = x["log_g"].astype(jnp.float32) * gate_scale
  scale = K ** -0.5
  resets = segments.resets(_doc_ids())
  cts = harness.cotangents(jax.random.key(seed + 1), x["v"].shape,
                           jnp.bfloat16, x["h0"].shape)

  def packed(x):
    return mgpu_gla.gla(x["q"], x["k"], x["v"], x["log_g"], h0=x["h0"],
                        scale=scale, interpret=interpret, resets=resets)

  def run(f, x, cts):
    (o, h_t), pull = jax.vjp(f, x)
    return o, h_t, pull(cts)[0]

  got = jax.jit(functools.partial(run, packed))(x, cts)
  alone = functools.partial(_alone, scale=scale)
  want = jax.jit(functools.partial(run, alone))(
      {n: a.astype(jnp.float32) for n, a in x.items()},
      tuple(c.astype(jnp.float32) for c in cts))
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
  names = sorted(x)
  numerics.assert_outputs_close(
      (got[0], got[1], *(got[2][n] for n in names)),
      (want[0], want[1], *(want[2][n] for n in names)),
      impl=IMPL, dtype=jnp.bfloat16,
      names=["o", "h_t", *(f"d{n}" for n in names)])


def test_interpret_documents_equal_documents_alone():
  """K = 128 (both key-column halves of the state passes, two dq/dk/d log_g
  programs), V = 64. Weak decay (the usual gates / 8, about 1.2 nats per
  chunk): a term a mask should cut would be as large as the kept ones, so
  leaving out any one mask fails this test (each was checked so, by hand)."""
  _check_documents(128, 64, gate_scale=0.125)


def test_interpret_documents_strong_decay():
  """log_g = -5 per token with documents: the masks must cut terms, never
  gate them (an exp(-b) split would overflow here)."""
  _check_documents(64, 64, log_g_value=-5.0, seed=3)


@pytest.mark.parametrize("log_g_value", [-5.0, -50.0])
def test_interpret_strong_decay(log_g_value):
  """-5 per token overflows exp(-b) within a chunk, -50 also within a
  sub-chunk: the diagonal blocks must be formed in log space, and d log_g must
  not be the rounding noise of cancelling O(1) terms."""
  _check(1, 140, 1, 64, 64, log_g_value=log_g_value, seed=2)


def test_interpret_matches_reference_fp16():
  """float16 goes through the same kernels (f16 wgmma operands); numerics.py's
  float16 rows are the bfloat16 bounds (float16 has finer steps and the
  kernels' rounding points are the same)."""
  _check(1, 90, 1, 64, 64, dtype=jnp.float16)


@settings(max_examples=2, deadline=None)  # each example compiles anew
@given(T=st.integers(1, 140), K=st.sampled_from([16, 64, 100, 128]),
       V=st.sampled_from([24, 64, 128]), seed=st.integers(0, 2**16))
def test_property_forward_matches_reference(T, K, V, seed):
  """Any T and head dims up to 128 (padded to 64 or 128), forward only."""
  x = make_inputs(seed, 1, T, 1, K, V, dtype=jnp.bfloat16)
  x["log_g"] = x["log_g"].astype(jnp.float32)
  o_e, h_e = _op(**{n: a.astype(jnp.float32) for n, a in x.items()},
                 impl="reference")
  o, h = jax.jit(functools.partial(_op, impl=IMPL, interpret=True))(**x)
  numerics.assert_outputs_close((o, h), (o_e, h_e), impl=IMPL,
                                dtype=jnp.bfloat16, names=("o", "h_t"))


def _kernel_calls(B=1, T=200, H=1, K=64, V=128, dtype=jnp.bfloat16,
                  docs=False, gate="channel"):
  """Each kernel's launch on consistent inputs, as zero-argument callables;
  ``docs``: in the packed-documents form (starts at 63, 64 and 164);
  ``gate="head"``: the head-gate forms ([B, Tp, H, 1] gates, as
  ``pallas_vjp`` views [B, T, H] ones)."""
  x = make_inputs(4, B, T, H, K, V, dtype=dtype, gate=gate)
  if gate == "head":
    x["log_g"] = x["log_g"][..., None]
  Tp = 64 * -(-T // 64)
  pad = lambda a: jnp.pad(a, [(0, 0), (0, Tp - T)] + [(0, 0)] * 2)  # noqa: E731
  if docs:
    ids = _doc_ids([(63, 1, 100, T - 164)] * B)
    docs = segments.kernel_docs(
        jnp.pad(segments.resets(ids), ((0, 0), (0, Tp - T))), 64)
  else:
    docs = None
  q, k, v = pad(x["q"]), pad(x["k"]), pad(x["v"])
  b = mgpu_gla._gate_prefix(pad(x["log_g"].astype(jnp.float32)))
  do = pad(jax.random.normal(jax.random.key(5), x["v"].shape).astype(dtype))
  h0t = jnp.swapaxes(x["h0"], 2, 3)
  ip = plgpu.InterpretGPUParams(detect_races=True)
  kw = dict(scale=K ** -0.5, interpret=ip, docs=docs)
  state = functools.partial(mgpu_gla._state_pass, reverse=False, scale=1.0,
                            interpret=ip, docs=docs)
  dstate = functools.partial(mgpu_gla._state_pass, reverse=True,
                             scale=K ** -0.5, interpret=ip, docs=docs)
  h_in, _ = jax.jit(state)(k, v, b, h0t)
  dh_out, _ = jax.jit(dstate)(q, do, b, h0t)
  return {
      "gla_states_mgpu": lambda: jax.jit(state)(k, v, b, h0t),
      "gla_dstates_mgpu": lambda: jax.jit(dstate)(q, do, b, h0t),
      "gla_output_mgpu": lambda: jax.jit(functools.partial(
          mgpu_gla._outputs, **kw))(q, k, v, b, h_in),
      "gla_dv_mgpu": lambda: jax.jit(functools.partial(mgpu_gla._dv, **kw))(
          q, k, b, do, dh_out),
      "gla_dqkg_mgpu": lambda: jax.jit(functools.partial(mgpu_gla._dqkg, **kw))(
          q, k, b, v, do, h_in, dh_out),
  }


@pytest.mark.parametrize("docs, V, gate", [
    (False, 128, "channel"), (True, 128, "channel"),
    pytest.param(False, 256, "channel", marks=pytest.mark.slow),
    (False, 128, "head"), (True, 128, "head"),
    pytest.param(False, 256, "head", marks=pytest.mark.slow)],
    ids=["plain", "documents", "plain-V256", "head", "head-documents",
         "head-V256"])
def test_interpret_finds_no_races(docs, V, gate):
  """Each kernel once under the interpreter's happens-before race detector
  (SMEM reads and writes by the warpgroup, TMA and wgmma), with four chunks so
  the state passes cycle both buffers (and, with documents, both doc
  tiles); V = 256: the chunk kernels' V-block loops (refetch into tiles just
  read, result tiles rewritten after their TMA); head: the head-gate forms
  (operand tiles rewritten once A is formed, the gate row copied within its
  tile, the d log_g sums written and read back). Its state covers the last
  kernel run, hence one kernel at a time."""
  # pylint: disable-next=g-import-not-at-top
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  calls = _kernel_calls(V=V, docs=docs, gate=gate)
  assert set(calls) == set(mgpu_gla.KERNELS)
  for name, call in calls.items():
    jax.block_until_ready(call())
    assert not interpret_pallas_call.get_races().races_found, name


# ------------------------------------------------------------- lowering ---


def _vjp_fn(q, k, v, log_g, h0, do, dh, resets=None):
  (o, h_t), pullback = jax.vjp(
      lambda *a: mgpu_gla.gla(*a[:4], h0=a[4], scale=0.125, resets=resets),
      q, k, v, log_g, h0)
  return o, h_t, pullback((do, dh))


def _structs(D, dtype, B=1, T=130, H=2, docs=False, V=None, gate="channel"):
  """T pads to 3 chunks; K = D, V = D unless given; log_g [B, T, H, K]
  (``gate="channel"``) or [B, T, H] ("head")."""
  s = jax.ShapeDtypeStruct
  V = V or D
  kx, vx = s((B, T, H, D), dtype), s((B, T, H, V), dtype)
  state = s((B, H, D, V), jnp.float32)
  g = (B, T, H, D) if gate == "channel" else (B, T, H)
  return ([kx, kx, vx, s(g, jnp.float32), state, vx, state]
          + [s((B, T), jnp.bool_)] * docs)


_kernels = harness.mosaic_gpu_kernels


@pytest.mark.parametrize("D, dtype, docs, V", [
    (64, jnp.bfloat16, False, None), (128, jnp.bfloat16, False, None),
    (64, jnp.float16, False, None), (128, jnp.float16, False, None),
    (64, jnp.bfloat16, True, None), (128, jnp.bfloat16, True, None),
    (128, jnp.bfloat16, False, 512), (128, jnp.bfloat16, True, 512)])
def test_lowers_for_cuda(D, dtype, docs, V):
  """Forward and backward lower to Mosaic GPU custom calls without a GPU
  (target sm_90): the forward's two kernels, the backward's four (the state
  pass again, its reverse, dv, dq/dk/d log_g); and each kernel's SMEM, as the
  lowering allocates it, is ``smem_bytes``'s count and fits an H100 block.
  ``docs``: with segment_ids (the kernels' document forms); V: the value head
  dim (D unless given; 512 is four V blocks)."""
  _check_lowering(D, V or D, dtype, docs, "channel")


def _check_lowering(K, V, dtype, docs, gate):
  lowered = cuda_targets.lower_for_cuda(  # an abstract H100
      _vjp_fn, *_structs(K, dtype, docs=docs, V=V, gate=gate))
  assert lowered.as_text().count("stablehlo.custom_call @mosaic_gpu_v2") == 6
  kernels = _kernels(lowered)
  assert sorted(n for n, _ in kernels) == sorted(
      ["gla_states_mgpu", "gla_output_mgpu", "gla_states_mgpu",
       "gla_dstates_mgpu", "gla_dv_mgpu", "gla_dqkg_mgpu"])
  head = gate == "head"
  for name, size in kernels:
    assert size == mgpu_gla.smem_bytes(name, K, V, dtype, docs=docs,
                                       head=head), name
    assert size <= H100_SMEM, (name, size)
    if head:  # the head-gate forms hold no [C, K] gate tiles
      assert size < mgpu_gla.smem_bytes(name, K, V, dtype, docs=docs), name


@pytest.mark.parametrize("K, V, dtype, docs", [
    (64, 64, jnp.bfloat16, False), (128, 128, jnp.bfloat16, True),
    (128, 512, jnp.float16, False), (128, 512, jnp.bfloat16, True)])
def test_lowers_for_cuda_with_head_gates(K, V, dtype, docs):
  """The head-gate forms ([B, T, H] gates: a [1, C] gate row per chunk, the
  d log_g shares as [1, C] rows) lower to the same six Mosaic GPU custom
  calls, forward and backward, and each kernel's SMEM, as the lowering
  allocates it, is ``smem_bytes(..., head=True)``'s count, below the
  per-channel form's."""
  _check_lowering(K, V, dtype, docs, "head")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("V", [64, 128, 256, 512])
def test_smem_fits_h100(K, V, dtype):
  """Every kernel's SMEM footprint, summed from its scratch shapes (each
  allocation rounded to 1 KiB, barriers, reduction scratch), fits the H100's
  per-block limit at every padded head-dim pair, V blocks included (past
  V = 128 the chunk kernels' tiles stay at 128 value columns); the head-gate
  forms below their per-channel forms."""
  for name in mgpu_gla.KERNELS:
    for docs in (False, True):
      for head in (False, True):
        size = mgpu_gla.smem_bytes(name, K, V, dtype, docs=docs, head=head)
        assert 0 < size <= H100_SMEM, (name, K, V, docs, head, size)
        if V > 128:
          assert size == mgpu_gla.smem_bytes(name, K, 128, dtype, docs=docs,
                                             head=head)
      assert (mgpu_gla.smem_bytes(name, K, V, dtype, docs=docs, head=True)
              < mgpu_gla.smem_bytes(name, K, V, dtype, docs=docs))


# --------------------------------------------------------------- limits ---


@pytest.mark.parametrize("change, match", harness.MOSAIC_GPU_BAD_INPUTS)
def test_unsupported_input_raises(change, match):
  x = harness.mosaic_gpu_bad_inputs(make_inputs, change)
  with pytest.raises(ValueError,
                     match=r"gla: impl='pallas_mosaic_gpu' " + match):
    mgpu_gla.gla(x["q"], x["k"], x["v"], x["log_g"].astype(jnp.float32),
                 h0=x["h0"], scale=0.1, chunk_size=change.get("chunk_size", 64),
                 interpret=True)


# -------------------------------------------------------------- devices ---


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_kernels_match_reference(D, dtype):
  _check(2, 200, 4, D, D, dtype=dtype, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("log_g_value", [-5.0, -50.0])
def test_gpu_strong_decay(log_g_value):
  _check(1, 500, 2, 64, 64, interpret=False, log_g_value=log_g_value)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_documents(D):
  _check_documents(D, D, gate_scale=0.125, interpret=False)


@pytest.mark.gpu
def test_gpu_long_sequence_k_ne_v():
  _check(1, 1000, 2, 128, 64, interpret=False, seed=7)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_head_gates(D):
  _check(2, 200, 4, D, D, gate="head", interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("log_g_value", [-5.0, -50.0])
def test_gpu_head_gates_strong_decay(log_g_value):
  _check(1, 500, 2, 64, 128, gate="head", log_g_value=log_g_value,
         interpret=False)


@pytest.mark.gpu
def test_gpu_head_gates_documents():
  _check_documents(128, 64, gate="head", gate_scale=0.125, interpret=False)
