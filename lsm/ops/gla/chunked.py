"""GLA in chunkwise-parallel form, pure JAX. The recurrence is defined in
``reference.py``; this computes the same function.

The sequence is cut into N chunks of C tokens. With b_t the cumulative log gate
inside a chunk (b_t <= 0, non-increasing in t) and S the state entering the chunk:

    o_t   = scale * [(q_t * exp(b_t)) S + sum_{s<=t} (q_t * exp(b_t - b_s)) . k_s v_s]
    S_out = exp(b_C) * S + sum_s (k_s * exp(b_C - b_s))^T v_s

The chunk-to-chunk state pass is a ``lax.scan`` over N (elementwise decay plus a
precomputed [K, V] summary per chunk); everything else is batched matmuls.

Two exact forms, one chosen per call from the gates, inside a custom VJP so
that the choice costs the common case nothing (see "How the form is chosen"):

* Fast form, while no chunk decays by more than FAST_MAX_DECAY nats in any
  channel (typical learned gates, log-sigmoid / 16, decay about 3 nats per chunk
  of 64): the plain split exp(b_t - b_s) = exp(b_t) exp(-b_s), so the intra-chunk
  matrix is one masked matmul, and a hand-written VJP (``_fast_bwd``) that keeps
  what plain autodiff would keep (the chunk states, the intra-chunk matrix and
  the decay factors).
  Exponents reach at most the chunk decay D <= 20, so nothing overflows, and the
  weights carry a relative rounding error of about D * 2**-24 < 1.2e-6.
* Stable form, otherwise (strong decay): splitting overflows float32 once
  |b| > 88, e.g. log_g = -5 per step after 18 tokens. The inter-chunk terms use
  only exponents <= 0 (b_t, and b_C - b_s as a shifted reverse cumsum). Inside a
  chunk, secondary chunking as in flash-linear-attention: sub-chunks of c = 16
  tokens, blocks below the diagonal pivoting on the gate sum just before their
  row block (all exponents <= 0), diagonal c x c blocks in log space,
  sum_k q_tk k_sk exp(b_tk - b_sk), exact for any decay. Masked exponents are
  replaced by 0 before ``exp`` so that neither values nor gradients see inf. The
  diagonal t = s terms (weight exactly 1) are kept out of the gated products,
  and gate sums are cumsums of the gates rather than differences of cumsums, so
  d log_g has no cancelling O(1) terms when the decay is strong. Gradients from
  autodiff of this form (recomputed in the backward pass; this path is rare),
  except the log-space block's own VJP.

How the form is chosen. The fast form always runs; the stable form runs only
when a chunk decays too much, as the body of a ``lax.while_loop`` that makes
zero or one trips and overwrites the fast form's (then overflowed) results in
place. Measured on XLA:CPU (B=2, T=8192, H=4, K=64, fwd+bwd), both alternatives
cost the common case:
- ``lax.cond`` differentiated as it is returns the residuals of both branches
  (the untaken one's zero-filled), and the stable form's are [..., m, C, K]
  tensors: 2x the plain form's time at T=2048.
- ``lax.cond`` inside the custom VJP copies every branch result into the cond's
  output buffers (and chunk-layout operands into transposed copies in front of
  it): four [B, T, H, D] arrays each way, 264 ms against 204 ms for the fast
  form alone. A while loop's carry is updated in place instead: 132 ms against
  129 ms.
The residuals are the inputs plus the fast form's (chunk states, intra-chunk
matrix, exp(b)); the stable backward recomputes its forward, being rare.

All arithmetic is float32 with HIGHEST-precision matmuls (no TF32 on GPU);
outputs are cast back to q's dtype.
"""

import functools

import jax
import jax.numpy as jnp

from lsm.ops.common import segments
from lsm.ops.common.chunking import from_chunks, pad_time, to_chunks
from lsm.ops import _dispatch
from lsm.ops.gla import chunked_scalar

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

_HIGHEST = jax.lax.Precision.HIGHEST
SUB_CHUNK = 16  # sub-chunk length of the secondary-chunking form
FAST_MAX_DECAY = 20.0  # largest chunk decay (nats) for the fast form


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


def _local_gate_sums(g):
  """z_t = sum_{first < u <= t} g_u along axis -2, a cumsum with the first gate
  dropped rather than a difference of cumsums, so its gradient has no cancelling
  terms."""
  return jnp.cumsum(g.at[..., 0, :].set(0.0), axis=-2)


