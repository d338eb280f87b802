"""The delta rule on Mosaic GPU (``lsm.ops.delta_rule.pallas_mosaic_gpu``):
against the float32 reference in the Mosaic GPU interpreter on CPU (outputs,
h_T, gradients of q, k, v, beta, log_g and h0; DeltaNet and Gated DeltaNet,
beta up to 2), a race-detecting run of every kernel, lowering for CUDA without
a GPU (forward and backward, both head dims) with each kernel's SMEM checked
against ``smem_bytes`` and the H100 limit, input limits, and real-device runs
marked gpu.

The impl is called through ``_op``, which does what ``api.delta_rule`` does
for it (float32 beta and log_g, zero log_g for DeltaNet, scale K^-1/2), so
these tests do not depend on the impl being wired into the api. Shapes are
small: the interpreter runs each grid point of each kernel in turn.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import mosaic_gpu as plgpu

from lsm.ops.common import cuda_targets
from lsm.ops.delta_rule import delta_rule
from lsm.ops.delta_rule import pallas_mosaic_gpu as mgpu
from tests import numerics
from tests.ops import harness
from tests.ops.test_delta_rule import make_inputs

IMPL = "pallas_mosaic_gpu"
H100_SMEM = cuda_targets.TARGETS["h100"].smem_per_block  # 232,448 B


def _op(q, k, v, beta, log_g=None, h0=None, *, impl, chunk_size=64,
        interpret=False):
  """The public op (checks, defaults, scale, dispatch)."""
  kw = {} if interpret is False else {"interpret": interpret}
  return delta_rule(q, k, v, beta, log_g=log_g, h0=h0, impl=impl,
                    chunk_size=chunk_size, **kw)


def _check(B, T, H, K, V, *, dtype=jnp.bfloat16, interpret=True, seed=0,
           beta_max=2.0, **kwargs):
  primals = make_inputs(seed, B, T, H, K, V, beta_max=beta_max, dtype=dtype,
                        **kwargs)
  harness.check_against_reference(_op, IMPL, 64, primals,
                                  jax.random.key(seed + 1),
                                  interpret=interpret)


# ---------------------------------------------------------- interpreter ---


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
@pytest.mark.parametrize("B, T, H, K, V", [
    (2, 63, 1, 64, 128),  # T < C, K != V
    (1, 150, 2, 128, 64),  # three chunks (both state buffers), K != V
], ids=["T63_K64_V128", "T150_K128_V64"])
def test_interpret_matches_reference_bf16(B, T, H, K, V, gated):
  _check(B, T, H, K, V, gated=gated)


def test_interpret_matches_reference_d128():
  _check(1, 100, 1, 128, 128, seed=3)


def test_interpret_wide_values():
  """V = 256: two V blocks of 128 (the output kernel's V grid axis, the
  input-gradient kernel's V sums in float32 SMEM), four 64-row programs in
  the sequential passes."""
  _check(1, 64, 1, 64, 256, seed=8)


@pytest.mark.slow
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
@pytest.mark.parametrize("T, K, V", [
    (128, 64, 512),  # four V blocks, two chunks
    (100, 128, 512),  # K = 128
    (70, 40, 200),  # V padded to 256, K to 64
])
def test_interpret_wide_values_slow(T, K, V, gated):
  _check(1, T, 1, K, V, seed=9, gated=gated)


def test_interpret_padded_head_dims():
  """K = 40, V = 96 go to 64 and 128 with inert zero channels."""
  _check(1, 70, 1, 40, 96, seed=4, beta_max=1.0)


@pytest.mark.parametrize("log_g_value", [-5.0, -50.0])
def test_interpret_strong_decay(log_g_value):
  """log_g = -5 per token: exp(gamma) spans e^-320 inside a chunk (-50: the
  state forgets within a token); every exponent the XLA factors form is <= 0,
  so nothing overflows."""
  _check(1, 140, 1, 64, 64, seed=2, log_g_value=log_g_value)


def test_interpret_matches_reference_fp16():
  """float16 goes through the same kernels (f16 wgmma operands); numerics.py's
  float16 rows are the bfloat16 bounds."""
  _check(1, 90, 1, 64, 64, dtype=jnp.float16, seed=6)


@settings(max_examples=2, deadline=None)  # each example compiles anew
@given(T=st.integers(1, 140), K=st.sampled_from([16, 64, 100, 128]),
       V=st.sampled_from([24, 64, 128]), gated=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_forward_matches_reference(T, K, V, gated, seed):
  """Any T and head dims up to 128, forward only."""
  x = make_inputs(seed, 1, T, 1, K, V, beta_max=2.0, gated=gated,
                  dtype=jnp.bfloat16)
  o_e, h_e = _op(**{n: a.astype(jnp.float32) for n, a in x.items()},
                 impl="reference")
  o, h = jax.jit(functools.partial(_op, impl=IMPL, interpret=True))(**x)
  numerics.assert_outputs_close((o, h), (o_e, h_e), impl=IMPL,
                                dtype=jnp.bfloat16, names=("o", "h_t"))


def _kernel_calls(BH=1, N=4, K=64, V=128, dtype=jnp.bfloat16):
  """Each kernel's launch on random operands of the kernel layout, as
  zero-argument callables under the race detector (values do not matter for
  races; N = 4 chunks cycle both buffers of the sequential passes)."""
  Tp = N * 64
  ks = iter(jax.random.split(jax.random.key(7), 16))

  def rand(*shape, dt=dtype):
    return jax.random.normal(next(ks), shape).astype(dt)

  ip = plgpu.InterpretGPUParams(detect_races=True)
  wk, ko, qs = rand(BH, Tp, K), rand(BH, Tp, K), rand(BH, Tp, K)
  wv = rand(BH, Tp, V, dt=jnp.float32)
  a, do = rand(BH, Tp, 64), rand(BH, Tp, V)
  dec = jnp.full((BH, N, K), 0.5, jnp.float32)
  h0t = rand(BH, V, K, dt=jnp.float32)
  hs, u, du = rand(BH, N, V, K), rand(BH, Tp, V), rand(BH, Tp, V)
  gs = rand(BH, N, V, K)

  def call(f, *x):
    return lambda: jax.jit(functools.partial(f, interpret=ip))(*x)

  return {
      "delta_rule_states_mgpu": call(mgpu._states_call, wk, wv, ko, dec, h0t),
      "delta_rule_output_mgpu": call(mgpu._output_call, qs, a, u, hs),
      "delta_rule_state_grads_mgpu": call(mgpu._state_grads_call, ko, qs, wk,
                                          a, do, dec, h0t),
      "delta_rule_input_grads_mgpu": call(mgpu._input_grads_call, do, u, du,
                                          hs, gs),
  }


@pytest.mark.parametrize("V", [128, pytest.param(256, marks=pytest.mark.slow)])
def test_interpret_finds_no_races(V):
  """Each kernel once under the interpreter's happens-before race detector
  (SMEM reads and writes by the warpgroup, TMA and wgmma); V = 256: the
  input-gradient kernel's V-block loop (refetch into tiles just read, sums
  in SMEM). Its state covers the last kernel run, hence one kernel at a
  time."""
  # pylint: disable-next=g-import-not-at-top
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  calls = _kernel_calls(V=V)
  assert set(calls) == set(mgpu.KERNELS)
  for name, call in calls.items():
    jax.block_until_ready(call())
    assert not interpret_pallas_call.get_races().races_found, name


# ------------------------------------------------------------- lowering ---


def _vjp_fn(q, k, v, beta, log_g, h0, do, dh):
  (o, h_t), pullback = jax.vjp(
      lambda *a: mgpu.delta_rule(*a[:5], h0=a[5], scale=0.125),
      q, k, v, beta, log_g, h0)
  return o, h_t, pullback((do, dh))


def _structs(D, dtype, B=1, T=130, H=2, V=None):
  """T pads to 3 chunks; K = D, V = D unless given."""
  s = jax.ShapeDtypeStruct
  V = V or D
  x, vx = s((B, T, H, D), dtype), s((B, T, H, V), dtype)
  per_head = s((B, T, H), jnp.float32)
  state = s((B, H, D, V), jnp.float32)
  return [x, x, vx, per_head, per_head, state, vx, state]


_kernels = harness.mosaic_gpu_kernels


@pytest.mark.parametrize("D, V", [(64, 64), (128, 128), (128, 512)])
def test_lowers_for_cuda(D, V):
  """Forward and backward lower to Mosaic GPU custom calls without a GPU
  (target sm_90): the forward's two kernels, the backward's three (the state
  pass again, its reverse, the chunk gradients); and each kernel's SMEM, as
  the lowering allocates it, is ``smem_bytes``'s count and fits an H100
  block. K = D; V = 512 is four V blocks."""
  dtype = jnp.bfloat16
  lowered = cuda_targets.lower_for_cuda(
      _vjp_fn, *_structs(D, dtype, V=V))  # an abstract H100
  assert lowered.as_text().count("stablehlo.custom_call @mosaic_gpu_v2") == 5
  kernels = _kernels(lowered)
  assert sorted(n for n, _ in kernels) == sorted(
      ["delta_rule_states_mgpu", "delta_rule_output_mgpu",
       "delta_rule_states_mgpu", "delta_rule_state_grads_mgpu",
       "delta_rule_input_grads_mgpu"])
  for name, size in kernels:
    assert size == mgpu.smem_bytes(name, D, V, dtype), name
    assert size <= H100_SMEM, (name, size)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("V", [64, 128, 256, 512])
def test_smem_fits_h100(K, V, dtype):
  """Every kernel's SMEM footprint, summed from its scratch shapes (each
  allocation rounded to 1 KiB, barriers), fits the H100's per-block limit at
  every padded head-dim pair, V blocks included (past V = 128 the chunk
  kernels' tiles stay at 128 value columns; the input-gradient kernel adds
  its float32 V-sum tiles once, at V >= 256)."""
  for name in mgpu.KERNELS:
    size = mgpu.smem_bytes(name, K, V, dtype)
    assert 0 < size <= H100_SMEM, (name, K, V, size)
    if V > 256:
      assert size == mgpu.smem_bytes(name, K, 256, dtype)


# ------------------------------------------------------------ documents ---

# Per row: a 1-token document, starts at a chunk's last (63) and first (64)
# token, several starts in one chunk, documents across chunk edges; T = 150.
DOC_LENGTHS = ((63, 1, 86), (20, 1, 41, 88))
DOC_T = 150


def _alone(x, lengths=DOC_LENGTHS):
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
      o, h_t = _op(**doc, impl="reference")
      pieces.append(o)
      start += n
    outs.append(jnp.concatenate(pieces, axis=1))
    finals.append(h_t)
  return jnp.concatenate(outs, axis=0), jnp.concatenate(finals, axis=0)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
def test_interpret_documents_equal_documents_alone(gated):
  """A packed bf16 batch through the kernels (segment_ids through the api)
  equals each document run alone with the float32 reference: o, h_T and the
  gradients of q, k, v, beta, log_g and h0; beta in [0, 2]. The gates are
  weak (log_g / 8) so a term a mask should cut is as large as the kept ones."""
  x = make_inputs(7, len(DOC_LENGTHS), DOC_T, 1, 64, 64, beta_max=2.0,
                  gated=gated, dtype=jnp.bfloat16)
  if gated:
    x["log_g"] = x["log_g"].astype(jnp.float32) * 0.125
  ids = jnp.asarray(np.stack([np.repeat(np.arange(1, len(r) + 1), r)
                              for r in DOC_LENGTHS]).astype(np.int32))
  cts = harness.cotangents(jax.random.key(8), x["v"].shape, jnp.bfloat16,
                           x["h0"].shape)

  def packed(x):
    return delta_rule(x["q"], x["k"], x["v"], x["beta"], log_g=x.get("log_g"),
                      h0=x["h0"], impl=IMPL, chunk_size=64, interpret=True,
                      segment_ids=ids)

  def run(f, x, cts):
    (o, h_t), pull = jax.vjp(f, x)
    return o, h_t, pull(cts)[0]

  got = jax.jit(functools.partial(run, packed))(x, cts)
  want = jax.jit(functools.partial(run, _alone))(
      {n: a.astype(jnp.float32) for n, a in x.items()},
      tuple(c.astype(jnp.float32) for c in cts))
  names = sorted(x)
  numerics.assert_outputs_close(
      (got[0], got[1], *(got[2][n] for n in names)),
      (want[0], want[1], *(want[2][n] for n in names)), impl=IMPL,
      dtype=jnp.bfloat16, names=["o", "h_t", *(f"d{n}" for n in names)])


# --------------------------------------------------------------- limits ---


def test_interpret_true_is_the_mosaic_gpu_interpreter():
  assert isinstance(mgpu._interpret_params(True), plgpu.InterpretGPUParams)
  assert mgpu._interpret_params(False) is None


@pytest.mark.parametrize("change, match", harness.MOSAIC_GPU_BAD_INPUTS)
def test_unsupported_input_raises(change, match):
  x = harness.mosaic_gpu_bad_inputs(make_inputs, change)
  with pytest.raises(ValueError,
                     match=r"delta_rule: impl='pallas_mosaic_gpu' " + match):
    mgpu.delta_rule(x["q"], x["k"], x["v"], x["beta"].astype(jnp.float32),
                    x["log_g"].astype(jnp.float32), h0=x["h0"], scale=0.1,
                    chunk_size=change.get("chunk_size", 64), interpret=True)


# -------------------------------------------------------------- devices ---


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_kernels_match_reference(D, dtype, gated):
  _check(2, 200, 4, D, D, dtype=dtype, interpret=False, gated=gated)


@pytest.mark.gpu
def test_gpu_strong_decay():
  _check(1, 500, 2, 64, 64, interpret=False, log_g_value=-5.0)


@pytest.mark.gpu
def test_gpu_long_sequence_k_ne_v():
  _check(1, 1000, 2, 128, 64, interpret=False, seed=7)
