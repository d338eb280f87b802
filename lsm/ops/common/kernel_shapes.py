"""Shapes the Pallas impls accept, and the padding that gets them there.

Both Pallas backends pad T to a multiple of the chunk (an inert tail, see
``chunking.py``) and the head dims K and V up to a power of two of at least 16
(Triton loads and matmuls want power-of-two tiles of at least 16; Mosaic takes
any full dim, and one rule keeps the two impls' numerics identical). Zero
channels are inert too: zero query/key channels add nothing to q.k, and zero
value channels give zero outputs that are sliced off. Limits that padding cannot
meet raise a ValueError naming the argument, its value and the limit; an
explicit impl never falls back to another.
"""

import math

import jax
import jax.numpy as jnp

from lsm.ops import _dispatch

MAX_HEAD_DIM = 256  # K: one [C, K] tile per chunk and a [K, V] float32 state
# V: every kernel takes the value dim in blocks (grid axes or loops over
# [C, BV] tiles), so V can be wider than K (flash-linear-attention's GLA,
# Gated DeltaNet and RetNet heads at d_model 2048 are K 256, V 512).
MAX_V = 512
CHUNK_SIZES = (16, 32, 64, 128)  # multiples of the 16-token sub-chunk, powers of 2


def padded_dim(n: int) -> int:
  return _dispatch.padded_pow2(n)


def _accepts(platforms: tuple[str, ...]) -> _dispatch.Accepts:
  return _dispatch.Accepts(
      platforms=platforms, max_k=MAX_HEAD_DIM, max_v=MAX_V,
      chunk_sizes=CHUNK_SIZES,
      chunk_note="a power of two, whole 16-token sub-chunks")


# What the Triton and TPU kernels of gla and delta_rule take (the ops' impl
# modules state it as their ACCEPTS): any float dtype (float32 runs IEEE
# float32 matmuls), K up to MAX_HEAD_DIM and V up to MAX_V after padding.
TRITON = _accepts(("gpu:hopper", "gpu:ampere"))
TPU = _accepts(("tpu",))


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads ``axis`` of ``x`` up to ``size``."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def num_chunks(T: int, chunk_size: int) -> int:
  return math.ceil(T / chunk_size)
