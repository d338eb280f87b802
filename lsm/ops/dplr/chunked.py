r"""DPLR transitions in chunkwise-parallel form, pure JAX. The recurrence is
defined in ``reference.py``; this computes the same function.

Derivation. Inside a chunk of C tokens let G_t = sum_{u <= t} g_u (inclusive,
per key channel; G_0 = 0), S_0 the state entering the chunk and r_t = a_t^T
S_{t-1} (a row in R^V). Unrolling S_t = exp(g_t) o S_{t-1} + b_t r_t + u_t v_t^T:

    S_t = exp(G_t) o S_0 + sum_{s <= t} exp(G_t - G_s) o (b_s r_s + u_s v_s^T)

(the exponentials scale key channels, i.e. rows). Reading it with a_{t+1}:

    r_t = A~_t S_0 + sum_{s < t} M_ab[t, s] r_s + sum_{s < t} M_au[t, s] v_s,
    A~_t = a_t o exp(G_{t-1}),
    M_xy[t, s] = sum_k x_t[k] exp(G_{t-1}[k] - G_s[k]) y_s[k]   (s < t),

so R = (I - M_ab)^{-1} (A~ S_0 + M_au V), a unit-lower-triangular system. Then

    O     = scale [Q~ S_0 + M_qb R + M_qu V],  Q~_t = q_t o exp(G_t),
            M_qy[t, s] = sum_k q_t[k] exp(G_t[k] - G_s[k]) y_s[k]   (s <= t)
    S_out = exp(G_C) o S_0 + B~^T R + U~^T V,  B~_s = b_s o exp(G_C - G_s), U~ alike.

With Tinv = (I - M_ab)^{-1}, W_s = Tinv A~ [C, K] and W_v = Tinv M_au V [C, V]
depend only on the chunk, so they are formed for all chunks of a group at once
(see Memory) and the chunk-to-chunk pass is a ``lax.scan`` with R = W_v + W_s S_0 and
S_out = exp(G_C) o S_0 + B~^T R + U~^T V (U~^T V also precomputed). Tinv comes
from ``common.triangular.unit_lower_inverse`` (forward substitution with a
closed-form VJP; a batched ``triangular_solve`` gradient deadlocks on some CPUs).

One pair form. M_ab[t, s] with pivot G_{t-1} is the inclusive form of the
queries with the rows shifted: M'_ab[t', s] = sum_k a_{t'+1}[k] exp(G_t'[k] -
G_s[k]) b_s[k] for s <= t', and M_ab[t, s] = M'_ab[t - 1, s]. So with
per-channel gates all four matrices come from one function of x in {q, a
shifted up one token} and y in {b, u}: P_xy[t, s] = sum_k x_t[k] y_s[k]
exp(G_t[k] - G_s[k]) for s <= t. With one gate per head the weight leaves the
sum over k, so each matrix is a plain product times a [C, C] weight: W for
M_qb and M_qu, W one row down for M_ab and M_au (four matmuls of [C, K] by
[K, C]; on XLA:CPU 0.95x the fwd+bwd time of one stacked [2C, K] by [K, 2C]
product, whose slices and shifts are copies).

Exactness at any decay (-5 or -50 per token): every exponent is <= 0 and is a
sum of gates, never exp(-G_s) alone (which overflows float32 once -G_s > 88).

* Inter-chunk factors exp(G_t), exp(G_{t-1}), exp(G_C - G_s), exp(G_C) are
  cumsums, shifted cumsums and shifted reverse cumsums of the gates (sums of
  same-signed terms); the weight-1 ends (G_0 = 0, G_C - G_C = 0) are constants
  with no gradient path.
* Per head, the pair weights are a [C, C] scalar matrix exp(L_ts), L_ts =
  sum_{s < u <= t} g_u a masked cumsum; no [.., K] gate tensor is formed.
* Per channel, hierarchical pivots (``_pairs_channel``): every pair s < t
  has one level h, a power of two, at which t lies in the upper and s in the
  lower half of one aligned block of 2h tokens; there exp(G_t - G_s) =
  exp(G_t - G_m) exp(G_m - G_s), G_m the gate sum at the end of the lower
  half, and both exponents are sums of the gates inside one half (up to t;
  after s): <= 0, no difference of cumsums, and the factor of s = m is the
  constant exp(0). A product of two factors in [0, 1] underflows only where
  the weight itself is below float32's range, so every weight is exact to
  rounding at any decay, with matmuls only: no [C, C, K] log-space tensor
  (gla's 16 x 16 diagonal blocks) and O(C log C K) exponentials per chunk.
* The pairs of weight exactly 1 (t = s) are kept out of every gated product,
  so d log_g has no cancelling O(1) terms where the decay is strong (where the
  true gradient is ~exp(-50)).

Packed documents cut every term with ``segments.chunk_masks``, as the delta
rule's chunked form does: the pair matrices keep pairs in one document, the
entering state reaches tokens before the chunk's first reset (A~ and Q~), only
the last document's tokens write the leaving state (B~, U~), and the entering
state leaves only if the chunk has no reset.

Memory. The chunks run in groups of GROUP_TOKENS tokens: a ``lax.scan`` over
groups carries the state, and each group (its pair matrices, inverses, factors,
an inner scan over its chunks and its outputs) is a ``jax.checkpoint``ed body,
rematerialised in the backward pass. The residuals are the inputs and one
state per group; the temporaries live for one group at a time. Measured on
XLA:CPU (fwd+bwd, B=2, T=2048, H=4, K=V=64, per-channel gates, temp bytes of
the compiled program): 46 / 59 / 86 / 143 / 421 MiB for groups of 64 / 128 /
256 / 512 / 2048 tokens, against 88 MiB for the delta rule's chunked form;
64 and 128 were also the fastest there (cache-sized working sets). With one
gate per head (no per-channel pivots) the working set per chunk is smaller
and larger groups batch more chunks per matmul: HEAD_GROUP_TOKENS = 256 ran
fwd+bwd at 0.92x the time of 128 (B=2, T=8192, H=4, K=V=64, paired runs in one
process, 2026-12-06; 512 and 1024 no faster), while per-channel gates took
1.3x longer at 256. Not yet measured on GPU, where larger groups would batch
more chunks per kernel.

Gradients come from autodiff through the rematerialised groups. All
arithmetic is float32 with HIGHEST-precision matmuls; outputs are cast back to
q's dtype. The chunk states are those of LASP-2's summaries: ``dplr`` takes h0
and returns the final state.
"""