def _intra_secondary(q, k, v, g, same, sub: int):
  """Intra-chunk output by secondary chunking: exact for any decay.

  Row block i (c = sub tokens) against earlier blocks pivots on r_i, the gate sum
  just before block i: q_t exp(b_t - r_i) and k_s exp(r_i - b_s), both exponents
  <= 0. Diagonal c x c blocks are formed in log space (``_diag_blocks_log``).
  ``same`` (bool [..., C, C], or None without documents) keeps only pairs in
  one document.
  """
  *lead, C, K = q.shape
  V = v.shape[-1]
  m = C // sub
  qs = q.reshape(*lead, m, sub, K)
  ks = k.reshape(*lead, m, sub, K)
  vs = v.reshape(*lead, m, sub, V)
  gs = g.reshape(*lead, m, sub, K)
  a = _with_diagonal(_diag_blocks_log(qs, ks, _local_gate_sums(gs)), qs, ks)
  if same is not None:
    rows = same.reshape(*same.shape[:-2], m, sub, C)  # [..., m, c, C]
    blocks = rows.reshape(*rows.shape[:-1], m, sub)  # [..., m, c, m, c]
    diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)
    a = jnp.where(diag, a, 0.0)  # [..., m, c, c]
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
  keep = before[:, None, :] if same is None else before[:, None, :] & rows
  a_off = jnp.where(keep, a_off, 0.0)
  o = o + _einsum("...mts,...sv->...mtv", a_off, v)
  return o.reshape(*lead, C, V)


def chunk_states(k, v, g, h0, tail=None, carry_out=None):
  """States entering each chunk and the final state (stable form: every
  exponent <= 0).

  Args:
    k: [B, H, N, C, K], v: [B, H, N, C, V], g: [B, H, N, C, K] float32 log gates.
    h0: [B, H, K, V] float32.
    tail, carry_out: with documents, bool [B, 1, N, C, 1] (tokens that reach
      the state leaving the chunk) and [B, 1, N, 1] (the incoming state does);
      None without.

  Returns:
    h_in: [B, H, N, K, V] state before each chunk; h_T: [B, H, K, V].
  """
  # Decay from token s to the chunk end, sum_{u > s} g_u: a reverse cumsum shifted
  # by one (not b_C - b_s, whose gradient for s = C would cancel two O(1) terms).
  rev = jnp.cumsum(g[..., ::-1, :], axis=-2)[..., ::-1, :]  # sum_{u >= s} g_u
  to_end = jnp.concatenate([rev[..., 1:, :], jnp.zeros_like(rev[..., :1, :])], -2)
  kd, decay = k * jnp.exp(to_end), jnp.exp(rev[..., 0, :])
  if tail is not None:
    kd, decay = jnp.where(tail, kd, 0.0), jnp.where(carry_out, decay, 0.0)
  return _state_scan(decay, _einsum("bhnck,bhncv->bhnkv", kd, v), h0)


def _state_scan(decay, u, h0, axis: int = 2):
  """h_{n+1} = decay_n h_n + u_n over the chunks (axis ``axis``): e.g. decay
  [B, H, N, K], u [B, H, N, K, V] -> (h_in [B, H, N, K, V], h_T)."""
  def step(h, x):
    d, u_n = x
    return d[..., None] * h + u_n, h

  h_t, h_in = jax.lax.scan(step, h0, (jnp.moveaxis(decay, axis, 0),
                                      jnp.moveaxis(u, axis, 0)))
  return jnp.moveaxis(h_in, 0, axis), h_t


