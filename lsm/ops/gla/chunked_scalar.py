r"""GLA with one gate per head ([B, T, H]: Mamba-2, RetNet, Lightning Attention)
in chunkwise-parallel form, pure JAX. The recurrence is defined in
``reference.py``; this computes the same function. ``chunked.gla`` hands
[B, T, H] gates here; per-channel gates take ``chunked.py``'s forms.

With a scalar decay per token the chunk needs no per-channel factors and no
secondary chunking: the decay between tokens s <= t of a chunk is one number,
exp(L_ts) with the segment sum L_ts = sum_{s < u <= t} g_u, so for the state S
entering the chunk and b_t = sum_{u <= t} g_u:

    o_t   = scale * [exp(b_t) q_t S + sum_{s <= t} exp(L_ts) (q_t . k_s) v_s]
    S_out = exp(b_C) S + sum_s exp(L_Cs) k_s^T v_s

L is a [C, C] matrix per (batch, head, chunk), formed as a masked cumsum of
the gates (each entry a sum of gates <= 0, never a difference of cumsums, so
it carries no cancellation error however strong the decay), masked to the
causal part before ``exp``: every exponent is <= 0, nothing overflows, and the
form is exact at any decay (-5 or -50 per token alike), with no fallback form.
The decay factors of the inter-chunk terms, exp(b_t) and exp(L_Cs), are cumsums
and shifted reverse cumsums of the gates, also sums of gates <= 0; they scale
rows of [C, V] products, so no gate-derived array has a K axis.

Key groups (q and k with G heads for v's H, e.g. Mamba-2's B and C shared by
all heads): heads are split into G groups of R = H / G; q k^T is one [C, C]
product per group, and each head's gates weight it, its values and its state
(the [C, C], [C] and [C, V] terms), so q and k are never copied per head.

Packed documents cut the terms with ``segments.chunk_masks`` as ``chunked.py``
does: the [C, C] weights keep pairs in one document, the incoming state reaches
tokens before the chunk's first reset, only the last document's tokens write
the outgoing state, which keeps the incoming one only if the chunk has no reset.

Memory. The chunks run in groups of GROUP_TOKENS tokens, as the dplr op's
chunked form does: a ``lax.scan`` over groups carries the state, and each
group (its [C, C] weights, its states, an inner scan over its chunks and its
outputs) is a ``jax.checkpoint``ed body, rematerialised in the backward pass.
The residuals are the inputs and one [K, V] state per group, not the [C, C]
weights and one state per chunk. Measured on XLA:CPU (fwd+bwd of the op at
T = 8192, B = 1, 2026-12-06; ``experiments/bench_ops.py`` has no row for it,
the model rows in BENCHMARKS.md do): Mamba-2's call at the 20m preset (12
heads, one B/C group, K = 128, V = 64) 437 -> 85 MiB temp and 0.74x the time
of keeping every chunk's terms; RetNet's (8 heads, K 48, V 96) 343 -> 88 MiB,
0.78x; Lightning's (3 heads of 128) 210 -> 63 MiB, 0.82x. Recomputing a
group's terms costs less than writing and reading back every chunk's.

Everything else is batched matmuls. Gradients come from autodiff through the
rematerialised groups; no [B, T, H, K] gate tensor exists in either pass. All
arithmetic is float32 with HIGHEST-precision matmuls; outputs are cast back to
q's dtype.
"""

import jax
import jax.numpy as jnp

from lsm.ops.common import segments
from lsm.ops.common.chunking import from_chunks, pad_time, to_chunks

_HIGHEST = jax.lax.Precision.HIGHEST
# Tokens per rematerialised group of chunks (module docstring, Memory).
GROUP_TOKENS = 256


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HIGHEST)


def segment_sums(g):
  """[..., C] gates -> [..., C, C]: L_ts = sum_{s < u <= t} g_u for s < t, and
  0 for s >= t. A cumsum over t of the gates masked to t > s, so each entry is
  a sum of same-signed gates (no difference of cumsums)."""
  C = g.shape[-1]
  idx = jnp.arange(C)
  below = idx[:, None] > idx[None, :]  # [C, C]: t > s
  return jnp.cumsum(jnp.where(below, g[..., :, None], 0.0), axis=-2)