import functools

import jax
import jax.numpy as jnp

from lsm.ops import _dispatch
from lsm.ops.common import segments
from lsm.ops.common.chunking import pad_time
from lsm.ops.common.triangular import unit_lower_inverse

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

_HIGHEST = jax.lax.Precision.HIGHEST
# Tokens per rematerialised group of chunks (module docstring, Memory): bounds
# the temporaries of the backward pass.
GROUP_TOKENS = 128
# The same for one gate per head, or none (module docstring, Memory).
HEAD_GROUP_TOKENS = 256
# Per-channel gates: block of the batched lower levels of ``_pairs_channel``.
BASE = 16


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HIGHEST)


def _tril(n: int, strict: bool):
  idx = jnp.arange(n)
  return idx[:, None] > idx[None, :] if strict else idx[:, None] >= idx[None, :]


def _shift_down(x, axis: int):
  """x moved one step later along ``axis``, a zero entering first:
  out[t] = x[t - 1], out[0] = 0."""
  x = jnp.moveaxis(x, axis, -1)
  x = jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :-1]], axis=-1)
  return jnp.moveaxis(x, -1, axis)


def _shift_up(x, axis: int):
  """out[t] = x[t + 1], out[-1] = 0."""
  x = jnp.moveaxis(x, axis, -1)
  x = jnp.concatenate([x[..., 1:], jnp.zeros_like(x[..., :1])], axis=-1)
  return jnp.moveaxis(x, -1, axis)


def _time_sum(x, axis: int, keep):
  """y_t = sum_{s: keep[t, s]} x_s along ``axis``, as a matmul with the 0/1
  matrix ``keep`` [n, n] (a sum of the selected entries: for gates, a sum of
  same-signed terms, never a difference of cumsums). A matmul rather than
  ``cumsum``, which lowers to a reduce_window on XLA:CPU: the same sums, and
  half the compile time of a cumsum's fwd+bwd in isolation (0.28 s against
  0.57 s, 2026-12); the op compiles a few dozen of them."""
  x = jnp.moveaxis(x, axis, -1)
  return jnp.moveaxis(_einsum("...s,ts->...t", x, keep.astype(x.dtype)), -1, axis)


