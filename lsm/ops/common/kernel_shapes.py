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

MAX_HEAD_DIM = 256  # one [C, K] tile per chunk and a [K, V] float32 state
CHUNK_SIZES = (16, 32, 64, 128)  # multiples of the 16-token sub-chunk, powers of 2


def padded_dim(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def check(op: str, impl: str, *, chunk_size: int, K: int, V: int) -> None:
  """Raises ValueError when a Pallas impl cannot run this shape."""
  if chunk_size not in CHUNK_SIZES:
    raise ValueError(f"{op}: impl={impl!r} needs chunk_size in {CHUNK_SIZES} "
                     f"(a power of two, whole 16-token sub-chunks); got "
                     f"chunk_size={chunk_size}")
  for name, n in (("K (key/query head dim)", K), ("V (value head dim)", V)):
    if n > MAX_HEAD_DIM:
      raise ValueError(f"{op}: impl={impl!r} supports head dims up to "
                       f"{MAX_HEAD_DIM}; got {name} = {n}")


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
