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

import dataclasses

import jax
import jax.numpy as jnp

_F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
DEFAULT = jax.lax.Precision.DEFAULT


@dataclasses.dataclass(frozen=True)
class Matmuls:
  """How a kernel's data matmuls run: the dtype their operands enter in and
  the precision; accumulation is always float32.

  float32 inputs: float32 operands at HIGHEST (no TF32 on GPU, six bf16 passes
  on TPU), so they match the reference to the "pallas" float32 tolerance.
  bfloat16 / float16 inputs: operands in that dtype (tensor cores / the MXU at
  their full 16-bit rate, half the operand registers of float32 tiles, and no
  TF32 step): loaded tiles go in as they are, and float32 values (decayed keys,
  states, intra-chunk weights) are rounded to it where they enter, as
  flash-linear-attention does; the 16-bit tolerance rows hold with it.

  ``tiles.mm`` and friends take one of these or a bare ``jax.lax.Precision``
  (float32 operands at that precision: the gate sums, the delta rule's
  inverse).
  """

  dtype: jnp.dtype
  precision: jax.lax.Precision

  def cast(self, x):
    """x as a matmul operand (a no-op for tiles already in the dtype)."""
    return x if x.dtype == self.dtype else x.astype(self.dtype)


def precision_for(dtype) -> Matmuls:
  """``Matmuls`` for a kernel's data matmuls on inputs of ``dtype``: float32
  operands at HIGHEST for float32, 16-bit operands otherwise."""
  if jnp.dtype(dtype) == jnp.float32:
    return Matmuls(jnp.dtype(_F32), HIGHEST)
  return Matmuls(jnp.dtype(dtype), DEFAULT)


def _dot(a, b, dims, precision):
  if isinstance(precision, Matmuls):
    a, b, precision = precision.cast(a), precision.cast(b), precision.precision
  return jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                             preferred_element_type=_F32)


def iota(shape, axis: int):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def mm(a, b, precision):
  """a @ b with float32 accumulation; a [M, K], b [K, N]."""
  return _dot(a, b, ((1,), (0,)), precision)


def mm_nt(a, b, precision):
  """a @ b^T; a [M, K], b [N, K]."""
  return _dot(a, b, ((1,), (1,)), precision)


def mm_tn(a, b, precision):
  """a^T @ b; a [K, M], b [K, N]."""
  return _dot(a, b, ((0,), (0,)), precision)


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
