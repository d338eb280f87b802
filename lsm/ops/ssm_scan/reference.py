r"""Diagonal (elementwise) SSM scan: the definition.

For every batch element and every trailing index, with a float32 state h_t:

    h_t = a_t * h_{t-1} + b_t,    t = 0 .. T-1,    h_{-1} = h0,
    y_t = h_t

Products are elementwise: a, b and h have the same shape. h0 is zeros when
absent. The output at t is the state after token t. a_t may be anywhere in
[-1, 1], zero and negative values included: this is the scan that LSSL, S4D and
Mamba layers call (a_t = exp(dt * A), b_t = dt * B x_t, already discretized and
broadcast to the state's shape by the layer) and that negative-eigenvalue linear
RNNs call with a_t in [-1, 0). Any impl must therefore work without logs of a
or divisions by a.

Packed documents (``segment_ids``, see ``lsm.ops.common.segments``): where token
t starts a document (t > 0), h_{t-1} is replaced by 0, so h_t = b_t; h0 enters
the row's first document only.

This module is a token-by-token ``lax.scan`` in float32. It is the ground truth
the fast impls are tested against, not a fast path.
"""

import jax
import jax.numpy as jnp

from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING


def ssm_scan_step(a_t, b_t, h):
  """One token of the diagonal SSM scan.

  Args:
    a_t: [B, ...] decay, any float dtype.
    b_t: [B, ...] input, a_t's shape.
    h: [B, ...] float32 state before the token, a_t's shape.

  Returns:
    y_t: [B, ...] in b_t.dtype (equal to the new state); h: [B, ...] float32
    state after the token.
  """
  f32 = jnp.float32
  h = a_t.astype(f32) * h + b_t.astype(f32)
  return h.astype(b_t.dtype), h


def ssm_scan(a, b, *, h0, resets=None):
  """Diagonal SSM scan over a sequence, token by token. Arguments as in
  ``lsm.ops.ssm_scan.ssm_scan``, with ``h0`` a float32 array. ``resets`` (bool
  [B, T], ``segments.resets(segment_ids)``) zeroes the state entering each
  document's first token."""
  f32 = jnp.float32
  if resets is None:
    resets = jnp.zeros(b.shape[:2], bool)
  xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (a, b))

  def body(h, x):
    a_t, b_t, reset = x
    h = jnp.where(reset.reshape(-1, *(1,) * (h.ndim - 1)), 0.0, h)
    y_t, h = ssm_scan_step(a_t, b_t, h)
    return h, y_t

  h_t, y = jax.lax.scan(body, h0, (*xs, jnp.moveaxis(resets, 1, 0)))
  return jnp.moveaxis(y, 0, 1).astype(b.dtype), h_t
