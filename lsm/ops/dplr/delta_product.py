r"""DeltaProduct (Siems et al. 2025) on ``dplr`` as a time expansion.

Each token applies n_h generalised Householder steps (and, gated, one decay
first):

    S <- exp(g_t) S;  S <- (I - beta_tj k_tj k_tj^T) S + beta_tj k_tj v_tj^T,
    j = 1 .. n_h;     o_t = scale * S^T q_t.

Written as T * n_h micro-steps of ``dplr``: micro-step (t, j) has a = exp(g)
o k_tj, b = -beta_tj k_tj, u = beta_tj k_tj, v = v_tj, with the token's decay
g_t on its first micro-step and 0 on the others; the query sits on the last
micro-step (zeros elsewhere), whose output is the token's. Documents: each
token's id repeated n_h times, so a document start resets the state entering
its first micro-step. Any ``dplr`` impl, and ``sequence.dplr`` (T * n_h splits
over ``seq`` wherever T does), runs the expansion unchanged.
"""

import jax.numpy as jnp


def expand(q, k, v, beta, log_g=None, segment_ids=None):
  """DeltaProduct's per-token inputs -> ``dplr`` inputs over T * n_h steps.

  Args:
    q: [B, T, H, K] queries.
    k: [B, T, n_h, H, K] keys (unit norm for eigenvalues 1 - beta), q's dtype.
    v: [B, T, n_h, H, V] values, q's dtype.
    beta: [B, T, n_h, H] step sizes in [0, 2] (any float dtype).
    log_g: optional [B, T, H] (per head) or [B, T, H, K] (per channel) log
      decays <= 0 of each token.
    segment_ids: optional int [B, T] document ids.

  Returns:
    dict of ``dplr`` arguments q, a, b, u, v ([B, T n_h, H, *], q's dtype),
    log_g ([B, T n_h, H(, K)] float32, or None) and segment_ids ([B, T n_h],
    or None).
  """
  B, T, n_h, H, K = k.shape
  flat = lambda x: x.reshape(B, T * n_h, *x.shape[3:])  # noqa: E731
  dtype = q.dtype
  kf = k.astype(jnp.float32)
  bk = beta.astype(jnp.float32)[..., None] * kf  # [B, T, n_h, H, K]
  a = kf
  g = None
  if log_g is not None:
    first = (jnp.arange(n_h) == 0).reshape(1, 1, n_h, *(1,) * (log_g.ndim - 2))
    # [B, T, n_h, H(, K)]: the token's decay on its first micro-step
    g = jnp.where(first, log_g.astype(jnp.float32)[:, :, None], 0.0)
    # The decay folds into the read vector: (I - beta k k^T) diag(exp g) S.
    a = a * (jnp.exp(g)[..., None] if g.ndim == 4 else jnp.exp(g))
    g = flat(g)
  last = (jnp.arange(n_h) == n_h - 1).reshape(1, 1, n_h, 1, 1)
  q_rep = jnp.where(last, q[:, :, None], jnp.zeros((), dtype))
  ids = None if segment_ids is None else jnp.repeat(segment_ids, n_h, axis=1)
  return dict(q=flat(q_rep).astype(dtype), a=flat(a).astype(dtype),
              b=flat(-bk).astype(dtype), u=flat(bk).astype(dtype),
              v=flat(v).astype(dtype), log_g=g, segment_ids=ids)


def token_outputs(o, n_h: int):
  """[B, T n_h, H, V] micro-step outputs -> [B, T, H, V], each token's last."""
  return o[:, n_h - 1::n_h]