def _chunks(q, k, v, g, h0, masks, *, scale: float):
  """On chunks, heads split into G key groups of R: q, k [B, G, N, C, K],
  v [B, G, R, N, C, V], g [B, G, R, N, C] float32, h0 [B, G, R, K, V];
  ``masks`` ``segments.chunk_masks`` broadcast over (G, R), or None. Returns o
  [B, G, R, N, C, V] and h_T [B, G, R, K, V]. With R = 1 (one key per head)
  this is the plain per-head form; with R > 1 q k^T is formed once per group
  and only [C, C] and [C, V] terms are per head."""
  C = g.shape[-1]
  idx = jnp.arange(C)
  keep = idx[:, None] >= idx[None, :]  # [C, C]
  if masks is not None:
    same, carry, tail = masks
    keep = keep & same
  w = jnp.where(keep, jnp.exp(segment_sums(g)), 0.0)  # [B, G, R, N, C, C]
  a = w * _einsum("bgntk,bgnsk->bgnts", q, k)[:, :, None]
  # Decay to the chunk end, sum_{u > s} g_u: the reverse cumsum shifted by one.
  rev = jnp.cumsum(g[..., ::-1], axis=-1)[..., ::-1]  # sum_{u >= s} g_u
  to_end = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], -1)
  gate_in, gate_out, decay = (jnp.exp(jnp.cumsum(g, axis=-1)), jnp.exp(to_end),
                              jnp.exp(rev[..., 0]))  # [B, H, N, C], [.., N]
  if masks is not None:
    gate_in = jnp.where(carry, gate_in, 0.0)
    gate_out = jnp.where(tail, gate_out, 0.0)
    decay = jnp.where(carry[..., -1], decay, 0.0)
  u = _einsum("bgnck,bgrncv->bgrnkv", k, gate_out[..., None] * v)

  def step(h, x):
    d, u_n = x
    return d[..., None, None] * h + u_n, h

  h_t, h_in = jax.lax.scan(step, h0, (jnp.moveaxis(decay, 3, 0),
                                      jnp.moveaxis(u, 3, 0)))
  h_in = jnp.moveaxis(h_in, 0, 3)  # [B, G, R, N, K, V]: entering each chunk
  o = (_einsum("bgrnts,bgrnsv->bgrntv", a, v)
       + gate_in[..., None] * _einsum("bgnck,bgrnkv->bgrncv", q, h_in))
  return scale * o, h_t


def _forward(q, k, v, g, h0, masks, *, scale: float):
  """``_chunks`` over groups of n = GROUP_TOKENS / C chunks, each group a
  rematerialised ``lax.scan`` step that carries the state (module docstring,
  Memory). The last group is padded with empty chunks: zero inputs and gates,
  and document masks of True, so the state passes through them unchanged
  (decay exp(0), no reset, nothing written). Arguments and results as
  ``_chunks``'."""
  N, C = g.shape[-2:]
  n = max(1, min(N, GROUP_TOKENS // C))
  n_groups = -(-N // n)

  def split(x, axis):  # the chunk axis ``axis`` -> [n_groups, ..., n, ...]
    x = jnp.pad(x, [(0, n_groups * n - N) if i == axis else (0, 0)
                    for i in range(x.ndim)],
                constant_values=True if x.dtype == jnp.bool_ else 0)
    x = x.reshape(*x.shape[:axis], n_groups, n, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  def group(h, x):
    q, k, v, g, masks = x
    o, h = _chunks(q, k, v, g, h, masks, scale=scale)
    return h, o

  xs = (split(q, 2), split(k, 2), split(v, 3), split(g, 3),
        None if masks is None else tuple(split(m, 3) for m in masks))
  h_t, o = jax.lax.scan(jax.checkpoint(group, prevent_cse=False), h0, xs)
  o = jnp.moveaxis(o, 0, 3)  # [B, G, R, n_groups, n, C, V]
  return o.reshape(*o.shape[:3], n_groups * n, *o.shape[5:])[:, :, :, :N], h_t


def gla(q, k, v, log_g, *, h0, scale: float, chunk_size: int = 64, resets=None):
  """Chunked GLA with per-head gates. Arguments as in ``lsm.ops.gla.gla``, with
  ``log_g`` [B, T, H] (any float dtype; used in float32), ``h0`` a float32
  [B, H, K, V] array and ``resets`` None or ``segments.resets(segment_ids)``.
  q and k may have G heads for v's H (key groups, G a divisor of H). Any
  chunk_size >= 1.

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32.
  """
  (B, T, G, K), (H, V), dtype = q.shape, v.shape[2:], q.dtype
  R = H // G
  f32 = jnp.float32
  q, k, v, g = (to_chunks(pad_time(x.astype(f32), chunk_size), chunk_size)
                for x in (q, k, v, log_g))  # [B, heads, N, C, *]
  N = q.shape[2]
  v = v.reshape(B, G, R, N, chunk_size, V)
  g = g.reshape(B, G, R, N, chunk_size)
  masks = None
  if resets is not None:
    resets = jnp.pad(resets, ((0, 0), (0, N * chunk_size - T)))
    masks = tuple(x[:, None, None] for x in segments.chunk_masks(resets,
                                                                 chunk_size))
  o, h_t = _forward(q, k, v, g, h0.astype(f32).reshape(B, G, R, K, V), masks,
                    scale=float(scale))
  o = o.reshape(B, H, N, chunk_size, V)
  return from_chunks(o, T).astype(dtype), h_t.reshape(B, H, K, V)
