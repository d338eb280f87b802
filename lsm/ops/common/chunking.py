"""Padding and reshaping of the time axis into chunks.

Ops pad T up to a multiple of the chunk length with zeros. Every op is written so a
zero-padded tail is inert: zero keys/values add nothing to the state, zero log
gates (decay 1) and zero beta leave it unchanged, so the final state of the padded
sequence is the final state at T.
"""

import jax
import jax.numpy as jnp


def pad_time(x: jax.Array, multiple: int, axis: int = 1) -> jax.Array:
  """Zero-pads ``axis`` of ``x`` up to a multiple of ``multiple``."""
  t = x.shape[axis]
  pad = -t % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, H, ...] with T % chunk == 0 -> [B, H, N, C, ...]."""
  b, t, h = x.shape[:3]
  x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array, length: int) -> jax.Array:
  """[B, H, N, C, ...] -> [B, length, H, ...] (drops the padded tail)."""
  b, h, n, c = x.shape[:4]
  x = jnp.moveaxis(x, 1, 3).reshape(b, n * c, h, *x.shape[4:])
  return x[:, :length]
