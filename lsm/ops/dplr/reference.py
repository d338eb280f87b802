r"""Diagonal-plus-low-rank (DPLR) transitions: the definition.

For each batch element and head, with a float32 state S_t in R^{K x V} (keys
index rows, as in every lsm matrix-state op):

    S_t = (diag(exp(g_t)) + b_t a_t^T) S_{t-1} + u_t v_t^T
        = exp(g_t) o S_{t-1} + b_t (a_t^T S_{t-1}) + u_t v_t^T
    o_t = scale * S_t^T q_t

q_t, a_t, b_t, u_t in R^K and v_t in R^V are the token's columns; g_t =
log_g_t <= 0 is a log decay per key channel ([B, T, H, K]), one per head
([B, T, H]: exp(g_t) I), or absent (g_t = 0). The rank-one term reads the state
*before* the decay, S_{t-1}. S_0 = h0 (zeros when absent), scale defaults to
K^{-1/2}, and the output at t sees token t.

The models it serves (k unit-norm keys, beta_t in [0, 2]):

  DeltaNet          g = 0,            a = k,           b = -beta k, u = beta k
  Gated DeltaNet    g per head,       a = exp(g) k,    b = -beta k, u = beta k
  KDA               g per channel,    a = exp(g) o k,  b = -beta k, u = beta k
  RWKV-7            g = log w,        a = kk,          b = -(alpha o kk), u = k~
                    (kk its normalised removal key, alpha its in-context rate,
                    k~ = k o (1 + (alpha - 1) o k_a) its replacement key;
                    the transition is a sum diag(w) + low rank, nothing folds)
  DeltaProduct      n_h DeltaNet steps per token as a time expansion: T * n_h
                    micro-steps, the output read at every n_h-th (the decay, if
                    any, on each token's first micro-step)

Gated DeltaNet and KDA are (I - beta k k^T) diag(exp g) S: the decay folds into
a (or, equally, into b). Negative eigenvalues need no special case: with
||k|| = 1 and b = -beta k, the transition has eigenvalue exp(g) (1 - beta) along
k, so beta in [0, 2] reaches [-1, 1]; nothing here assumes positive
eigenvalues or a particular sign of a^T b.

Packed documents (``segment_ids``, see ``lsm.ops.common.segments``): where token
t starts a document (t > 0), S_{t-1} is replaced by 0 in the update (in both
the decay and the rank-one read), so no document sees another's tokens; h0
enters the row's first document only, and the final state is the state after
token T-1.

Token-by-token ``lax.scan`` in float32 with HIGHEST-precision matmuls: the
ground truth for the fast impls, not a fast path.
"""

import jax
import jax.numpy as jnp

from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

_HIGHEST = jax.lax.Precision.HIGHEST


def dplr_step(q_t, a_t, b_t, u_t, v_t, log_g_t, h, *, scale: float):
  """One token of the DPLR recurrence.

  Args:
    q_t, a_t, b_t, u_t: [B, H, K].
    v_t: [B, H, V].
    log_g_t: [B, H, K] (per channel), [B, H] (per head) or None (no decay).
    h: [B, H, K, V] float32 state before the token.
    scale: query scale.

  Returns:
    o_t: [B, H, V] in q_t.dtype; h: [B, H, K, V] float32 state after the token.
  """
  f32 = jnp.float32
  q, a, b, u, v = (x.astype(f32) for x in (q_t, a_t, b_t, u_t, v_t))
  r = jnp.einsum("bhk,bhkv->bhv", a, h, precision=_HIGHEST)  # a^T S_{t-1}
  if log_g_t is not None:
    decay = jnp.exp(log_g_t.astype(f32))  # [B, H, K] or [B, H]
    h = decay.reshape(*decay.shape, *(1,) * (h.ndim - decay.ndim)) * h
  h = h + b[..., :, None] * r[..., None, :] + u[..., :, None] * v[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q, h, precision=_HIGHEST)
  return o.astype(q_t.dtype), h


def dplr(q, a, b, u, v, log_g, *, h0, scale: float,
         chunk_size: int | None = None, resets=None):
  """The DPLR recurrence over a sequence, token by token. Arguments as in
  ``lsm.ops.dplr.dplr`` with ``log_g`` None or a float32 [B, T, H, K] or
  [B, T, H] array and ``h0`` a float32 array; chunk_size is ignored.
  ``resets`` (bool [B, T], ``segments.resets(segment_ids)``) zeroes the state
  entering each document's first token."""
  del chunk_size
  f32 = jnp.float32
  if resets is None:
    resets = jnp.zeros(q.shape[:2], bool)
  xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, a, b, u, v))
  gs = None if log_g is None else jnp.moveaxis(log_g.astype(f32), 1, 0)

  def body(h, x):
    x, g_t, reset = x
    h = jnp.where(reset[:, None, None, None], 0.0, h)
    o_t, h = dplr_step(*x, g_t, h, scale=scale)
    return h, o_t

  h_t, o = jax.lax.scan(body, h0, (xs, gs, jnp.moveaxis(resets, 1, 0)))
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), h_t
