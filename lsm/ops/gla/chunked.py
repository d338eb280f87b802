"""GLA in chunkwise-parallel form, pure JAX. The recurrence is defined in
``reference.py``; this computes the same function.

The sequence is cut into N chunks of C tokens. With b_t the cumulative log gate
inside a chunk (b_t <= 0, non-increasing in t) and S the state entering the chunk:

    o_t   = scale * [(q_t * exp(b_t)) S + sum_{s<=t} (q_t * exp(b_t - b_s)) . k_s v_s]
    S_out = exp(b_C) * S + sum_s (k_s * exp(b_C - b_s))^T v_s

The chunk-to-chunk state pass is a ``lax.scan`` over N (elementwise decay plus a
precomputed [K, V] summary per chunk); everything else is batched matmuls.

Numerics, strong decay. Splitting exp(b_t - b_s) as exp(b_t) * exp(-b_s) overflows
float32 once |b| > 88, e.g. log_g = -5 per step after 18 tokens. The inter-chunk
terms only use exponents <= 0 (b_t, and b_C - b_s as a shifted reverse cumsum).
Inside a chunk (``intra_chunk``) one of two exact forms runs, chosen per call:
while no chunk decays by more than PIVOT_MAX_DECAY nats in any channel, a single
pivot at the chunk's first token, q_t exp(b_t - b_1) and k_s exp(b_1 - b_s), makes
the intra-chunk matrix one matmul (no overflow, rounding below 1.2e-6); otherwise
secondary chunking as in flash-linear-attention: sub-chunks of c = 16 tokens,
blocks below the diagonal pivoting on the gate sum just before their row block
(all exponents <= 0), diagonal c x c blocks in log space, sum_k q_tk k_sk
exp(b_tk - b_sk), exact for any decay. Masked exponents are replaced by 0 before
``exp`` so that neither values nor gradients see inf. The diagonal t = s terms
(weight exactly 1) are kept out of the gated products, and gate sums are cumsums
of the gates rather than differences of cumsums, so d log_g has no cancelling
O(1) terms when the decay is strong. Gradients come from autodiff, except the
log-space block's own VJP.

All arithmetic is float32 with HIGHEST-precision matmuls (no TF32 on GPU);
outputs are cast back to q's dtype.
"""

import functools

import jax
import jax.numpy as jnp

from lsm.ops.common.chunking import from_chunks, pad_time, to_chunks

_HIGHEST = jax.lax.Precision.HIGHEST
SUB_CHUNK = 16  # sub-chunk length of the secondary-chunking form
PIVOT_MAX_DECAY = 20.0  # largest chunk decay (nats) for the single-pivot form


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HIGHEST)


def _strict(n: int):
  idx = jnp.arange(n)
  return idx[:, None] > idx[None, :]  # [c, c]


def _with_diagonal(a_strict, q, k):
  """Adds A_tt = q_t . k_t, whose weight exp(0) = 1 has no gate dependence.

  Keeping it out of the gated terms matters for d log_g under strong decay: as a
  gated term it adds +x and -x to the gradient of the same gate, and rounding of
  those O(1) terms swamps a true gradient of size exp(log_g).
  """
  diag = jnp.sum(q * k, axis=-1)  # [..., c]
  return a_strict + diag[..., :, None] * jnp.eye(q.shape[-2], dtype=q.dtype)


def _weights(z):
  """exp(z_t - z_s) for s < t, else 1 (masked after use). [..., c, K] -> [..., c, c, K]."""
  diff = z[..., :, None, :] - z[..., None, :, :]
  return jnp.exp(jnp.where(_strict(z.shape[-2])[:, :, None], diff, 0.0))


