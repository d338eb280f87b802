"""Inverse of a unit lower-triangular matrix, without ``triangular_solve``.

The chunked delta rule needs (I + L)^{-1} for a strictly lower-triangular L per
chunk (the UT transform). ``jax.lax.linalg.triangular_solve`` would do, but on
jax 0.10.2 / 2-core CPUs the gradient of a batched triangular_solve deadlocks
intermittently (see docs/design.md). Here the forward is forward substitution
written with matmuls in a ``fori_loop`` (on 16 x 16 diagonal blocks, merged by
doubling) and the backward is the closed form
d(A^{-1}) = -A^{-1} dA A^{-1}, so no triangular_solve appears in either pass and
no per-row residuals are stored.
"""

import functools

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _strict_lower(x):
  n = x.shape[-1]
  return jnp.where(jnp.arange(n)[:, None] > jnp.arange(n)[None, :], x, 0.0)


BLOCK = 16  # diagonal blocks inverted by substitution before doubling


def _substitute(l):
  """(I + L)^{-1} by forward substitution over rows; l strictly lower."""
  n = l.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(n, dtype=l.dtype), l.shape)

  # Row i of T = (I + L)^{-1} is e_i - L[i, :] T; L[i, j] = 0 for j >= i, so only
  # rows already final enter, and row i itself still holds e_i.
  def body(i, t):
    l_i = jax.lax.dynamic_index_in_dim(l, i, axis=-2, keepdims=True)  # [..., 1, n]
    e_i = jax.lax.dynamic_index_in_dim(eye, i, axis=-2, keepdims=True)
    row = e_i - jnp.matmul(l_i, t, precision=_HIGHEST)
    return jax.lax.dynamic_update_index_in_dim(t, row, i, axis=-2)

  return jax.lax.fori_loop(1, n, body, eye)


def _diagonal_blocks(x, size: int):
  """[..., n, n] -> [..., n // size, size, size], the blocks on the diagonal."""
  n = x.shape[-1]
  nb = n // size
  x = x.reshape(*x.shape[:-2], nb, size, nb, size)
  x = jnp.diagonal(x, axis1=-4, axis2=-2)  # [..., size, size, nb]
  return jnp.moveaxis(x, -1, -3)


@jax.custom_vjp
def unit_lower_inverse(l):
  """(I + L)^{-1} for strictly lower-triangular L.

  For n = 16 * 2^j the 16 x 16 diagonal blocks are inverted by forward
  substitution (16 sequential steps instead of n), then pairs of neighbouring
  blocks are merged by doubling, [[A, 0], [C, D]]^{-1} = [[A^-1, 0],
  [-D^-1 C A^-1, D^-1]]: log2(n / 16) rounds of two matmuls. Other n use plain
  substitution.

  Args:
    l: [..., n, n] float32; entries on and above the diagonal are ignored.

  Returns:
    [..., n, n] unit lower-triangular inverse.
  """
  l = _strict_lower(l)
  n = l.shape[-1]
  nb = n // BLOCK
  if n <= BLOCK or n % BLOCK or nb & (nb - 1):
    return _substitute(l)
  t = _substitute(_diagonal_blocks(l, BLOCK))  # [..., nb, 16, 16]
  size = BLOCK
  while size < n:
    big = _diagonal_blocks(l, 2 * size)  # [..., n / 2size, 2size, 2size]
    c = big[..., size:, :size]
    t_a, t_d = t[..., 0::2, :, :], t[..., 1::2, :, :]
    mm = functools.partial(jnp.matmul, precision=_HIGHEST)
    t_c = -mm(mm(t_d, c), t_a)
    top = jnp.concatenate([t_a, jnp.zeros_like(t_a)], axis=-1)
    bottom = jnp.concatenate([t_c, t_d], axis=-1)
    t = jnp.concatenate([top, bottom], axis=-2)
    size *= 2
  return t[..., 0, :, :]


def _inverse_fwd(l):
  t = unit_lower_inverse(l)
  return t, t


def _inverse_bwd(t, dt):
  tt = jnp.swapaxes(t, -1, -2)
  dl = -jnp.matmul(jnp.matmul(tt, dt, precision=_HIGHEST), tt, precision=_HIGHEST)
  return (_strict_lower(dl),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)