def _stable(q, k, v, g, h0, masks, *, scale, sub):
  """The stable form: outputs [B, H, N, C, V] (scaled), h_T and the chunk
  states h_in. ``masks``: ``segments.chunk_masks`` ([B, N, ...]) or None."""
  same = carry = tail = carry_out = None
  if masks is not None:
    same, carry, tail = (x[:, None] for x in masks)  # broadcast over H
    carry, tail, carry_out = carry[..., None], tail[..., None], carry[..., -1:]
  h_in, h_t = chunk_states(k, v, g, h0, tail, carry_out)
  q_in = q * jnp.exp(jnp.cumsum(g, axis=3))
  if carry is not None:
    q_in = jnp.where(carry, q_in, 0.0)
  o = _einsum("bhnck,bhnkv->bhncv", q_in, h_in)
  # One chunk at a time (each rematerialised in the backward pass): the
  # secondary form's [m, C, K] and [m, c, c, K] temporaries then exist for one
  # chunk, not all N. XLA sizes the op's temporary buffer for both forms, so
  # without this the fast path's fwd+bwd reserved 357 MiB at B=2, T=2048, H=4,
  # K=64 (93 MiB with it, when the forms were branches of a cond; the plain
  # form 40 MiB).
  one_chunk = jax.checkpoint(lambda x: _intra_secondary(*x, sub=sub))
  per_chunk = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, g))
  per_chunk += (None if same is None else jnp.moveaxis(same, 2, 0),)
  intra = jax.lax.map(one_chunk, per_chunk)
  o = o + jnp.moveaxis(intra, 0, 2)
  return scale * o, h_t, h_in


def _stable_timewise(q, k, v, g, h0, masks, *, scale, sub, chunk):
  """``_stable`` on [B, T, H, D] inputs (T % chunk == 0): o [B, T, H, V], h_T."""
  o, h_t, _ = _stable(*(to_chunks(x, chunk) for x in (q, k, v, g)), h0, masks,
                      scale=scale, sub=sub)
  return from_chunks(o, q.shape[1]), h_t


def _decay_factors(e_pos):
  """exp(-b), exp(b_C - b) [B, H, N, C, K] of the fast form from e_pos = exp(b),
  b the in-chunk cumsum of the gates. Only exp(b) is a residual; the backward
  rederives these inside the fusions that use them. While the chunk decay is
  <= FAST_MAX_DECAY, 1 / exp(b) and exp(b_C) / exp(b) are exact to a few ulps
  (no overflow, no underflow)."""
  e_neg = 1.0 / e_pos
  return e_neg, e_pos[..., -1:, :] * e_neg