@jax.custom_vjp
def _diag_blocks_log(q, k, z):
  """sum_k q_tk k_sk exp(z_tk - z_sk) for s < t (0 elsewhere), in log space.

  q, k, z: [..., c, K] float32 -> [..., c, c]. The VJP recomputes the
  [..., c, c, K] weights instead of storing them, and gets the gradient for z from
  dA/dz_t = sum_s P_ts - sum_s' P_s't with P = q k exp(z_t - z_s), which is
  q * dq - k * dk: two reductions, not four.
  """
  a = jnp.sum(q[..., :, None, :] * k[..., None, :, :] * _weights(z), axis=-1)
  return jnp.where(_strict(q.shape[-2]), a, 0.0)


def _diag_blocks_fwd(q, k, z):
  return _diag_blocks_log(q, k, z), (q, k, z)


def _diag_blocks_bwd(res, da):
  q, k, z = res
  da = jnp.where(_strict(q.shape[-2]), da, 0.0)[..., None]  # [..., c, c, 1]
  w = _weights(z)
  dq = jnp.sum(da * k[..., None, :, :] * w, axis=-2)
  dk = jnp.sum(da * q[..., :, None, :] * w, axis=-3)
  return dq, dk, q * dq - k * dk


_diag_blocks_log.defvjp(_diag_blocks_fwd, _diag_blocks_bwd)


def _strict_pivot(q, k, z):
  """The same strictly-lower matrix as one matmul, pivoting on the first token:
  q scaled by exp(z_t) <= 1, k by exp(-z_s) >= 1. Exact while -z_last, the
  block's total decay, stays below PIVOT_MAX_DECAY (the caller checks)."""
  a = _einsum("...tk,...sk->...ts", q * jnp.exp(z), k * jnp.exp(-z))
  return jnp.where(_strict(q.shape[-2]), a, 0.0)


def _local_gate_sums(g):
  """z_t = sum_{first < u <= t} g_u along axis -2, a cumsum with the first gate
  dropped rather than a difference of cumsums, so its gradient has no cancelling
  terms."""
  return jnp.cumsum(g.at[..., 0, :].set(0.0), axis=-2)


def _intra_pivot(q, k, v, g):
  """Intra-chunk output with one pivot per chunk: two matmuls. Exact when the
  chunk's decay is at most PIVOT_MAX_DECAY in every channel."""
  a = _with_diagonal(_strict_pivot(q, k, _local_gate_sums(g)), q, k)
  return _einsum("...ts,...sv->...tv", a, v)


