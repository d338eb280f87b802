"""Pallas delta-rule kernels (pallas_triton, pallas_tpu) against the float32
reference in interpret mode on CPU, lowering checks for CUDA (Triton) and TPU
(Mosaic) without hardware, shape limits, and real-device runs marked gpu / tpu.

Kept small: the whole file must run in well under a minute on 2 CPU cores. Both
impls share their per-chunk math (``chunk_tiles``), so the awkward cases run on
the GPU kernels and the TPU kernels get their plumbing checked at two shapes.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from lsm.ops.common import cuda_targets
from lsm.ops.delta_rule import delta_rule
from tests.ops import harness
from tests.ops.test_delta_rule import make_inputs

# (B, T, H, K, V, chunk). Cases share shapes so that they share compiles: an
# ungated run is log_g = 0, which is what the public op passes for None.
SHAPES = {
    # T not a multiple of the chunk, K != V, V padded to 128: two V blocks on GPU
    "T63_KneV": (2, 63, 2, 16, 72, 16),
    "TltC": (1, 40, 1, 32, 16, 64),  # T shorter than one chunk
    # K padded to 128: two key blocks in the GPU kernels
    "K80": (1, 70, 1, 80, 72, 32),
    # the widest V the kernels take, K != V, T % C != 0
    "Vwide": (1, 40, 1, 32, 512, 32),
    # the widest heads (K 256, V 512), two chunks of 64 (T % C != 0): four
    # key blocks and four 16-token blocks in the float32 kernels
    "K256_V512": (1, 120, 1, 256, 512, 64),
}


def _check(impl, shape, *, interpret=True, seed=0, dtype=jnp.float32, **kwargs):
  *dims, chunk = SHAPES[shape] if isinstance(shape, str) else shape
  primals = make_inputs(seed, *dims, dtype=dtype, **kwargs)
  harness.check_against_reference(delta_rule, impl, chunk, primals,
                                  jax.random.key(seed + 1),
                                  interpret=interpret)


@pytest.mark.parametrize("kwargs", [
    dict(beta_max=2.0),  # gated, negative eigenvalues
    dict(beta_max=1.0, log_g_value=0.0),  # ungated
    dict(beta_max=2.0, log_g_value=-5.0),  # strong decay
], ids=["gated-beta02", "ungated-beta01", "decay5-beta02"])
def test_gpu_interpret_matches_reference_fp32(kwargs):
  _check("pallas_triton", "T63_KneV", **kwargs)


def test_gpu_interpret_matches_reference_two_key_blocks():
  _check("pallas_triton", "K80", beta_max=2.0)


def test_gpu_interpret_matches_reference_bf16():
  """bf16, and T < C: the padding is dtype-blind, and a padding bug would be an
  O(1) error, far above the bf16 tolerance."""
  _check("pallas_triton", "TltC", beta_max=2.0, dtype=jnp.bfloat16)


# 32 value blocks of 16 columns per chunk: about as long as the cases above;
# the float32 one runs with -m slow.
@pytest.mark.parametrize("dtype", [
    pytest.param(jnp.float32, marks=pytest.mark.slow), jnp.bfloat16],
    ids=["fp32", "bf16"])
def test_gpu_interpret_wide_values(dtype):
  """V = 512 (the widest accepted) with K = 32: bf16 operands enter every
  matmul in bf16 and still meet the bf16 rows; float32 stays exact."""
  _check("pallas_triton", "Vwide", beta_max=2.0, dtype=dtype)


@pytest.mark.parametrize("kwargs", [
    dict(beta_max=2.0),  # gated, negative eigenvalues
    dict(beta_max=2.0, log_g_value=0.0),  # ungated: every token reaches h0
], ids=["gated-beta02", "ungated-beta02"])
def test_gpu_interpret_widest_heads_fp32(kwargs):
  """K 256, V 512 in float32: the float32 paths of _output and _state_grads
  (16-key and 16-token products, key blocks picked in loops) against the
  float32 reference on o, h_T and every gradient."""
  _check("pallas_triton", "K256_V512", **kwargs)


@pytest.mark.slow
def test_gpu_interpret_wide_values_with_documents():
  """V = 512 on packed rows (three documents, starts inside chunks)."""
  import functools  # pylint: disable=g-import-not-at-top
  *dims, chunk = SHAPES["Vwide"]
  T = dims[1]
  ids = jnp.broadcast_to(jnp.arange(T) * 3 // T, (dims[0], T)).astype(jnp.int32)
  harness.check_against_reference(
      functools.partial(delta_rule, segment_ids=ids), "pallas_triton", chunk,
      make_inputs(4, *dims, beta_max=2.0, dtype=jnp.bfloat16),
      jax.random.key(5), interpret=True)



def test_gpu_interpret_documents_fp32():
  """float32 on packed rows (three documents, starts inside chunks), two
  chunks: the float32 path of _wy_grads forms M's [C, 16] and [16, C] blocks
  itself, cut by the documents (``_gate_block``)."""
  import functools  # pylint: disable=g-import-not-at-top
  B, T, H, K, V, chunk = 1, 40, 1, 16, 16, 32
  ids = jnp.broadcast_to(jnp.arange(T) * 3 // T, (B, T)).astype(jnp.int32)
  harness.check_against_reference(
      functools.partial(delta_rule, segment_ids=ids), "pallas_triton", chunk,
      make_inputs(6, B, T, H, K, V, beta_max=2.0), jax.random.key(7),
      interpret=True)


@pytest.mark.slow  # about 20-40 s
def test_tpu_interpret_wide_values_bf16():
  """V = 512 in bf16 with TPU semantics (16-bit matmul operands)."""
  _check("pallas_tpu", "Vwide", interpret=pltpu.InterpretParams(),
         beta_max=2.0, dtype=jnp.bfloat16)

def test_tpu_interpret_params_matches_reference():
  """TPU semantics emulated: uninitialised scratch is NaN, so a read of the
  carried state before its first write would fail here."""
  _check("pallas_tpu", (1, 20, 1, 16, 24, 16), interpret=pltpu.InterpretParams(),
         beta_max=2.0)


def test_tpu_interpret_matches_reference():
  _check("pallas_tpu", "T63_KneV", beta_max=2.0)


# ------------------------------------------------------------- lowering ---

# pallas_triton's backward state_grads is two kernels and its input_grads four
# (see its docstring).
KERNELS = ("prepare", "states", "output", "intra", "state_grads",
           "value_grads", "key_grads", "wy_scalars", "wy_grads")


def _three_documents(q):
  """int [B, T] ids: three documents per row, starts inside chunks."""
  T = q.shape[1]
  return jnp.broadcast_to(jnp.arange(T) * 3 // T, q.shape[:2]).astype(jnp.int32)


def _vjp_fn(impl, chunk_size=64, documents=False):
  def f(q, k, v, beta, log_g, h0, do, dh):
    ids = _three_documents(q) if documents else None
    (o, h), pullback = jax.vjp(
        lambda *a: delta_rule(*a[:4], log_g=a[4], h0=a[5], impl=impl,
                              chunk_size=chunk_size, segment_ids=ids),
        q, k, v, beta, log_g, h0)
    return o, h, pullback((do, dh))
  return f


def _fwd_fn(impl, chunk_size=64):
  def f(q, k, v, beta, log_g, h0):
    return delta_rule(q, k, v, beta, log_g=log_g, h0=h0, impl=impl,
                      chunk_size=chunk_size)
  return f


def _structs(K, dtype, V=None, B=1, T=128, H=2):
  s = jax.ShapeDtypeStruct
  V = K if V is None else V
  return ([s((B, T, H, K), dtype)] * 2 + [s((B, T, H, V), dtype)]
          + [s((B, T, H), jnp.float32)] * 2
          + [s((B, H, K, V), jnp.float32), s((B, T, H, V), dtype),
             s((B, H, K, V), jnp.float32)])


@pytest.mark.parametrize("target", sorted(cuda_targets.TARGETS))
@pytest.mark.parametrize("K, V, dtype", [
    (64, 64, jnp.bfloat16), (128, 128, jnp.bfloat16),
    # the widest heads (Gated DeltaNet at d_model 2048)
    (256, 512, jnp.bfloat16), (256, 512, jnp.float32)])
def test_gpu_lowers_for_cuda(K, V, dtype, target):
  """Forward and backward kernels lower through Triton for an A100 and an H100
  (no GPU needed; an abstract device on jax >= 0.11)."""
  text = cuda_targets.lower_for_cuda(_vjp_fn("pallas_triton"),
                                     *_structs(K, dtype, V),
                                     target=target).as_text()
  for name in KERNELS:
    assert f"delta_rule_{name}" in text, name
  # forward: prepare, states, output; backward: prepare, states, intra,
  # state_grads and the four input-gradient kernels
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 11


@pytest.mark.parametrize("target", sorted(cuda_targets.TARGETS))
def test_gpu_lowers_for_cuda_with_documents(target):
  """The kernels with their document masks (segment_ids) lower too."""
  text = cuda_targets.lower_for_cuda(_vjp_fn("pallas_triton", documents=True),
                                     *_structs(128, jnp.bfloat16),
                                     target=target).as_text()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 11


@pytest.mark.parametrize("K, V, dtype, documents", [
    (64, 64, jnp.bfloat16, False), (128, 128, jnp.bfloat16, False),
    (128, 128, jnp.bfloat16, True), (256, 512, jnp.bfloat16, False),
    (256, 512, jnp.float32, False)])
def test_tpu_lowers_for_mosaic(K, V, dtype, documents):
  """Forward and backward kernels lower through Mosaic (no TPU needed), with
  the document masks too, up to the widest heads (K 256, V 512)."""
  args = _structs(K, dtype, V)
  # forward: prepare, states, output; backward: prepare, states, state_grads,
  # input_grads (T and h_in recomputed, see pallas_vjp).
  for f, a, n in ((_fwd_fn("pallas_tpu"), args[:6], 3),
                  (_vjp_fn("pallas_tpu", documents=documents), args, 7)):
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*a)
    assert exported.mlir_module().count("tpu_custom_call") == n


# ------------------------------------------------------------- limits ---


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("K, chunk_size, match", [
    (16, 48, r"chunk_size in \(16, 32, 64, 128\).*chunk_size=48"),
    (300, 64, r"K up to 256; got K .* = 300"),
])
def test_unsupported_shape_raises(impl, K, chunk_size, match):
  qk, v, beta = jnp.zeros((1, 8, 1, K)), jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1))
  with pytest.raises(ValueError, match=match):
    delta_rule(qk, qk, v, beta, impl=impl, chunk_size=chunk_size, interpret=True)


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_values_up_to_512(impl):
  """V is taken in blocks, so it may be wider than K: up to 512, and a wider
  one raises naming the limit."""
  from lsm.ops.delta_rule import api as delta_api  # pylint: disable=g-import-not-at-top
  assert delta_api._MODULES[impl].ACCEPTS.max_v == 512
  qk, v, beta = (jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1, 640)),
                 jnp.zeros((1, 8, 1)))
  with pytest.raises(ValueError, match=r"supports V up to 512; got V \(value "
                                       r"head dim\) = 640"):
    delta_rule(qk, qk, v, beta, impl=impl, interpret=True)


def test_interpret_with_a_non_pallas_impl_raises():
  qk, v, beta = jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1))
  with pytest.raises(ValueError, match=r"interpret=True applies to the Pallas "
                                       r"impls only; impl resolved to 'chunked'"):
    delta_rule(qk, qk, v, beta, impl="chunked", interpret=True)


# ------------------------------------------------------------- devices ---

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_gpu_kernels_match_reference(dtype):
  _check("pallas_triton", (2, 200, 4, 64, 64, 64), interpret=False, beta_max=2.0,
         dtype=dtype)


@pytest.mark.tpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_tpu_kernels_match_reference(dtype):
  _check("pallas_tpu", (2, 200, 4, 128, 128, 64), interpret=False, beta_max=2.0,
         dtype=dtype)
