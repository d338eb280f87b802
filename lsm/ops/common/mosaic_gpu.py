"""Pieces every Mosaic GPU kernel of lsm uses: compiler params, SMEM tiles,
register transfers, wgmma, TMA fetches, the SMEM count, interpret mode.

Facts they rest on (jax 0.11.2, Warpgroup lowering semantics, checked by
lowering for CUDA and in ``plgpu.InterpretGPUParams`` interpret mode; the op
modules' docstrings list the rest):
- Registers <-> SMEM in the WGMMA layout are optimized only for tiled and
  swizzled refs (``swizzled``); a plain ref (``plain``) needs
  ``plgpu.load(..., optimized=False)``, which also takes dynamic row offsets.
  A single row loads as a ``Layout.WGMMA.reduce(0)`` vector and broadcasts
  with ``lax.broadcast_in_dim``.
- wgmma's accumulator is zeroed by ``pl.run_scoped(..., plgpu.ACC(...))``; the
  interpreter does not handle ``pl.run_state`` (``plgpu.ACC.init``), so
  callers add initial values after the product.
- Pallas aligns every SMEM allocation to 1 KiB; a barrier takes 8 B; a kernel
  with a cross-warp reduction gets ``PARAMS.reduction_scratch_bytes`` more.
  ``scratch_bytes`` adds these up and matches the lowered launch exactly.
"""

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lsm.ops import _dispatch

_F32 = jnp.float32
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(0)  # a [D] vector laid out like a tile row
# Pinned: the default lowering semantics changed between jax releases.
PARAMS = plgpu.CompilerParams(
    lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
SMEM_ALIGNMENT = 1024  # Pallas Mosaic GPU aligns every SMEM allocation to it
BARRIER_BYTES = 8


def swizzled(shape, dtype):
  """An SMEM tile in the tiled + swizzled form that wgmma operands and
  optimized register transfers need: (8, s) tiles, s the swizzle (128, 64 or
  32 bytes, the largest dividing a row) in elements."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = next(s for s in (128, 64, 32) if shape[-1] * itemsize % s == 0)
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle // itemsize)),
      plgpu.SwizzleTransform(swizzle)))


def plain(shape, dtype):
  """An untiled row-major SMEM tile: readable at any row offset, through
  unoptimized (bank-conflicting) register transfers."""
  return plgpu.SMEM(shape, dtype)


def load(ref):
  """A 2-D tile of a plain ref into registers: float32, WGMMA layout."""
  return plgpu.load(ref, layout=WGMMA, optimized=False).astype(_F32)


def load_row(ref, i, shape):
  """Row i of a plain 2-D ref broadcast down ``shape`` [rows, D], float32."""
  r = plgpu.load(ref.at[i, :], layout=ROW, optimized=False).astype(_F32)
  return lax.broadcast_in_dim(r, shape, [1])


def iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def mm(a_ref, b_ref, shape):
  """a @ b of two SMEM operands by wgmma, float32 [M, N]."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_ref, b_ref)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, _F32))


def fetch_all(pairs, bars):
  """TMA each (GMEM ref, SMEM ref) pair on its own barrier, then wait."""
  for i, (src, dst) in enumerate(pairs):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  for i in range(len(pairs)):
    plgpu.barrier_wait(bars.at[i])


def interpret_params(interpret):
  """None (compile for the GPU) or the Mosaic GPU interpreter's params."""
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return interpret or None


def padded(d: int) -> int:
  """Head dims go to 64, 128, 256 or 512 (at least 64, then powers of two as
  ``_dispatch.padded_pow2``, so the shared VJPs' padding leaves them as they
  are): whole 128-byte rows of the swizzled bf16 tiles, wgmma contractions in
  steps of 64, whole V blocks (``v_block``). Zero channels are inert (see
  ``kernel_shapes``)."""
  return max(64, _dispatch.padded_pow2(d))


def v_block(v: int) -> int:
  """Value columns per V block of the chunk kernels at padded V ``v``: all of
  them up to 128, else 128 (V = 256 and 512 run as 2 and 4 blocks)."""
  return min(v, V_BLOCK)


def scratch_bytes(scratch, barriers: int, reduces: bool) -> int:
  """Dynamic SMEM of a kernel: its scratch tiles (``plgpu.SMEM`` specs), each
  aligned to 1 KiB, its barriers, and the reduction scratch when the kernel
  reduces across warps."""
  total = sum(-(-math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
                // SMEM_ALIGNMENT) * SMEM_ALIGNMENT for s in scratch)
  if reduces:
    total += PARAMS.reduction_scratch_bytes
  return total + barriers * BARRIER_BYTES


CHUNK = 64  # tokens per chunk: one wgmma M tile
MAX_HEAD_DIM = 128  # K; a [C, K] tile and [BV, K] state blocks in every kernel
V_BLOCK = 128  # value columns per block of the chunk kernels (``v_block``)
MAX_V = 512  # V, in blocks of V_BLOCK
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# What the Mosaic GPU kernels of gla and delta_rule take (their impl modules
# state it as ACCEPTS): bfloat16 / float16 inputs, one chunk length, K up to
# MAX_HEAD_DIM and V up to MAX_V. The sequential state passes work on 64-row
# blocks of V in their grid; the chunk kernels take V in blocks of V_BLOCK
# (a loop over the blocks, or a grid axis), so their SMEM does not grow past
# V = 256 (each op's ``smem_bytes``; largest the delta rule's input
# gradients, 229,416 B of the 232,448 B per block at K = 128, V >= 256, then
# GLA's dqkg, 199,744 B with documents at V >= 128). K = 256 calls (the
# K 256 x V 512 heads of GLA, Gated DeltaNet and RetNet at d_model 2048) go
# to Triton through "auto": every kernel holds whole [C, K] tiles and
# [BV, K] state blocks (issue 28).
ACCEPTS = _dispatch.Accepts(
    platforms=("gpu:hopper",), dtypes=tuple(d.name for d in DTYPES),
    dtype_note="wgmma's float32 path is TF32, which misses the float32 "
    "tolerance", max_k=MAX_HEAD_DIM, max_v=MAX_V, chunk_sizes=(CHUNK,))


def check_inputs(op: str, dtype, chunk_size: int, K: int, V: int) -> None:
  """Raises ValueError (naming the argument, its value and the limit) for what
  the Mosaic GPU kernels cannot run (``ACCEPTS``). ``op`` names the caller,
  e.g. "gla: impl='pallas_mosaic_gpu'"."""
  why = ACCEPTS.refusal(_dispatch.Call.of(dtype, K, V, chunk_size))
  if why is not None:
    raise ValueError(f"{op} {why}")
