"""Pallas GLA kernels (pallas_triton, pallas_tpu): against the float32 reference in
interpret mode on CPU (outputs, h_T, gradients of every input and h0), lowering
checks for CUDA (Triton) and TPU (Mosaic) without hardware, shape limits, and
real-device runs marked gpu / tpu.

Kept small: interpret mode compiles every kernel into XLA loops, and the suite
has a time budget. The GPU and TPU impls share their per-chunk math
(``chunk_tiles``), so the awkward-shape sweep runs on the GPU kernels and the TPU
kernels get their plumbing checked at two shapes.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from lsm.ops.common import cuda_targets
from lsm.ops.gla import gla
from tests import numerics
from tests.ops import harness
from tests.ops.test_gla import make_inputs

# (B, T, H, K, V, chunk): awkward on purpose.
SHAPES = {
    "T63_KneV": (2, 63, 2, 16, 24, 16),  # T % C != 0, K != V (V padded to 32)
    "T63_C64": (2, 63, 2, 16, 24, 64),  # four sub-chunks, T shorter than a chunk
    "Vsplit": (1, 70, 1, 16, 72, 32),  # V padded to 128: two V blocks on GPU
    # K padded to 128: several key blocks in every GPU kernel (states, output,
    # dv loop over them; dqkg has one program per block)
    "Ksplit": (1, 40, 1, 80, 24, 32),
    # the widest V the kernels take, K != V, T % C != 0: eight value blocks in
    # output / dv / states, sixteen steps of dqkg's value loop
    "Vwide": (1, 40, 1, 32, 512, 32),
}


def _check(impl, shape, *, interpret=True, dtype=jnp.float32, seed=0, **kwargs):
  *dims, chunk = SHAPES[shape] if isinstance(shape, str) else shape
  primals = make_inputs(seed, *dims, dtype=dtype, **kwargs)
  harness.check_against_reference(gla, impl, chunk, primals,
                                  jax.random.key(seed + 1),
                                  interpret=interpret)


# Per-channel gates reach the kernels as [B, T, H, K]; head gates and no gate
# (zeros) as [B, T, H], which the kernels read as [C, 1] columns (the
# head-gate checks are below, ``test_*_head_gates*``).
@pytest.mark.parametrize("shape, gate", [
    ("T63_KneV", "channel"),
    ("T63_C64", "head"),
    ("Vsplit", "none"),
    ("Ksplit", "channel"),
])
def test_gpu_interpret_matches_reference_fp32(shape, gate):
  _check("pallas_triton", shape, gate=gate)


@pytest.mark.parametrize("log_g_value", [-5.0, -50.0])
def test_gpu_interpret_strong_decay(log_g_value):
  """-5 per step would overflow a single pivot inside a chunk of 64; -50 also
  makes every cross-chunk term underflow, and d log_g must still match (no
  O(1) terms may cancel in it)."""
  _check("pallas_triton", (1, 200, 1, 16, 16, 64), log_g_value=log_g_value, seed=2)


def test_gpu_interpret_bf16():
  _check("pallas_triton", "T63_C64", dtype=jnp.bfloat16, gate="channel")


@pytest.mark.parametrize("dtype", [
    pytest.param(jnp.float32, marks=pytest.mark.slow),  # about 10-20 s
    jnp.bfloat16], ids=["fp32", "bf16"])
def test_gpu_interpret_wide_values(dtype):
  """V = 512 (the widest accepted) with K = 32: bf16 operands enter every
  matmul in bf16 and still meet the bf16 rows; float32 stays exact."""
  _check("pallas_triton", "Vwide", dtype=dtype, gate="channel")


@pytest.mark.slow  # about 10-20 s
def test_gpu_interpret_wide_values_with_documents():
  """V = 512 on packed rows (three documents, starts inside chunks): the
  document masks cut every value block alike."""
  *dims, chunk = SHAPES["Vwide"]
  T = dims[1]
  ids = jnp.broadcast_to(jnp.arange(T) * 3 // T, (dims[0], T)).astype(jnp.int32)
  harness.check_against_reference(
      functools.partial(gla, segment_ids=ids), "pallas_triton", chunk,
      make_inputs(4, *dims, dtype=jnp.bfloat16), jax.random.key(5),
      interpret=True)


# ----------------------------------------------------------- head gates ---
# [B, T, H] gates reach both backends as they are (api._HEAD_GATES): the
# kernels load a [C, 1] gate column per chunk and sum the gate gradient over K
# in the kernel. Tiny shapes (interpret mode), T not a multiple of the chunk,
# K != V.

_HEAD_CASES = {  # (B, T, H, K, V, chunk), make_inputs keywords
    "mild": ((1, 63, 2, 16, 24, 16), {}),
    "decay5": ((1, 50, 2, 16, 16, 32), dict(log_g_value=-5.0)),  # -160 a chunk
    "decay50": ((1, 40, 2, 16, 16, 16), dict(log_g_value=-50.0)),
}


def _documents(B, T):
  """Three documents per row, starts inside chunks."""
  return jnp.broadcast_to(jnp.arange(T) * 3 // T, (B, T)).astype(jnp.int32)


def _check_head(impl, case, dtype, *, documents=False, interpret=True, seed=7):
  (*dims, chunk), kw = _HEAD_CASES[case]
  op = gla
  if documents:
    op = functools.partial(gla, segment_ids=_documents(dims[0], dims[1]))
  harness.check_against_reference(
      op, impl, chunk, make_inputs(seed, *dims, gate="head", dtype=dtype, **kw),
      jax.random.key(seed + 1), interpret=interpret)


@pytest.mark.parametrize("case, dtype", [
    ("mild", jnp.float32), ("mild", jnp.bfloat16),
    ("decay5", jnp.float32),
    pytest.param("decay5", jnp.bfloat16, marks=pytest.mark.slow),
    ("decay50", jnp.float32), ("decay50", jnp.bfloat16)])
def test_gpu_interpret_head_gates(case, dtype):
  """Outputs, h_T and the gradients of q, k, v, the [B, T, H] gates and h0
  against the reference, mild and strong decays (-5 and -50 per step: the
  gate gradient must not cancel), float32 and bf16."""
  _check_head("pallas_triton", case, dtype)


@pytest.mark.parametrize("dtype", [
    jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)],
    ids=["fp32", "bf16"])
def test_gpu_interpret_head_gates_with_documents(dtype):
  _check_head("pallas_triton", "mild", dtype, documents=True)


@pytest.mark.parametrize("case, dtype, documents", [
    ("mild", jnp.float32, True), ("decay50", jnp.bfloat16, False),
    pytest.param("decay5", jnp.float32, False, marks=pytest.mark.slow),
    pytest.param("mild", jnp.bfloat16, True, marks=pytest.mark.slow)])
def test_tpu_interpret_head_gates(case, dtype, documents):
  """The TPU kernels with head gates, under TPU semantics (NaN-filled scratch
  and outputs: the [C, 1] gate and gate-gradient blocks are written whole)."""
  _check_head("pallas_tpu", case, dtype, documents=documents,
              interpret=pltpu.InterpretParams())


def test_tpu_interpret_matches_reference():
  _check("pallas_tpu", "T63_C64", gate="channel")



@pytest.mark.slow  # about 20-40 s
def test_tpu_interpret_wide_values_bf16():
  """V = 512 in bf16 with TPU semantics: 16-bit matmul operands, whole [V, K]
  states per program."""
  _check("pallas_tpu", "Vwide", interpret=pltpu.InterpretParams(),
         dtype=jnp.bfloat16)

def test_tpu_interpret_params_catch_unwritten_memory():
  """TPU semantics emulated: uninitialised VMEM and outputs are NaN-filled, so a
  kernel that reads scratch before writing it, or leaves an output block
  unwritten, fails the comparison."""
  _check("pallas_tpu", (1, 40, 2, 16, 16, 16), interpret=pltpu.InterpretParams(),
         log_g_value=-0.3)


# ------------------------------------------------------------ lowering ---


def _structs(K, dtype, V=None, B=1, T=130, H=2, gate="channel"):  # T pads to 192
  s = jax.ShapeDtypeStruct
  V = K if V is None else V
  g = (B, T, H, K) if gate == "channel" else (B, T, H)
  return ([s((B, T, H, K), dtype)] * 2 + [s((B, T, H, V), dtype),
                                          s(g, jnp.float32),
                                          s((B, H, K, V), jnp.float32),
                                          s((B, T, H, V), dtype),
                                          s((B, H, K, V), jnp.float32)])


def _vjp_fn(impl, documents=False):
  def f(q, k, v, log_g, h0, do, dh):
    ids = None
    if documents:  # three documents per row, starts inside chunks
      ids = jnp.broadcast_to(jnp.arange(q.shape[1]) * 3 // q.shape[1],
                             q.shape[:2]).astype(jnp.int32)
    (o, h_t), pullback = jax.vjp(
        lambda *a: gla(*a[:4], h0=a[4], impl=impl, segment_ids=ids),
        q, k, v, log_g, h0)
    return o, h_t, pullback((do, dh))
  return f


_KERNELS = {"pallas_triton": ("gla_states", "gla_intra", "gla_output", "gla_dstates",
                               "gla_dv", "gla_dqkg"),
            "pallas_tpu": ("gla_forward_tpu", "gla_states_tpu", "gla_dstates_tpu",
                           "gla_grads_tpu")}


@pytest.mark.parametrize("target", sorted(cuda_targets.TARGETS))
@pytest.mark.parametrize("K, V, dtype", [
    (64, 64, jnp.bfloat16), (128, 128, jnp.bfloat16), (128, 128, jnp.float32),
    (256, 256, jnp.bfloat16),
    # the widest heads (flash-linear-attention's GLA at d_model 2048)
    (256, 512, jnp.bfloat16), (256, 512, jnp.float32)])
def test_gpu_lowers_for_cuda(K, V, dtype, target):
  """Forward and backward kernels lower through Pallas' Triton path without a
  GPU, for an A100 and an H100 (an abstract device on jax >= 0.11; Triton's own
  compile to PTX happens on the device, or in experiments/kernel_resources.py)."""
  text = cuda_targets.lower_for_cuda(_vjp_fn("pallas_triton"),
                                     *_structs(K, dtype, V),
                                     target=target).as_text()
  for name in _KERNELS["pallas_triton"]:
    assert name in text, name
  # one launch per kernel; the state pass and the intra-chunk weights twice
  # (forward, and recomputed in the backward)
  assert text.count("__gpu$xla.gpu.triton") == len(_KERNELS["pallas_triton"]) + 2


@pytest.mark.parametrize("target", sorted(cuda_targets.TARGETS))
def test_gpu_lowers_for_cuda_with_documents(target):
  """The kernels with their document masks (segment_ids) lower too."""
  text = cuda_targets.lower_for_cuda(_vjp_fn("pallas_triton", documents=True),
                                     *_structs(128, jnp.bfloat16),
                                     target=target).as_text()
  assert text.count("__gpu$xla.gpu.triton") == len(_KERNELS["pallas_triton"]) + 2


@pytest.mark.parametrize("target", sorted(cuda_targets.TARGETS))
@pytest.mark.parametrize("K, V, dtype, documents", [
    (128, 128, jnp.bfloat16, False), (128, 128, jnp.bfloat16, True),
    (256, 512, jnp.float32, False)])
def test_gpu_lowers_for_cuda_with_head_gates(K, V, dtype, documents, target):
  """The head-gate kernels ([C, 1] gate columns) lower for A100 and H100."""
  text = cuda_targets.lower_for_cuda(_vjp_fn("pallas_triton", documents),
                                     *_structs(K, dtype, V, gate="head"),
                                     target=target).as_text()
  for name in _KERNELS["pallas_triton"]:
    assert name in text, name
  assert text.count("__gpu$xla.gpu.triton") == len(_KERNELS["pallas_triton"]) + 2


@pytest.mark.parametrize("K, V, dtype, documents", [
    (128, 128, jnp.bfloat16, True), (256, 512, jnp.float32, False)])
def test_tpu_exports_for_mosaic_with_head_gates(K, V, dtype, documents):
  exported = jax.export.export(jax.jit(_vjp_fn("pallas_tpu", documents)),
                               platforms=["tpu"])(
                                   *_structs(K, dtype, V, gate="head"))
  assert exported.mlir_module().count("tpu_custom_call") == 4


def _gate_sized_f32(text, B, T, Tp, H, K, Kp):
  """The float32 tensor types in a lowered module's text shaped like a
  per-channel gate or its gradient: [B, T', H, K'] (the ops' layout) or
  [B, H, T', K'] (the TPU kernels' heads-first layout), T' in (T, Tp), K' in
  (K, Kp)."""
  ts, ks = f"(?:{T}|{Tp})", f"(?:{K}|{Kp})"
  pattern = (rf"tensor<{B}x{ts}x{H}x{ks}xf32>|tensor<{B}x{H}x{ts}x{ks}xf32>")
  return sorted(set(re.findall(pattern, text)))


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_head_gates_are_never_widened_to_K(impl):
  """Forward and backward with [B, T, H] gates (and documents), bf16 inputs:
  the jaxpr has no broadcast of a [B, T, H] array to float32 [B, T, H, K]
  (test_gla.gate_broadcasts), and the lowered module (CUDA for Triton, TPU
  export for Mosaic) no float32 gate-sized [B, T, H, K] or [B, H, T, K] tensor
  at all, for the gates or their gradient; with per-channel gates it has them,
  which shows the checks see one."""
  from tests.ops.test_gla import gate_broadcasts  # pylint: disable=g-import-not-at-top
  B, T, Tp, H, K, Kp, V = 1, 130, 192, 2, 96, 128, 64  # distinct sizes

  def lowered_text(gate):
    args = _structs(K, jnp.bfloat16, V, T=T, gate=gate)
    if impl == "pallas_triton":
      return cuda_targets.lower_for_cuda(_vjp_fn(impl, True), *args,
                                         target="h100").as_text()
    return jax.export.export(jax.jit(_vjp_fn(impl, True)),
                             platforms=["tpu"])(*args).mlir_module()

  jaxpr = jax.make_jaxpr(_vjp_fn(impl, True))(
      *_structs(K, jnp.bfloat16, V, T=T, gate="head")).jaxpr
  assert not gate_broadcasts(jaxpr, [(B, T, H), (B, Tp, H)], K)
  assert not gate_broadcasts(jaxpr, [(B, T, H), (B, Tp, H)], Kp)
  assert _gate_sized_f32(lowered_text("head"), B, T, Tp, H, K, Kp) == []
  assert _gate_sized_f32(lowered_text("channel"), B, T, Tp, H, K, Kp)


@pytest.mark.parametrize("K, V, dtype, documents", [
    (64, 64, jnp.float32, False), (128, 128, jnp.bfloat16, False),
    (128, 128, jnp.bfloat16, True), (256, 512, jnp.bfloat16, False),
    (256, 512, jnp.float32, False)])
def test_tpu_exports_for_mosaic(K, V, dtype, documents):
  """Forward and backward kernels lower to Mosaic without a TPU (with the
  document masks too), up to the widest heads (K 256, V 512)."""
  exported = jax.export.export(jax.jit(_vjp_fn("pallas_tpu", documents)),
                               platforms=["tpu"])(*_structs(K, dtype, V))
  text = exported.mlir_module()
  assert text.count("tpu_custom_call") == 4
  for name in _KERNELS["pallas_tpu"]:
    assert name in text, name


# -------------------------------------------------------------- limits ---


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("K, chunk_size, match", [
    (16, 48, r"gla: impl='pallas_t[a-z]*' needs chunk_size in \(16, 32, 64, 128\).*"
             r"chunk_size=48"),
    (300, 64, r"gla: impl='pallas_t[a-z]*' supports K up to 256; got K .* = 300"),
])
def test_unsupported_shape_raises(impl, K, chunk_size, match):
  x = make_inputs(0, 1, 8, 1, K, 16)
  with pytest.raises(ValueError, match=match):
    gla(**x, impl=impl, chunk_size=chunk_size, interpret=True)


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_values_up_to_512(impl):
  """V is taken in blocks, so it may be wider than K: up to 512 (a call at
  V = 512 passes the check; see the interpret and lowering tests for its
  numerics), and a wider one raises naming the limit."""
  from lsm.ops.gla import api as gla_api  # pylint: disable=g-import-not-at-top
  assert gla_api._MODULES[impl].ACCEPTS.max_v == 512
  x = make_inputs(0, 1, 8, 1, 16, 640)
  with pytest.raises(ValueError, match=r"supports V up to 512; got V \(value "
                                       r"head dim\) = 640"):
    gla(**x, impl=impl, interpret=True)


def test_interpret_with_a_non_pallas_impl_raises():
  x = make_inputs(0, 1, 8, 1, 8, 8)
  with pytest.raises(ValueError, match=r"interpret=True applies to the Pallas "
                                       r"impls only; impl resolved to 'chunked'"):
    gla(**x, impl="chunked", interpret=True)


# ------------------------------------------------------------- devices ---


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_kernels_match_reference(D, dtype):
  _check("pallas_triton", (2, 200, 4, D, D, 64), interpret=False, dtype=dtype)


@pytest.mark.gpu
def test_gpu_strong_decay():
  _check("pallas_triton", (1, 500, 2, 64, 64, 64), interpret=False, log_g_value=-5.0)


@pytest.mark.tpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_tpu_kernels_match_reference(dtype):
  _check("pallas_tpu", (2, 200, 4, 128, 128, 64), interpret=False, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.tpu
def test_auto_picks_the_platform_kernel():
  from lsm.ops import _dispatch  # pylint: disable=g-import-not-at-top
  from lsm.ops.gla import api as gla_api  # pylint: disable=g-import-not-at-top
  plat = _dispatch.resolve_impl("auto", supported=gla_api._IMPLS, op="gla")
  assert plat.startswith("pallas"), plat
  x = make_inputs(3, 1, 50, 2, 64, 64)
  o_auto, h_auto = jax.jit(functools.partial(gla, impl="auto"))(**x)
  o, h = jax.jit(functools.partial(gla, impl=plat))(**x)
  numerics.assert_close(o_auto, o, rtol=0.0, what="o")
  numerics.assert_close(h_auto, h, rtol=0.0, what="h_T")


@pytest.mark.parametrize("plat, family, expected", [
    ("gpu", "hopper", "pallas_mosaic_gpu"),
    ("gpu", "ampere", "pallas_triton"),
    ("gpu", "other", "chunked"),  # ROCm, pre-Ampere NVIDIA
    ("tpu", "other", "pallas_tpu"),
    ("cpu", "other", "chunked")])
def test_auto_resolves_by_platform(plat, family, expected, monkeypatch):
  """The choice itself, on any machine: both ops with Pallas impls pick the
  platform's kernel, and the chunked form where there is none."""
  from lsm.ops import _dispatch  # pylint: disable=g-import-not-at-top
  from lsm.ops.delta_rule import api as delta_api  # pylint: disable=g-import-not-at-top
  from lsm.ops.gla import api as gla_api  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_dispatch, "platform", lambda: plat)
  monkeypatch.setattr(_dispatch, "gpu_family", lambda: family)
  for op, impls in (("gla", gla_api._IMPLS), ("delta_rule", delta_api._IMPLS)):
    want = expected[op] if isinstance(expected, dict) else expected
    assert _dispatch.resolve_impl("auto", supported=impls, op=op) == want


def test_auto_prefers_mosaic_gpu_on_hopper_only():
  """Once an op has a Mosaic GPU impl, Hopper picks it and Ampere keeps Triton."""
  from lsm.ops import _dispatch  # pylint: disable=g-import-not-at-top
  impls = ("chunked", "pallas_triton", "pallas_mosaic_gpu")
  assert _dispatch.preference("gpu", "hopper")[0] == "pallas_mosaic_gpu"
  assert [n for n in _dispatch.preference("gpu", "ampere") if n in impls][0] == (
      "pallas_triton")


def test_interpret_true_is_each_backends_own_mode():
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  from lsm.ops import _dispatch  # pylint: disable=g-import-not-at-top
  assert isinstance(_dispatch.interpret_mode("pallas_tpu", True),
                    pltpu.InterpretParams)
  assert isinstance(_dispatch.interpret_mode("pallas_mosaic_gpu", True),
                    plgpu.InterpretGPUParams)
  assert _dispatch.interpret_mode("pallas_triton", True) is True
  params = pltpu.InterpretParams()
  assert _dispatch.interpret_mode("pallas_tpu", params) is params
  assert _dispatch.interpret_mode("pallas_tpu", False) is False


def test_old_triton_name_is_an_alias():
  x = make_inputs(0, 1, 20, 1, 16, 16)
  with pytest.warns(DeprecationWarning, match="now called 'pallas_triton'"):
    from lsm.ops import _dispatch  # pylint: disable=g-import-not-at-top
    _dispatch._warn_alias.cache_clear()
    o_old, _ = gla(**x, impl="pallas_gpu", chunk_size=16, interpret=True)
  o_new, _ = gla(**x, impl="pallas_triton", chunk_size=16, interpret=True)
  numerics.assert_close(o_old, o_new, rtol=0.0, what="o")
