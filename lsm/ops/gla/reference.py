r"""Gated linear attention (GLA): the definition.

For each batch element and head, with a float32 state S_t in R^{K x V}:

    S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

q_t, k_t and log_g_t are rows in R^K, v_t is a row in R^V, S_0 = h0 (zeros when
absent) and scale defaults to K^{-1/2}. The output at t sees token t itself.
log_g_t <= 0 is a per-channel log forget gate (GLA, Yang et al. 2023), or one
gate per head, the same for every channel (RetNet, Lightning Attention,
Mamba-2's scalar decay): diag(exp(log_g_t)) is then exp(log_g_t) I.

Packed documents (``segment_ids``, see ``lsm.ops.common.segments``): where token
t starts a document (t > 0), S_{t-1} is replaced by 0 in the update, so no
document sees another's tokens; h0 enters the row's first document only, and
the final state is the state after token T-1. The public
``gla`` takes per-channel gates ``[B, T, H, K]``, no gate (plain linear
attention), and one gate per head ``[B, T, H]``, which every impl, this
module included, reads as it is (never broadcast over K).

This module is token-by-token ``lax.scan`` in float32 with ``precision=HIGHEST``
matmuls, so no TF32 or bf16 pass leaks into the definition. It is the ground truth
the fast impls are tested against, not a fast path.
"""

import jax
import jax.numpy as jnp

from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

_HIGHEST = jax.lax.Precision.HIGHEST


def gla_step(q_t, k_t, v_t, log_g_t, h, *, scale: float):
  """One token of GLA.

  Args:
    q_t: [B, H, K] query.
    k_t: [B, H, K] key.
    v_t: [B, H, V] value.
    log_g_t: [B, H, K] log forget gate, [B, H] one per head, or None (no
      decay).
    h: [B, H, K, V] float32 state before the token.
    scale: query scale.

  Returns:
    o_t: [B, H, V] in q_t.dtype; h: [B, H, K, V] float32 state after the token.
  """
  f32 = jnp.float32
  if log_g_t is not None:
    decay = jnp.exp(log_g_t.astype(f32))  # [B, H, K] or [B, H]
    h = decay.reshape(*decay.shape, *(1,) * (h.ndim - decay.ndim)) * h
  h = h + k_t.astype(f32)[..., :, None] * v_t.astype(f32)[..., None, :]
  o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t.astype(f32), h, precision=_HIGHEST)
  return o_t.astype(q_t.dtype), h


def gla(q, k, v, log_g, *, h0, scale: float, chunk_size: int | None = None,
        resets=None):
  """GLA over a sequence, token by token. Arguments as in ``lsm.ops.gla.gla``,
  with ``log_g`` [B, T, H, K] or [B, T, H] and ``h0`` a float32 array;
  chunk_size is ignored. ``resets`` (bool [B, T], ``segments.resets(segment_ids)``) zeroes the
  state entering each document's first token."""
  del chunk_size
  f32 = jnp.float32
  if resets is None:
    resets = jnp.zeros(q.shape[:2], bool)
  xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, log_g))

  def body(h, x):
    *x, reset = x
    h = jnp.where(reset[:, None, None, None], 0.0, h)
    o_t, h = gla_step(*x, h, scale=scale)
    return h, o_t

  h_t, o = jax.lax.scan(body, h0, (*xs, jnp.moveaxis(resets, 1, 0)))
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), h_t
