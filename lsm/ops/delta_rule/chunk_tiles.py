r"""Per-chunk tile math of the (gated) delta rule, shared by both Pallas backends.

The recurrence is defined in ``reference.py``; the chunkwise UT / WY form used
here is derived in ``chunked.py``'s docstring. For one chunk of C tokens, with
gamma_t = sum_{u<=t} g_u, the entering state S [K, BV] and T = (I + L)^{-1}:

    L[t, s] = beta_t exp(gamma_t - gamma_s) k_t . k_s      (s < t)
    W_k = T diag(beta exp(gamma)) K,   W_v = T diag(beta) V
    U   = W_v - W_k S
    O   = scale [diag(exp(gamma)) Q S + (M o Q K^T) U]
    S'  = exp(gamma_C) S + (exp(gamma_C - gamma) o K)^T U

Every column block of V (and of S, U, O) is independent of the others, so the
kernels may split V into blocks of BV columns. T depends only on the keys, beta
and the gates: ``chunk_inverse`` computes it once per chunk (the backends'
chunk-parallel "prepare" kernel) and every other function here takes it as an
argument, so no kernel that walks the chunks or the value blocks repeats the
inverse. W_k = T diag(beta exp(gamma)) K and the decay factors are cheap by
comparison (one [C, C] x [C, K] matmul, elementwise [C, C] work) and stay
recomputed where they are used.

Everything works on 2-D float32 tiles already loaded from refs, with the
primitives both Pallas lowerings accept (see ``lsm.ops.common.tiles``): per-token
scalars (beta, log gates) are [C, 1] columns; a row form, when needed, comes
from a masked sum over the diagonal (``tiles.col_to_row``); prefix sums of the gates
are masked sums over [C, C] tiles, so no matmul has a dim below 16 (Triton
dots) and no reverse cumsum appears.

The inverse T is exact forward substitution, not a series: 16 row steps on the
16 x 16 diagonal blocks (all blocks at once, with row masks), then doubling
merges [[A, 0], [C, D]]^{-1} = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], so beta near 2
(negative eigenvalues) is no special case. Its matmuls always run at HIGHEST
precision: their operands are computed float32 values, not inputs, and errors in
T feed every output.

``chunk_grads`` gets the intra-chunk backward from ``jax.vjp`` of the pure tile
functions below (no loops inside them, so the result is plain dot_general /
select / reduce / elementwise primitives that lower on both backends); the
inverse sits between them, outside any ``jax.vjp``: T arrives precomputed and
its cotangent goes back to L through the closed-form VJP dL = -T^T dT T^T
restricted to the strict lower triangle.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lsm.ops.common import segments, tiles

_F32 = jnp.float32
SUB = 16  # rows of a diagonal block inverted by substitution


class Gates(NamedTuple):
  """Decay factors of one chunk (all ones / identity-like without gating)."""
  m: jax.Array  # [C, C] exp(gamma_t - gamma_s) for s <= t, else 0
  decay_in: jax.Array  # [C, 1] exp(gamma_t)
  decay_to_end: jax.Array  # [C, 1] exp(gamma_C - gamma_t)
  decay_out: jax.Array  # [1, 1] exp(gamma_C)


def gates(b_g, masks=None) -> Gates:
  """Decay factors from the chunk's log gates b_g [C, 1] (<= 0).

  Every exponent is <= 0 and masked exponents are zeroed before ``exp``, so
  neither the values nor their gradients overflow. The sums to the chunk's end
  are formed directly (masked sums over later tokens), not as differences.

  Packed documents (``masks``: ``segments.DocTiles.chunk_masks()`` of the
  chunk, or None) are the four factors cut: M keeps pairs in one document, the
  entering state reaches the tokens before the chunk's first reset
  (decay_in), only the last document's tokens reach the leaving state
  (decay_to_end), and the entering state leaves only if no document starts
  in the chunk (decay_out). Every term of the chunk form (L, W_k S, the
  output, S') carries one of these factors, so that is the whole reset, and
  gradients through ``gates`` are cut with it.
  """
  C = b_g.shape[0]
  r, c = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  b_g_row = tiles.col_to_row(b_g)  # [1, C]
  gamma = jnp.sum(jnp.where(c <= r, b_g_row, 0.0), axis=1, keepdims=True)  # [C, 1]
  gamma_row = jnp.sum(jnp.where(r <= c, b_g, 0.0), axis=0, keepdims=True)  # [1, C]
  to_end = jnp.sum(jnp.where(c > r, b_g_row, 0.0), axis=1, keepdims=True)  # [C, 1]
  total = jnp.sum(b_g, axis=0, keepdims=True)  # [1, 1]
  # The diagonal's exponent is masked out too (not left as gamma_t - gamma_t):
  # through it, d gamma_t would gain and lose the same large diagonal term, and
  # that cancellation swamps d log_g under strong decay.
  diff = jnp.where(r > c, gamma - gamma_row, 0.0)
  m = jnp.where(r >= c, jnp.exp(diff), 0.0)
  gt = Gates(m, jnp.exp(gamma), jnp.exp(to_end), jnp.exp(total))
  if masks is None:
    return gt
  return Gates(*(segments.cut(mask, x) for mask, x in zip(masks, gt)))


def intra_matrix(b_k, b_beta, b_g, precision, masks=None):
  """L [C, C]: beta_t exp(gamma_t - gamma_s) k_t . k_s for s < t, else 0
  (and 0 across documents, see ``gates``)."""
  C = b_k.shape[0]
  kk = tiles.mm_nt(b_k, b_k, precision)  # [C, C]
  l = b_beta * gates(b_g, masks).m * kk
  return jnp.where(tiles.lower_mask(C, strict=True), l, 0.0)


def unit_lower_inverse(l):
  """(I + L)^{-1} for L [C, C] strictly lower, C a power of two.

  Forward substitution inside each 16 x 16 diagonal block: step i sets the rows
  with index i mod 16 to e_i - L_bd T, which reads only rows already final
  (L_bd is strictly lower), so the result is exact substitution, not a series.
  Then doubling merges T <- T - T L_off T, L_off the blocks just below the
  diagonal of the next block size.
  """
  C = l.shape[0]
  hi = tiles.HIGHEST
  r, c = tiles.iota((C, C), 0), tiles.iota((C, C), 1)
  eye = (r == c).astype(_F32)
  sub = min(SUB, C)

  # Block sizes are powers of two: shifts and masks, not integer division.
  def block(x, size):  # index of the diagonal block of ``size`` rows
    return jax.lax.shift_right_logical(x, jnp.int32(size.bit_length() - 1))

  l_bd = jnp.where(block(r, sub) == block(c, sub), l, 0.0)
  r_in = r & (sub - 1)  # row index inside its block

  def substitute(i, t):
    return jnp.where(r_in == i, eye - tiles.mm(l_bd, t, hi), t)

  # A loop, not unrolled: 15 copies of the step would make the prepare kernel
  # (and its interpret-mode compile) much bigger; nothing differentiates
  # through it.
  t = jax.lax.fori_loop(1, sub, substitute, eye)
  size = sub
  while size < C:
    off = jnp.where((block(r, 2 * size) == block(c, 2 * size))
                    & (block(r, size) > block(c, size)), l, 0.0)
    t = t - tiles.mm(tiles.mm(t, off, hi), t, hi)
    size *= 2
  return t


def chunk_inverse(b_k, b_beta, b_g, *, precision, masks=None):
  """T = (I + L)^{-1} [C, C] of one chunk, from b_k [C, K], b_beta, b_g [C, 1].

  L's key products run at ``precision`` (they are products of inputs), the
  inverse at HIGHEST (see the module docstring).
  """
  return unit_lower_inverse(intra_matrix(b_k, b_beta, b_g, precision, masks))


def unit_lower_inverse_vjp(t, dt):
  """dL for T = (I + L)^{-1}: -T^T dT T^T on the strict lower triangle."""
  hi = tiles.HIGHEST
  dl = -tiles.mm_nt(tiles.mm_tn(t, dt, hi), t, hi)
  return jnp.where(tiles.lower_mask(t.shape[0], strict=True), dl, 0.0)


def w_k(t, b_k, b_beta, gt: Gates, precision):
  """W_k [C, K] = T diag(beta exp(gamma)) K."""
  return tiles.mm(t, (b_beta * gt.decay_in) * b_k, precision)


def _pseudo_values(t, b_s, b_k, b_v, b_beta, gt: Gates, precision):
  """U [C, BV] = W_v - W_k S."""
  return (tiles.mm(t, b_beta * b_v, precision)
          - tiles.mm(w_k(t, b_k, b_beta, gt, precision), b_s, precision))


def _leaving_state(b_s, b_k, u, gt: Gates, precision):
  """S' [K, BV] = exp(gamma_C) S + (exp(gamma_C - gamma) o K)^T U."""
  return gt.decay_out * b_s + tiles.mm_tn(gt.decay_to_end * b_k, u, precision)


def chunk_apply(t, b_s, b_q, b_k, b_v, b_beta, b_g, *, scale, precision,
                masks=None):
  """The chunk given its inverse T [C, C] and entering state b_s [K, BV]
  (``masks``: as ``gates``).

  Returns:
    o [C, BV] (scaled), s_out [K, BV], the state leaving the chunk.
  """
  gt = gates(b_g, masks)
  u = _pseudo_values(t, b_s, b_k, b_v, b_beta, gt, precision)  # [C, BV]
  a = gt.m * tiles.mm_nt(b_q, b_k, precision)  # [C, C]
  o = scale * (tiles.mm(gt.decay_in * b_q, b_s, precision)
               + tiles.mm(a, u, precision))
  return o, _leaving_state(b_s, b_k, u, gt, precision)


def next_state(t, b_s, b_k, b_v, b_beta, b_g, *, precision, masks=None):
  """The state [K, BV] leaving the chunk, from its inverse T [C, C] and the
  entering state b_s [K, BV]."""
  gt = gates(b_g, masks)
  u = _pseudo_values(t, b_s, b_k, b_v, b_beta, gt, precision)  # [C, BV]
  return _leaving_state(b_s, b_k, u, gt, precision)


def state_grad(t, b_ds, b_q, b_k, b_beta, b_g, b_do, *, scale, precision,
               masks=None):
  """Cotangent of the entering state from those of o [C, BV] and s_out [K, BV],
  given the chunk's inverse T [C, C].

  With dU = scale (M o Q K^T)^T dO + (exp(gamma_C - gamma) o K) dS':
  dS = scale (exp(gamma) o Q)^T dO + exp(gamma_C) dS' - W_k^T dU.
  """
  gt = gates(b_g, masks)
  a = gt.m * tiles.mm_nt(b_q, b_k, precision)  # [C, C]
  du = (scale * tiles.mm_tn(a, b_do, precision)
        + tiles.mm(gt.decay_to_end * b_k, b_ds, precision))  # [C, BV]
  return (scale * tiles.mm_tn(gt.decay_in * b_q, b_do, precision)
          + gt.decay_out * b_ds
          - tiles.mm_tn(w_k(t, b_k, b_beta, gt, precision), du, precision))


def chunk_grads(t, b_s, b_q, b_k, b_v, b_beta, b_g, b_do, b_ds, *, scale,
                precision, masks=None):
  """Gradients of one chunk's inputs, given its inverse T [C, C] (from
  ``chunk_inverse``), its entering state b_s [K, BV] and the cotangents of its
  output b_do [C, BV] and leaving state b_ds [K, BV].

  Returns:
    dq, dk [C, K]; dv [C, BV]; dbeta, dg [C, 1]. With V split into blocks, dq,
    dk, dbeta and dg are this block's share (sum them over blocks).
  """
  # Only the pullback is used: T is given, L's value is not needed.
  _, intra_vjp = jax.vjp(
      lambda k, beta, g: intra_matrix(k, beta, g, precision, masks),
      b_k, b_beta, b_g)
  _, apply_vjp = jax.vjp(
      lambda t, q, k, v, beta, g: chunk_apply(t, b_s, q, k, v, beta, g,
                                              scale=scale, precision=precision,
                                              masks=masks),
      t, b_q, b_k, b_v, b_beta, b_g)
  dt, dq, dk, dv, dbeta, dg = apply_vjp((b_do, b_ds))
  dk2, dbeta2, dg2 = intra_vjp(unit_lower_inverse_vjp(t, dt))
  return dq, dk + dk2, dv, dbeta + dbeta2, dg + dg2
