r"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet): the definition.

For each batch element and head, with a float32 state S_t in R^{K x V} (the
transpose of the papers' V x K convention; keys index rows):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) k_t^T S_{t-1})^T
    o_t = scale * q_t^T S_t

q_t, k_t in R^K, v_t in R^V, beta_t a scalar, g_t = log_g_t <= 0 a scalar decay
per head (0 without gating: plain DeltaNet, S_t = S_{t-1} + beta_t k_t (v_t -
k_t^T S_{t-1})^T). S_0 = h0 (zeros when absent), scale defaults to K^{-1/2}, and
the output at t sees token t.

Packed documents (``segment_ids``, see ``lsm.ops.common.segments``): where token
t starts a document (t > 0), S_{t-1} is replaced by 0 in the update; h0 enters
the row's first document only, and the final state is the state after T-1.

Negative eigenvalues: with ||k_t|| = 1 the transition I - beta_t k_t k_t^T has
eigenvalue 1 - beta_t along k_t, so beta_t in [0, 2] gives eigenvalues in
[-1, 1] (Grazzi et al. 2024); nothing here assumes beta <= 1. Keys are expected to
be L2-normalised by the caller (the DeltaNet layer does it); the op does not
normalise them, and with ||k|| > 1 the recurrence can grow without bound.

Token-by-token ``lax.scan`` in float32 with HIGHEST-precision matmuls: the ground
truth for the fast impls, not a fast path.
"""

import jax
import jax.numpy as jnp

from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

_HIGHEST = jax.lax.Precision.HIGHEST


def delta_rule_step(q_t, k_t, v_t, beta_t, log_g_t, h, *, scale: float):
  """One token of the (gated) delta rule.

  Args:
    q_t: [B, H, K] query.
    k_t: [B, H, K] key.
    v_t: [B, H, V] value.
    beta_t: [B, H] write strength.
    log_g_t: [B, H] log decay (zeros for plain DeltaNet).
    h: [B, H, K, V] float32 state before the token.
    scale: query scale.

  Returns:
    o_t: [B, H, V] in q_t.dtype; h: [B, H, K, V] float32 state after the token.
  """
  f32 = jnp.float32
  q, k, v = (x.astype(f32) for x in (q_t, k_t, v_t))
  h = jnp.exp(log_g_t.astype(f32))[..., None, None] * h
  v_old = jnp.einsum("bhk,bhkv->bhv", k, h, precision=_HIGHEST)
  delta = beta_t.astype(f32)[..., None] * (v - v_old)
  h = h + k[..., :, None] * delta[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, h, precision=_HIGHEST)
  return o.astype(q_t.dtype), h


def delta_rule(q, k, v, beta, log_g, *, h0, scale: float,
               chunk_size: int | None = None, resets=None):
  """The delta rule over a sequence, token by token. Arguments as in
  ``lsm.ops.delta_rule.delta_rule`` with ``log_g`` already a float32 [B, T, H]
  array and ``h0`` a float32 array; chunk_size is ignored. ``resets`` (bool
  [B, T], ``segments.resets(segment_ids)``) zeroes the state entering each
  document's first token."""
  del chunk_size
  f32 = jnp.float32
  if resets is None:
    resets = jnp.zeros(q.shape[:2], bool)
  xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, beta, log_g))

  def body(h, x):
    *x, reset = x
    h = jnp.where(reset[:, None, None, None], 0.0, h)
    o_t, h = delta_rule_step(*x, h, scale=scale)
    return h, o_t

  h_t, o = jax.lax.scan(body, h0, (*xs, jnp.moveaxis(resets, 1, 0)))
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), h_t