def _to_lead_chunks(x, chunk: int):
  """[B, T, H, D] (T % chunk == 0) -> [N, B, H, C, D]."""
  B, T, H, D = x.shape
  return x.reshape(B, T // chunk, chunk, H, D).transpose(1, 0, 3, 2, 4)


def _from_lead_chunks(x):
  """[N, B, H, C, D] -> [B, N * C, H, D]."""
  N, B, H, C, D = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(B, N * C, H, D)


def _causal(n):
  idx = jnp.arange(n)
  return idx[:, None] >= idx[None, :]  # [C, C]


def _lead_masks(masks):
  """``segments.chunk_masks`` ([B, N, ...]) in the fast form's layout: same
  [N, B, 1, C, C], carry and tail [N, B, 1, C, 1], carry_out [N, B, 1, 1]
  (whether the incoming state leaves the chunk). None stays None."""
  if masks is None:
    return None
  same, carry, tail = (jnp.swapaxes(x, 0, 1)[:, :, None] for x in masks)
  carry, tail = carry[..., None], tail[..., None]
  return same, carry, tail, carry[..., -1, :]


def _cut(masks, qe, kd, decay):
  """The fast form's terms cut by ``_lead_masks`` (see ``_fast``): (the
  intra-chunk keep mask, qe as it reads the incoming state, kd as it writes the
  outgoing one, the chunk decay of the incoming state). No masks: causal and
  the terms as they are."""
  keep = _causal(qe.shape[3])
  if masks is None:
    return keep, qe, kd, decay
  same, carry, tail, carry_out = masks
  return (keep & same, jnp.where(carry, qe, 0.0), jnp.where(tail, kd, 0.0),
          jnp.where(carry_out, decay, 0.0))


def _factors(q, k, e_pos):
  """(qe, ke, kd, decay) = (q exp(b), k exp(-b), k exp(b_C - b), exp(b_C)) of
  the fast form from e_pos = exp(b). e_pos None (no gate, every factor 1):
  (q, k, k, ones), with nothing for XLA to constant-fold (an all-zero gate is a
  constant that XLA:CPU folds into [N, B, H, C, K] literals: 3.8x the time of
  the same call with a traced gate, at K = 273)."""
  if e_pos is None:
    return q, k, k, jnp.ones((*q.shape[:3], q.shape[-1]), q.dtype)
  e_neg, e_end = _decay_factors(e_pos)
  return q * e_pos, k * e_neg, k * e_end, e_pos[..., -1, :]


def _fast(q, k, v, g, h0, masks, *, scale):
  """The fast form on chunks [N, B, H, C, D] (chunk axis first: the state scans
  then need no transposes): outputs [N, B, H, C, V] (scaled), h_T, and the
  residuals of ``_fast_bwd``: h_in, the masked intra-chunk matrix a
  [N, B, H, C, C] and exp(b). ``masks``: ``_lead_masks`` or None.

  With documents every term is cut by a mask (see ``segments``): a keeps pairs
  in one document, the incoming state reaches only tokens before the chunk's
  first reset (carry), only the last document's tokens reach the outgoing
  state (tail), and the incoming state leaves the chunk only if no reset is in
  it (carry_out)."""
  e_pos = None if g is None else jnp.exp(jnp.cumsum(g, axis=3))
  qe, ke, kd, decay = _factors(q, k, e_pos)
  keep, q_in, kd, decay = _cut(masks, qe, kd, decay)
  a = jnp.where(keep, _einsum("nbhtk,nbhsk->nbhts", qe, ke), 0.0)
  h_in, h_t = _state_scan(decay, _einsum("nbhck,nbhcv->nbhkv", kd, v), h0,
                          axis=0)
  o = _einsum("nbhts,nbhsv->nbhtv", a, v) + _einsum("nbhck,nbhkv->nbhcv", q_in,
                                                    h_in)
  return scale * o, h_t, (h_in, a, e_pos)


def _use_fast(g, chunk: int):
  """True when no chunk decays by more than FAST_MAX_DECAY nats in any
  channel (one scalar for the call). g: [B, T, H, K], T % chunk == 0."""
  B, T, H, K = g.shape
  per_chunk = jnp.sum(g.reshape(B, T // chunk, chunk, H, K), axis=2)
  return -jnp.min(per_chunk) <= FAST_MAX_DECAY


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked(q, k, v, g, h0, resets, scale, sub, chunk):
  return _chunked_fwd(q, k, v, g, h0, resets, scale, sub, chunk)[0]


def _chunked_fwd(q, k, v, g, h0, resets, scale, sub, chunk):
  """Forward on [B, T, H, D] inputs (T % chunk == 0; ``resets`` bool [B, T] or
  None): (o, h_T) and residuals (the inputs and the fast form's; the stable
  backward recomputes)."""
  masks = None if resets is None else segments.chunk_masks(resets, chunk)
  lead_g = None if g is None else _to_lead_chunks(g, chunk)
  o, h_t, res = _fast(*(_to_lead_chunks(x, chunk) for x in (q, k, v)), lead_g,
                      h0, _lead_masks(masks), scale=scale)
  o = _from_lead_chunks(o)
  if g is None:  # no decay: the fast form is exact
    return (o, h_t), (q, k, v, g, h0, resets, res, None)
  fast = _use_fast(g, chunk)

  def stable(carry):
    del carry
    return False, *_stable_timewise(q, k, v, g, h0, masks, scale=scale, sub=sub,
                                    chunk=chunk)

  _, o, h_t = jax.lax.while_loop(lambda c: c[0], stable,
                                 (jnp.logical_not(fast), o, h_t))
  return (o, h_t), (q, k, v, g, h0, resets, res, fast)


def _fast_bwd(scale, q, k, v, res, do, dh_t, masks):
  """VJP of ``_fast`` given its residuals (see the module docstring for the
  forward: o = scale [a v + qe h_in], h_{n+1} = decay_n h_n + kd_n^T v_n with
  qe = q exp(b), ke = k exp(-b), kd = k exp(b_C - b), decay = exp(b_C); with
  documents, ``_fast``'s masks on each term)."""
  h_in, a, e_pos = res
  qe, ke, kd, decay = _factors(q, k, e_pos)
  dos = scale * do
  keep, q_in, kd_out, decay = _cut(masks, qe, kd, decay)

  # dh_out[n]: gradient for the state leaving chunk n; the carry ends as dh0.
  # The per-chunk products are one batched matmul outside the sequential loop.
  def step(dh, x):
    d, w_n = x
    return d[..., None] * dh + w_n, dh

  w = _einsum("nbhck,nbhcv->nbhkv", q_in, dos)  # [N, B, H, K, V]
  dh0, dh_out = jax.lax.scan(step, dh_t, (decay, w), reverse=True)

  da = jnp.where(keep, _einsum("nbhtv,nbhsv->nbhts", dos, v), 0.0)
  dv = (_einsum("nbhts,nbhtv->nbhsv", a, dos)
        + _einsum("nbhck,nbhkv->nbhcv", kd_out, dh_out))
  dq_in = _einsum("nbhcv,nbhkv->nbhck", dos, h_in)
  dkd = _einsum("nbhcv,nbhkv->nbhck", v, dh_out)
  if masks is not None:
    _, carry, tail, _ = masks
    dq_in = jnp.where(carry, dq_in, 0.0)
    dkd = jnp.where(tail, dkd, 0.0)
  dqe = _einsum("nbhts,nbhsk->nbhtk", da, ke) + dq_in
  dke = _einsum("nbhts,nbhtk->nbhsk", da, qe)
  if e_pos is None:  # no gate: qe = q, ke = kd = k
    return dqe, dke + dkd, dv, None, dh0
  e_neg, e_end = _decay_factors(e_pos)
  # Through b_t = sum_{u <= t} g_u (qe: +b, ke: -b, kd: -b) and through the
  # chunk total b_C (kd: +b_C; the state decay exp(b_C)), which every gate of
  # the chunk enters.
  db = dqe * qe - dke * ke - dkd * kd  # [N, B, H, C, K]
  db_end = (jnp.sum(dkd * kd, axis=3)
            + decay * jnp.sum(h_in * dh_out, axis=-1))  # [N, B, H, K]
  dg = jnp.cumsum(db[..., ::-1, :], axis=3)[..., ::-1, :] + db_end[..., None, :]
  return dqe * e_pos, dke * e_neg + dkd * e_end, dv, dg, dh0


def _chunked_bwd(scale, sub, chunk, res, cts):
  q, k, v, g, h0, resets, fast_res, fast = res
  do, dh_t = cts
  masks = None if resets is None else segments.chunk_masks(resets, chunk)
  grads = _fast_bwd(scale, *(_to_lead_chunks(x, chunk) for x in (q, k, v)),
                    fast_res, _to_lead_chunks(do, chunk), dh_t,
                    _lead_masks(masks))
  grads = (*(None if d is None else _from_lead_chunks(d) for d in grads[:4]),
           grads[4])
  if g is None:
    return (*grads, None)

  def stable(carry):
    del carry
    forward = functools.partial(_stable_timewise, masks=masks, scale=scale,
                                sub=sub, chunk=chunk)
    return False, *jax.vjp(forward, q, k, v, g, h0)[1]((do, dh_t))

  grads = jax.lax.while_loop(lambda c: c[0], stable,
                             (jnp.logical_not(fast), *grads))[1:]
  return (*grads, None)  # no cotangent for the reset flags


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def gla(q, k, v, log_g, *, h0, scale: float, chunk_size: int = 64, resets=None):
  """Chunked GLA. Arguments as in ``lsm.ops.gla.gla``, with ``log_g`` float32
  [B, T, H, K] (per channel: the forms above), [B, T, H] (one gate per head:
  ``chunked_scalar``'s scalar-decay form, exact at any decay) or None (no
  decay: plain linear attention, without the gate factors), ``h0`` a float32
  [B, H, K, V] array and ``resets`` None or ``segments.resets(segment_ids)``."""
  if log_g is not None and log_g.ndim == 3:
    return chunked_scalar.gla(q, k, v, log_g, h0=h0, scale=scale,
                              chunk_size=chunk_size, resets=resets)
  T, dtype = q.shape[1], q.dtype
  q, k, v = (pad_time(x.astype(jnp.float32), chunk_size)
             for x in (q, k, v))  # [B, Tp, H, *]
  g = None if log_g is None else pad_time(log_g.astype(jnp.float32), chunk_size)
  if resets is not None:
    resets = jnp.pad(resets, ((0, 0), (0, q.shape[1] - T)))
  o, h_t = _chunked(q, k, v, g, h0.astype(jnp.float32), resets, float(scale),
                    min(chunk_size, SUB_CHUNK), chunk_size)
  return o[:, :T].astype(dtype), h_t