def _cumsum(g, axis: int):
  """sum_{u <= t} g_u along ``axis``."""
  return _time_sum(g, axis, _tril(g.shape[axis], False))


def _before(g, axis: int):
  """sum_{u < t} g_u along ``axis`` (0 at the first position, a constant)."""
  return _time_sum(g, axis, _tril(g.shape[axis], True))


def _after(g, axis: int):
  """sum_{u > t} g_u along ``axis`` (0 at the last position, a constant)."""
  return _time_sum(g, axis, _tril(g.shape[axis], True).T)


# Pair matrices P_xy[t, s] = sum_k x_tk y_sk exp(G_tk - G_sk), s <= t.


def _level_masks(P: int):
  """For the levels h = 1, 2, ..., P / 2 of ``_pairs_channel``: (up_to [L, P, P]:
  u in t's block of h tokens and u <= t; after [L, P, P]: u in s's block and
  u > s; cross [L, P, P]: t in the upper, s in the lower half of one block of
  2h tokens), as float32 0/1 matrices."""
  idx = jnp.arange(P)
  hs = 1 << jnp.arange(max(P.bit_length() - 1, 0))[:, None, None]  # [L, 1, 1]
  t, s = idx[None, :, None], idx[None, None, :]
  same_h = (t // hs) == (s // hs)
  cross = ((t // (2 * hs)) == (s // (2 * hs))) & ((t // hs) % 2 == 1) & (
      (s // hs) % 2 == 0)
  f32 = jnp.float32
  return ((same_h & (s <= t)).astype(f32), (same_h & (s > t)).astype(f32),
          cross.astype(f32))


def _pairs_channel(xs, ys, g):
  """Per-channel gates by hierarchical pivots (module docstring).

  xs: [X, ..., C, K]; ys: [Y, ..., C, K]; g: [..., C, K] -> [X, Y, ..., C, C].
  The chunk is padded to P = 2^p tokens (zero inputs and gates: zero pairs,
  sliced off). Every pair s < t has one level h (a power of two) at which t
  lies in the upper and s in the lower half of one aligned block of 2h tokens;
  there exp(G_t - G_s) = exp(G_t - G_m) exp(G_m - G_s), G_m the gate sum at
  the end of the lower half, and both exponents are sums of the gates inside
  one block of h tokens (up to t; after s), <= 0, with the factor of s = m the
  constant exp(0). The diagonal (weight 1) is x_t . y_t.

  Levels below BASE (pairs inside one block of BASE tokens) are one batched
  matmul per block whose [L, c, c] level mask keeps each pair at its level
  (few ops to compile; the masked-off products cost little at c = 16); the
  levels from BASE up each pair a block's halves with one matmul of exactly
  their size and stack the blocks.
  """
  X, Y = xs.shape[0], ys.shape[0]
  *lead, C, K = g.shape
  P = 1 << (C - 1).bit_length()
  if P != C:
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, P - C), (0, 0)])
    xs, ys, g = pad(xs), pad(ys), pad(g)
  c = min(BASE, P)
  blocks = lambda x: x.reshape(*x.shape[:-2], P // c, c, K)
  xb, yb, gb = blocks(xs), blocks(ys), blocks(g)
  pairs = _einsum("x...tk,y...tk->xy...t", xb, yb)[..., None] * jnp.eye(c)
  if c > 1:  # levels h < c inside each block of c tokens
    up_to, after, cross = _level_masks(c)
    rows = jnp.exp(_einsum("ltu,...uk->l...tk", up_to, gb))  # [L, .., c, K]
    cols = jnp.exp(_einsum("lsu,...uk->l...sk", after, gb))
    prods = _einsum("xl...tk,yl...sk->xyl...ts", xb[:, None] * rows,
                    yb[:, None] * cols)  # [X, Y, L, .., P / c, c, c]
    cross = cross.reshape(cross.shape[0], *(1,) * (len(lead) + 1), c, c)
    pairs = pairs + jnp.sum(cross * prods, axis=2)
  h = c
  while h < P:  # pairs [X, Y, .., P / h, h, h] -> [X, Y, .., P / 2h, 2h, 2h]
    nb = P // (2 * h)
    split = lambda x: x.reshape(*x.shape[:-2], nb, 2, h, K)  # pylint: disable=cell-var-from-loop
    gg = split(g)
    row = jnp.exp(_cumsum(gg[..., 1, :, :], -2))  # [.., nb, h, K]
    col = jnp.exp(_after(gg[..., 0, :, :], -2))
    low = _einsum("x...tk,y...sk->xy...ts", split(xs)[..., 1, :, :] * row,
                  split(ys)[..., 0, :, :] * col)  # [X, Y, .., nb, h, h]
    m = pairs.reshape(X, Y, *lead, nb, 2, h, h)
    top = jnp.concatenate([m[..., 0, :, :], jnp.zeros_like(low)], axis=-1)
    bottom = jnp.concatenate([low, m[..., 1, :, :]], axis=-1)
    pairs = jnp.concatenate([top, bottom], axis=-2)
    h *= 2
  return pairs.reshape(X, Y, *lead, P, P)[..., :C, :C]


def _head_weights(g, C: int):
  """The pair weights of one gate per head, g: [..., C] (or None: no decay):
  (w [..., C, C] for s <= t: exp(L_ts), L_ts = sum_{s < u <= t} g_u;
  w_ab = w one row down, the weights of the pairs (t, s < t) read with
  pivot G_{t-1}). Each L_ts is one matmul of the gates against the constant
  0/1 tensor [u, t, s] of (s < u <= t): a sum of same-signed gates, never a
  difference of cumsums (exact at any decay), formed without a [C, C] copy
  of g; the diagonal's exponent is 0 with no gradient path."""
  if g is None:
    return _tril(C, False).astype(jnp.float32), _tril(C, True).astype(jnp.float32)
  idx = jnp.arange(C)
  u, t, s = idx[:, None, None], idx[None, :, None], idx[None, None, :]
  seg = _einsum("...u,uts->...ts", g, ((s < u) & (u <= t)).astype(g.dtype))
  w = jnp.where(_tril(C, False), jnp.exp(seg), 0.0)
  return w, _shift_down(w, -2)


def _group(h0, x, *, scale: float):
  """G consecutive chunks, chunk axis first: x holds q, a, b, u [G, B, H, C, K],
  v [G, B, H, C, V], g (None, [G, B, H, C, K] or [G, B, H, C]) and masks
  (None, or same [G, B, 1, C, C], carry and tail [G, B, 1, C]). Returns the
  state after the group and o [G, B, H, C, V] (scaled)."""
  q, a, b, u, v, g, masks = x
  if g is not None and g.ndim == q.ndim:  # per channel: pivoted pairs
    a_up = _shift_up(a, -2)  # a_{t+1}: the rank-one read of the next token
    p = _pairs_channel(jnp.stack([q, a_up]), jnp.stack([b, u]), g)
    m_qb, m_qu = p[0, 0], p[0, 1]  # [G, B, H, C, C], s <= t
    m_ab, m_au = _shift_down(p[1, 0], -2), _shift_down(p[1, 1], -2)  # s < t
  else:  # per head: one [C, C] weight matrix, four plain products
    w, w_ab = _head_weights(g, q.shape[-2])
    mm = lambda x, y: _einsum("nbhtk,nbhsk->nbhts", x, y)  # noqa: E731
    m_qb, m_qu = w * mm(q, b), w * mm(q, u)
    m_ab, m_au = w_ab * mm(a, b), w_ab * mm(a, u)
  t_axis = 3
  if g is None:
    a_in, q_in, b_out, u_out, decay = a, q, b, u, None
  else:
    col = (lambda x: x) if g.ndim == q.ndim else (lambda x: x[..., None])
    a_in = a * jnp.exp(col(_before(g, t_axis)))
    q_in = q * jnp.exp(col(_cumsum(g, t_axis)))
    e_out = jnp.exp(col(_after(g, t_axis)))
    b_out, u_out = b * e_out, u * e_out
    decay = jnp.exp(jnp.sum(g, axis=t_axis))  # [G, B, H, K] or [G, B, H]
  if masks is not None:
    same, carry, tail = masks
    m_qb, m_qu, m_ab, m_au = (jnp.where(same, x, 0.0)
                              for x in (m_qb, m_qu, m_ab, m_au))
    a_in, q_in = (jnp.where(carry[..., None], x, 0.0) for x in (a_in, q_in))
    b_out, u_out = (jnp.where(tail[..., None], x, 0.0) for x in (b_out, u_out))
    out = carry[..., -1]  # [G, B, 1]: the entering state leaves the chunk
    if decay is None:
      decay = jnp.where(out, 1.0, 0.0)
    else:
      decay = jnp.where(out if decay.ndim == out.ndim else out[..., None],
                        decay, 0.0)
  t_inv = unit_lower_inverse(-m_ab)  # (I - M_ab)^{-1}
  w_s = _einsum("nbhts,nbhsk->nbhtk", t_inv, a_in)
  w_v = _einsum("nbhts,nbhsv->nbhtv", t_inv,
                _einsum("nbhts,nbhsv->nbhtv", m_au, v))
  uv = _einsum("nbhck,nbhcv->nbhkv", u_out, v)
  if decay is not None:  # [..., K, 1] or [..., 1, 1] against the state
    decay = decay[..., None] if decay.ndim == 4 else decay[..., None, None]
    decay = jnp.broadcast_to(decay, (*uv.shape[:3], *decay.shape[3:]))

  def step(h, x):
    w_s_n, w_v_n, b_n, uv_n, *d_n = x
    r = w_v_n + _einsum("bhck,bhkv->bhcv", w_s_n, h)
    h_next = _einsum("bhck,bhcv->bhkv", b_n, r) + uv_n
    h_next = h_next + (h if not d_n else d_n[0] * h)
    return h_next, (h, r)

  xs = (w_s, w_v, b_out, uv) + (() if decay is None else (decay,))
  h_t, (h_in, r) = jax.lax.scan(step, h0, xs)
  o = (_einsum("nbhck,nbhkv->nbhcv", q_in, h_in)
       + _einsum("nbhts,nbhsv->nbhtv", m_qb, r)
       + _einsum("nbhts,nbhsv->nbhtv", m_qu, v))
  return h_t, scale * o


def _to_groups(x, chunk: int, group: int):
  """[B, Tp, H, ...] (Tp % (chunk * group) == 0) -> [NG, G, B, H, C, ...]."""
  B, Tp = x.shape[:2]
  x = x.reshape(B, Tp // (chunk * group), group, chunk, *x.shape[2:])
  return x.transpose(1, 2, 0, 4, 3, *range(5, x.ndim))


def _masks_to_groups(masks, group: int):
  """``segments.chunk_masks`` ([B, N, ...]) -> [NG, G, B, 1, ...]."""
  def one(x):
    B, N = x.shape[:2]
    x = x.reshape(B, N // group, group, *x.shape[2:])
    return jnp.moveaxis(x, 0, 2)[:, :, :, None]
  return tuple(one(x) for x in masks)


def dplr(q, a, b, u, v, log_g, *, h0, scale: float, chunk_size: int = 64,
         resets=None):
  """Chunked DPLR. Arguments as in ``lsm.ops.dplr.dplr``, with ``log_g`` None,
  float32 [B, T, H, K] (per channel: hierarchical pivots) or [B, T, H] (per
  head: [C, C] scalar weights, never broadcast over K), ``h0`` float32
  [B, H, K, V] and ``resets`` None or ``segments.resets(segment_ids)``."""
  B, T, H = q.shape[:3]
  dtype, f32 = q.dtype, jnp.float32
  C = chunk_size
  n_chunks = -(-T // C)
  per_channel = log_g is not None and log_g.ndim == q.ndim
  G = max(1, min(n_chunks,
                 (GROUP_TOKENS if per_channel else HEAD_GROUP_TOKENS) // C))
  xs = tuple(pad_time(x.astype(f32), C * G) for x in (q, a, b, u, v))
  Tp = xs[0].shape[1]
  g = None if log_g is None else pad_time(log_g.astype(f32), C * G)
  masks = None
  if resets is not None:
    resets = jnp.pad(resets, ((0, 0), (0, Tp - T)))
    masks = _masks_to_groups(segments.chunk_masks(resets, C), G)
  xs = tuple(_to_groups(x, C, G) for x in xs)
  g = None if g is None else _to_groups(g, C, G)
  # Each group is rematerialised in the backward pass: the residuals are the
  # inputs and one state per group, and the intra-chunk temporaries (pair
  # matrices, inverses, pivoted factors) live for one group at a time.
  body = jax.checkpoint(functools.partial(_group, scale=scale),
                        prevent_cse=False)
  h_t, o = jax.lax.scan(body, h0.astype(f32), (*xs, g, masks))
  o = o.transpose(2, 0, 1, 4, 3, 5).reshape(B, Tp, H, -1)
  return o[:, :T].astype(dtype), h_t
