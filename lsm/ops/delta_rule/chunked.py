r"""The (gated) delta rule in chunkwise-parallel form, pure JAX. The recurrence is
defined in ``reference.py``; this computes the same function.

UT / WY representation (Yang et al. 2024, DeltaNet; Gated DeltaNet for the
decay). Inside a chunk of C tokens with gate sums gamma_t = sum_{u<=t} g_u and
S the state entering the chunk, write S_t = exp(gamma_t) S + sum_{s<=t}
exp(gamma_t - gamma_s) k_s u_s^T. The pseudo-values u_t then satisfy

    (I + L) U = diag(beta) (V - diag(exp(gamma)) K S),
    L[t, s] = beta_t exp(gamma_t - gamma_s) k_t . k_s  for s < t (strictly lower),

so with T = (I + L)^{-1}, W_v = T diag(beta) V and W_k = T diag(beta exp(gamma)) K:

    U     = W_v - W_k S
    O     = scale * [diag(exp(gamma)) Q S + (M o Q K^T) U],  M[t,s] = exp(gamma_t - gamma_s), s <= t
    S_out = exp(gamma_C) S + (exp(gamma_C - gamma) o K)^T U

T, W_k and W_v depend only on the chunk and are computed for all chunks at once;
only U and S_out depend on the incoming state, so the chunk-to-chunk pass is a
``lax.scan`` over N chunks with two [C, K] x [K, V]-sized matmuls per step.

T comes from ``common.triangular.unit_lower_inverse`` (forward substitution plus a
closed-form VJP): a batched ``triangular_solve`` gradient deadlocks on some CPUs.
beta in [0, 2] (negative eigenvalues) needs no special case. The decay is scalar
per head, so its [C, C] weights are formed in log space directly; every exponent
is <= 0 and masked exponents are zeroed before ``exp``. Gate sums that end at a
chunk's last token are formed as shifted reverse cumsums, not as differences.
Gradients come from autodiff (the scan stores one [K, V] state per chunk).

All arithmetic is float32 with HIGHEST-precision matmuls; outputs are cast back to
q's dtype.
"""

import jax
import jax.numpy as jnp

from lsm.ops.common import segments
from lsm.ops.common.chunking import from_chunks, pad_time, to_chunks
from lsm.ops.common.triangular import unit_lower_inverse
from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HIGHEST)


def chunk_factors(k, v, beta, g, masks=None):
  """Per-chunk quantities that do not depend on the incoming state.

  Args:
    k: [..., C, K]; v: [..., C, V]; beta, g: [..., C]; all float32.
    masks: with documents, ``segments.chunk_masks`` broadcast to k's leading
      dims (same [..., C, C], carry and tail [..., C]); None without.

  Returns:
    w_k: [..., C, K]; w_v: [..., C, V]; decay_in: [..., C] = exp(gamma_t)
    (0 from the chunk's first reset on: the incoming state no longer reaches t);
    m: [..., C, C] = exp(gamma_t - gamma_s) for s <= t in one document, else 0;
    k_out: [..., C, K] = exp(gamma_C - gamma_s) k_s (0 outside the chunk's last
    document); decay_out: [...] = exp(gamma_C) (0 if the chunk has a reset).
  """
  C = k.shape[-2]
  gamma = jnp.cumsum(g, axis=-1)
  idx = jnp.arange(C)
  strict = idx[:, None] > idx[None, :]
  causal = idx[:, None] >= idx[None, :]
  if masks is not None:
    same, carry, tail = masks
    strict, causal = strict & same, causal & same
  diff = jnp.where(strict, gamma[..., :, None] - gamma[..., None, :], 0.0)
  m = jnp.where(causal, jnp.exp(diff), 0.0)  # [..., C, C]
  kk = _einsum("...tk,...sk->...ts", k, k)
  l = jnp.where(strict, beta[..., :, None] * m * kk, 0.0)
  t = unit_lower_inverse(l)
  decay_in = jnp.exp(gamma)
  if masks is not None:
    decay_in = jnp.where(carry, decay_in, 0.0)
  w_k = _einsum("...ts,...sk->...tk", t, (beta * decay_in)[..., None] * k)
  w_v = _einsum("...ts,...sv->...tv", t, beta[..., None] * v)
  rev = jnp.cumsum(g[..., ::-1], axis=-1)[..., ::-1]  # sum_{u >= s} g_u
  to_end = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
  k_out = jnp.exp(to_end)[..., None] * k
  decay_out = jnp.exp(rev[..., 0])
  if masks is not None:
    k_out = jnp.where(tail[..., None], k_out, 0.0)
    decay_out = jnp.where(carry[..., -1], decay_out, 0.0)
  return w_k, w_v, decay_in, m, k_out, decay_out


def delta_rule(q, k, v, beta, log_g, *, h0, scale: float, chunk_size: int = 64,
               resets=None):
  """Chunked delta rule. Arguments as in ``lsm.ops.delta_rule.delta_rule``, with
  ``log_g`` already a float32 [B, T, H] array, ``h0`` float32 [B, H, K, V] and
  ``resets`` None or ``segments.resets(segment_ids)``."""
  T, dtype = q.shape[1], q.dtype
  f32 = jnp.float32
  q, k, v, beta, g = (to_chunks(pad_time(x.astype(f32), chunk_size), chunk_size)
                      for x in (q, k, v, beta, log_g))  # [B, H, N, C, *]
  masks = None
  if resets is not None:
    resets = jnp.pad(resets, ((0, 0), (0, q.shape[2] * chunk_size - T)))
    masks = tuple(x[:, None] for x in segments.chunk_masks(resets, chunk_size))
  w_k, w_v, decay_in, m, k_out, decay_out = chunk_factors(k, v, beta, g, masks)

  def step(h, x):
    w_k_n, w_v_n, k_out_n, decay_n = x
    u = w_v_n - _einsum("bhck,bhkv->bhcv", w_k_n, h)
    h_next = decay_n[..., None, None] * h + _einsum("bhck,bhcv->bhkv", k_out_n, u)
    return h_next, (h, u)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (w_k, w_v, k_out, decay_out))
  h_t, (h_in, u) = jax.lax.scan(step, h0, xs)
  h_in, u = jnp.moveaxis(h_in, 0, 2), jnp.moveaxis(u, 0, 2)
  o = _einsum("bhnck,bhnkv->bhncv", decay_in[..., None] * q, h_in)
  a = m * _einsum("bhntk,bhnsk->bhnts", q, k)
  o = o + _einsum("bhnts,bhnsv->bhntv", a, u)
  return from_chunks(scale * o, T).astype(dtype), h_t
