"""Two-dimensional tile operations for Pallas kernel bodies.

Everything here works on values already loaded from refs and uses only
primitives that both Pallas lowerings accept (Triton for GPUs, Mosaic for TPUs):
2-D iota, select, elementwise math, reductions with ``keepdims``, and 2-D
``dot_general``. In particular no 1-D vectors (Mosaic lays out 2-D tiles), no
reverse cumsum (Triton has none) and no dynamic slicing of values: prefix sums
are matmuls with a triangular 0/1 matrix, and a row or column of a tile is taken
with a masked sum. Sums by matmul are exact enough: they run at the precision
passed in (HIGHEST for float32 inputs).
"""

import jax
import jax.numpy as jnp

_F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT = jax.lax.Precision.DEFAULT


def precision_for(dtype) -> jax.lax.Precision:
  """Matmul precision inside a kernel for inputs of ``dtype``.

  float32 inputs get full float32 products (no TF32 on GPU, six bf16 passes on
  TPU), so they match the reference to the "pallas" float32 tolerance. Low
  precision inputs get the hardware's fast path on float32 operands (TF32 on
  GPU): the inputs themselves are exact in it and float32 accumulation keeps
  the error far below the inputs' own rounding.
  """
  return HIGHEST if jnp.dtype(dtype) == jnp.float32 else DEFAULT


def iota(shape, axis: int):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def mm(a, b, precision):
  """a @ b with float32 accumulation; a [M, K], b [K, N]."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=_F32)


def mm_nt(a, b, precision):
  """a @ b^T; a [M, K], b [N, K]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=_F32)


def mm_tn(a, b, precision):
  """a^T @ b; a [K, M], b [K, N]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=_F32)


def lower_mask(n: int, *, strict: bool):
  """[n, n] bool: row > col (strict) or row >= col."""
  r, c = iota((n, n), 0), iota((n, n), 1)
  return r > c if strict else r >= c


def cumsum_rows(x, precision=HIGHEST):
  """Inclusive prefix sum down the rows of x [n, m]: L @ x, L lower with ones."""
  n = x.shape[0]
  return mm(lower_mask(n, strict=False).astype(_F32), x, precision)


def prefix_sum_rows_exclusive(x, precision=HIGHEST):
  """Exclusive prefix sum down the rows: out[t] = sum_{s < t} x[s]. Formed
  directly rather than as inclusive - x, which would cancel."""
  n = x.shape[0]
  return mm(lower_mask(n, strict=True).astype(_F32), x, precision)


def suffix_sum_rows(x, precision=HIGHEST):
  """Exclusive suffix sum down the rows: out[s] = sum_{u > s} x[u]. Formed
  directly rather than as total - prefix, so a gradient through it has no
  cancelling O(1) terms."""
  n = x.shape[0]
  upper = (iota((n, n), 0) < iota((n, n), 1)).astype(_F32)
  return mm(upper, x, precision)


def row(x, i):
  """Row i of x [n, m] as [1, m]; i may be traced."""
  return jnp.sum(jnp.where(iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def col(x, j):
  """Column j of x [n, m] as [n, 1]; j may be traced."""
  return jnp.sum(jnp.where(iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def col_to_row(x):
  """[n, 1] -> [1, n] without a transpose (Mosaic handles [n, 1] transposes
  badly): a masked sum over the diagonal."""
  n = x.shape[0]
  eye = iota((n, n), 0) == iota((n, n), 1)
  return jnp.sum(jnp.where(eye, jnp.broadcast_to(x, (n, n)), 0.0), axis=0,
                 keepdims=True)