def _intra_secondary(q, k, v, g, sub: int):
  """Intra-chunk output by secondary chunking: exact for any decay.

  Row block i (c = sub tokens) against earlier blocks pivots on r_i, the gate sum
  just before block i: q_t exp(b_t - r_i) and k_s exp(r_i - b_s), both exponents
  <= 0. Diagonal c x c blocks are formed in log space (``_diag_blocks_log``).
  """
  *lead, C, K = q.shape
  V = v.shape[-1]
  m = C // sub
  qs = q.reshape(*lead, m, sub, K)
  ks = k.reshape(*lead, m, sub, K)
  vs = v.reshape(*lead, m, sub, V)
  gs = g.reshape(*lead, m, sub, K)
  a = _with_diagonal(_diag_blocks_log(qs, ks, _local_gate_sums(gs)), qs, ks)
  o = _einsum("...mts,...msv->...mtv", a, vs)  # [..., m, c, V]
  if m == 1:
    return o.reshape(*lead, C, V)

  b = jnp.cumsum(g, axis=-2)  # [..., C, K]
  bs = b.reshape(*lead, m, sub, K)
  r = jnp.concatenate([jnp.zeros_like(bs[..., :1, -1, :]), bs[..., :-1, -1, :]],
                      axis=-2)  # [..., m, K]
  q_hat = qs * jnp.exp(jnp.cumsum(gs, axis=-2))  # exp(b_t - r_i) <= 1
  before = (jnp.arange(C) // sub)[None, :] < jnp.arange(m)[:, None]  # [m, C]
  expo = jnp.where(before[:, :, None], r[..., :, None, :] - b[..., None, :, :], 0.0)
  k_hat = k[..., None, :, :] * jnp.exp(expo)  # [..., m, C, K]
  a_off = _einsum("...mtk,...msk->...mts", q_hat, k_hat)  # [..., m, c, C]
  a_off = jnp.where(before[:, None, :], a_off, 0.0)
  o = o + _einsum("...mts,...sv->...mtv", a_off, v)
  return o.reshape(*lead, C, V)


def intra_chunk(q, k, v, g, sub: int):
  """sum_{s<=t in chunk} (q_t * exp(b_t - b_s)) . k_s v_s for every t.

  One choice per call: the single-pivot matmul form when every chunk's decay is
  at most PIVOT_MAX_DECAY nats in every channel, secondary chunking otherwise.
  Both are exact where used: the pivot's exponents reach the chunk decay D, so
  exp(D) must not overflow, and its weights exp(z_t) exp(-z_s) carry a relative
  rounding error of about D * 2**-24, so D <= 20 keeps them below 1.2e-6. Typical
  learned gates (log-sigmoid / 16, about -0.05 per token) take the fast form;
  log_g = -5 per token takes the exact one.

  Args:
    q, k: [..., C, K] float32; v: [..., C, V] float32.
    g: [..., C, K] float32 log gates.
    sub: sub-chunk length c for secondary chunking; C % c == 0.

  Returns:
    [..., C, V] float32.
  """
  decay = -jnp.min(jnp.sum(g[..., 1:, :], axis=-2))
  return jax.lax.cond(decay <= PIVOT_MAX_DECAY, _intra_pivot,
                      functools.partial(_intra_secondary, sub=sub), q, k, v, g)


def chunk_states(k, v, g, h0):
  """States entering each chunk and the final state.

  Args:
    k: [B, H, N, C, K], v: [B, H, N, C, V], g: [B, H, N, C, K] float32 log gates.
    h0: [B, H, K, V] float32.

  Returns:
    h_in: [B, H, N, K, V] state before each chunk; h_T: [B, H, K, V].
  """
  # Decay from token s to the chunk end, sum_{u > s} g_u: a reverse cumsum shifted
  # by one (not b_C - b_s, whose gradient for s = C would cancel two O(1) terms).
  rev = jnp.cumsum(g[..., ::-1, :], axis=-2)[..., ::-1, :]  # sum_{u >= s} g_u
  to_end = jnp.concatenate([rev[..., 1:, :], jnp.zeros_like(rev[..., :1, :])], -2)
  u = _einsum("bhnck,bhncv->bhnkv", k * jnp.exp(to_end), v)

  def step(h, x):
    decay, u_n = x
    return decay[..., None] * h + u_n, h

  xs = (jnp.moveaxis(jnp.exp(rev[..., 0, :]), 2, 0), jnp.moveaxis(u, 2, 0))
  h_t, h_in = jax.lax.scan(step, h0, xs)
  return jnp.moveaxis(h_in, 0, 2), h_t


def gla(q, k, v, log_g, *, h0, scale: float, chunk_size: int = 64):
  """Chunked GLA. Arguments as in ``lsm.ops.gla.gla``, with ``log_g`` already
  [B, T, H, K] and ``h0`` a float32 [B, H, K, V] array."""
  T, dtype = q.shape[1], q.dtype
  f32 = jnp.float32
  q, k, v, g = (to_chunks(pad_time(x.astype(f32), chunk_size), chunk_size)
                for x in (q, k, v, log_g))  # [B, H, N, C, *]
  h_in, h_t = chunk_states(k, v, g, h0)
  o = _einsum("bhnck,bhnkv->bhncv", q * jnp.exp(jnp.cumsum(g, axis=3)), h_in)
  o = o + intra_chunk(q, k, v, g, min(chunk_size, SUB_CHUNK))
  return from_chunks(scale * o, T).astype(dtype), h_t
