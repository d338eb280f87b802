r"""Per-chunk GLA math on loaded tiles, shared by the GPU and TPU kernels.

The recurrence is defined in ``reference.py``. A chunk of C tokens arrives as
lists of sub-chunk tiles of SUB = 16 rows (``qs[i]`` is rows 16i..16i+15 of the
chunk's queries, [16, K] float32). Both kernels load them from refs with static
``pl.ds`` slices, which both lowerings accept, where slicing a loaded value would
not (Triton has no slice).

State layout. Kernels hold the state transposed, ``st = S^T`` [V, K], so that the
per-key-channel decay exp(sum of gates) is a [1, K] row that broadcasts over it;
the [K, 1] column that S itself would need is a transpose Mosaic handles badly.
The wrappers transpose h0 and h_T (state-sized, not sequence-sized).

Numerics (as in ``chunked.py``, which explains each choice): every exponent is
<= 0. Within a chunk, b_t is the gate sum from the chunk start; row block i
pivots on r_i = b just before block i: q_t exp(b_t - r_i) and k_s exp(r_i - b_s)
for earlier blocks. Diagonal 16 x 16 blocks are formed in log space column by
column (exact for any decay). Gate sums ending at a block or chunk end are
suffix sums, never differences of prefix sums. The diagonal t = s terms (weight
exactly 1) are kept out of the gate gradient.

Gate forms. Per-channel gates arrive as [16, K] (or [C, K]) tiles. One gate per
head arrives as a [16, 1] (or [C, 1]) column, loaded as it is from a [B, T, H]
gate (the launchers view it as [B, T, H, 1], a reshape): the cumulative gate is
then one number per token, so every gate sum here is a [16, 1] column or a
[1, 1] scalar that broadcasts over the key columns wherever the per-channel
form has a [16, K] or [1, K] tile, and the same code runs both forms. Sums of a
gate column are masked sums (``_col_sum``), not matmuls (Triton's dot needs
every dim >= 16). The gate gradient of a head gate is the per-channel one
summed over K (the chain rule through the broadcast); ``finish_grads`` sums
each term over the key columns before its prefix and suffix sums, so only
[16, 1] columns are formed.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lsm.ops.common import segments, tiles

SUB = 16
_F32 = jnp.float32
_GATE_PREC = tiles.HIGHEST  # gate sums are float32 whatever the input dtype


def is_head_gate(g) -> bool:
  """Whether a loaded gate tile is one gate per head ([n, 1] column)."""
  return g.shape[-1] == 1


def _col_sum(x, mask):
  """out[t] = sum_s mask[t, s] x[s] for a column x [n, 1]: a masked sum over
  the column laid out as a row (``tiles.col_to_row``), float32 adds in one
  order, no matmul."""
  n = x.shape[0]
  return jnp.sum(jnp.where(mask, jnp.broadcast_to(tiles.col_to_row(x), (n, n)),
                           0.0), axis=1, keepdims=True)


def cumsum_rows(g):
  """Inclusive prefix sum of a gate tile down its rows: [n, K] by matmul
  (``tiles.cumsum_rows``), a head-gate column [n, 1] by a masked sum."""
  if not is_head_gate(g):
    return tiles.cumsum_rows(g, _GATE_PREC)
  return _col_sum(g, tiles.lower_mask(g.shape[0], strict=False))


def suffix_sum_rows(g):
  """Exclusive suffix sum down the rows (``tiles.suffix_sum_rows``); columns
  [n, 1] by a masked sum."""
  if not is_head_gate(g):
    return tiles.suffix_sum_rows(g, _GATE_PREC)
  n = g.shape[0]
  return _col_sum(g, tiles.iota((n, n), 0) < tiles.iota((n, n), 1))


def prefix_sum_rows_exclusive(g):
  """Exclusive prefix sum down the rows (``tiles.prefix_sum_rows_exclusive``);
  columns [n, 1] by a masked sum."""
  if not is_head_gate(g):
    return tiles.prefix_sum_rows_exclusive(g, _GATE_PREC)
  return _col_sum(g, tiles.lower_mask(g.shape[0], strict=True))


class GateSums:
  """Gate sums of one chunk, per sub-chunk block, all [16, K] or [1, K]
  (per-channel gates) or [16, 1] / [1, 1] (one gate per head: ``gs`` columns).

  z[i]: inclusive prefix sum inside block i (b_t - r_i).
  e[i]: exclusive suffix sum inside block i (sum_{u > s, u in block i} g_u).
  tot[i]: the block's total, [1, K].
  """

  def __init__(self, gs):
    self.z = [cumsum_rows(g) for g in gs]
    self.e = [suffix_sum_rows(g) for g in gs]
    self.tot = [jnp.sum(g, axis=0, keepdims=True) for g in gs]

  def _sum(self, blocks):
    out = jnp.zeros_like(self.tot[0])
    for m in blocks:
      out = out + self.tot[m]
    return out

  def before(self, i):
    """r_i: gate sum from the chunk start to just before block i, [1, K]."""
    return self._sum(range(i))

  def between(self, j, i):
    """r_i - b_s for s in block j < i: [16, K], every entry <= 0."""
    return self.e[j] + self._sum(range(j + 1, i))

  def to_end(self, j):
    """b_C - b_s for s in block j: [16, K]."""
    return self.e[j] + self._sum(range(j + 1, len(self.tot)))

  def total(self):
    """b_C, the chunk's gate sum, [1, K]."""
    return self._sum(range(len(self.tot)))


def load_sub_blocks(ref, n_sub, cols=slice(None)):
  """[16, D] float32 sub-chunk tiles of a [C, D] ref, or of the columns ``cols``
  (static slices of the ref, which both lowerings accept)."""
  return [ref[pl.ds(i * SUB, SUB), cols].astype(_F32) for i in range(n_sub)]


def _strict(n):
  return tiles.lower_mask(n, strict=True)


def _diag_weights(z, j):
  """exp(z_t - z_j) for rows t > j, 0 elsewhere: [16, K]."""
  later = tiles.iota(z.shape, 0) > j
  return jnp.where(later, jnp.exp(jnp.where(later, z - tiles.row(z, j), 0.0)), 0.0)


def diag_block(q, k, z):
  """A_ts = sum_k q_tk k_sk exp(z_tk - z_sk) for s < t, plus q_t . k_t on the
  diagonal, 0 above: [16, 16]. Column by column in log space."""
  n = q.shape[0]

  def body(j, a):
    c = jnp.sum(q * tiles.row(k, j) * _diag_weights(z, j), axis=1, keepdims=True)
    return a + jnp.where(tiles.iota((n, n), 1) == j, c, 0.0)

  a = jax.lax.fori_loop(0, n, body, jnp.zeros((n, n), _F32))
  eye = tiles.iota((n, n), 0) == tiles.iota((n, n), 1)
  return a + jnp.where(eye, jnp.sum(q * k, axis=1, keepdims=True), 0.0)


def diag_block_grads(q, k, z, da):
  """Gradients of the strictly-lower part of ``diag_block`` for q and k, given
  da [16, 16] (entries on and above the diagonal ignored): (dq, dk) [16, K]."""
  n = q.shape[0]

  def body(j, carry):
    dq, dk = carry
    w = _diag_weights(z, j)  # [16, K]
    da_j = tiles.col(da, j)  # [16, 1]
    dq = dq + da_j * tiles.row(k, j) * w
    dk_j = jnp.sum(da_j * q * w, axis=0, keepdims=True)  # [1, K]
    dk = dk + jnp.where(tiles.iota(k.shape, 0) == j, dk_j, 0.0)
    return dq, dk

  zero = jnp.zeros_like(q)
  return jax.lax.fori_loop(0, n, body, (zero, zero))


def diag_blocks_grads(qs, ks, zs, das):
  """``diag_block_grads`` of several blocks in one column loop: lists of
  [16, K] (dq, dk)."""
  n = qs[0].shape[0]

  def body(j, carry):
    dq, dk = carry
    dq, dk = list(dq), list(dk)
    for b, (q, k, z, da) in enumerate(zip(qs, ks, zs, das)):
      w = _diag_weights(z, j)  # [16, K]
      da_j = tiles.col(da, j)  # [16, 1]
      dq[b] = dq[b] + da_j * tiles.row(k, j) * w
      dk_j = jnp.sum(da_j * q * w, axis=0, keepdims=True)  # [1, K]
      dk[b] = dk[b] + jnp.where(tiles.iota(k.shape, 0) == j, dk_j, 0.0)
    return dq, dk

  zero = [jnp.zeros_like(q) for q in qs]
  return jax.lax.fori_loop(0, n, body, (zero, zero))


def state_update(k, v, g, st, prec, docs=None):
  """State after a chunk: st [V, K] -> exp(b_C) S + sum_s (k_s exp(b_C - b_s))^T v_s,
  transposed. k: [C, K]; g: [C, K], or a head-gate column [C, 1]; v: [C, V]
  float32 (C any multiple of 16, or the full chunk as one block). ``docs``:
  the chunk's ``segments.DocTiles`` or None: then only the last document's
  keys enter, and S only without a reset in the chunk."""
  to_end = suffix_sum_rows(g)
  total = jnp.sum(g, axis=0, keepdims=True)
  k_end = k * jnp.exp(to_end)
  decay = jnp.exp(total)
  if docs is not None:
    k_end = segments.cut(docs.tail_all(), k_end)
    decay = segments.cut(docs.carry_out(), decay)
  return st * decay + tiles.mm_tn(v, k_end, prec)


def state_grad_update(q, do, g, dst, prec, docs=None):
  """Gradient for the state entering a chunk from the gradient ``dst`` [V, K] for
  the state leaving it: exp(b_C) dS + (q exp(b))^T do, transposed. q [C, K], g
  [C, K] or [C, 1];
  do [C, V] already multiplied by the query scale. ``docs``: as
  ``state_update`` (the queries before the chunk's first reset read S)."""
  b = cumsum_rows(g)
  total = jnp.sum(g, axis=0, keepdims=True)
  q_b = q * jnp.exp(b)
  decay = jnp.exp(total)
  if docs is not None:
    q_b = segments.cut(docs.carry_all(), q_b)
    decay = segments.cut(docs.carry_out(), decay)
  return dst * decay + tiles.mm_tn(do, q_b, prec)


def intra_weights(qs, ks, gs, prec, docs=None):
  """The intra-chunk weights A_ts = sum_k q_tk k_sk exp(b_tk - b_sk), s <= t, as
  [16, 16] blocks ``a[(i, j)]`` for j <= i (blocks above the diagonal are zero);
  with ``docs`` (``segments.DocTiles``), zero unless t and s share a document.

  A is a sum over key channels, so called on a block of key columns (``qs``,
  ``ks``, ``gs`` [16, BK]; or ``gs`` the [16, 1] columns of a head gate) it
  gives that block's share, and the shares add up.
  Off-diagonal blocks pivot on r_i; diagonal blocks are formed in log space
  (``diag_block``), the costliest elementwise work of a chunk.
  """
  sums = GateSums(gs)
  n = len(qs)
  q_in = [qs[i] * jnp.exp(sums.z[i]) for i in range(n)]  # q_t exp(b_t - r_i)
  a = {(i, j): tiles.mm_nt(q_in[i], ks[j] * jnp.exp(sums.between(j, i)), prec)
       for i in range(n) for j in range(i)}
  for i in range(n):
    a[(i, i)] = diag_block(qs[i], ks[i], sums.z[i])
  if docs is not None:
    a = {(i, j): jnp.where(docs.same(i, j), x, 0.0) for (i, j), x in a.items()}
  return a


def chunk_output(qs, ks, gs, v_blocks, prec, docs=None):
  """Unscaled outputs of one chunk.

  o_t = (q_t exp(b_t)) S + sum_{s <= t} (q_t exp(b_t - b_s)) . k_s v_s.

  The intra-chunk weights (``intra_weights``) depend on q, k and the gates
  only, so they are formed once and applied to every block of value columns.

  Args:
    qs, ks: [16, K] sub-chunk blocks; gs: [16, K] blocks, or [16, 1]
      columns for one gate per head.
    v_blocks: one tuple (vs, st) per block of value columns: vs [16, BV]
      sub-chunk blocks of v, st [BV, K] those rows of the transposed state
      entering the chunk.
    prec: matmul precision for the data.
    docs: the chunk's ``segments.DocTiles``, or None (no documents).

  Returns:
    One list of [16, BV] row blocks per value block.
  """
  sums = GateSums(gs)
  n = len(qs)
  q_state = [qs[i] * jnp.exp(sums.z[i]) * jnp.exp(sums.before(i))
             for i in range(n)]  # q_t exp(b_t)
  if docs is not None:
    q_state = [segments.cut(docs.carry(i), x) for i, x in enumerate(q_state)]
  a = intra_weights(qs, ks, gs, prec, docs)
  out = []
  for vs, st in v_blocks:
    rows = []
    for i in range(n):
      o = tiles.mm_nt(q_state[i], st, prec)
      for j in range(i + 1):
        o = o + tiles.mm(a[(i, j)], vs[j], prec)
      rows.append(o)
    out.append(rows)
  return out


def chunk_grads(qs, ks, gs, v_blocks, prec, docs=None):
  """Gradients inside one chunk, lists of row blocks.

  The gate gradient is complete per chunk: g_t (t in the chunk) reaches the loss
  through pairs (u >= t > s) inside the chunk, through q_u exp(b_u) S for u >= t,
  and through the state leaving the chunk, exp(b_C) S + sum_s k_s exp(b_C - b_s)
  v_s, where the pairs s < t count. ``dst`` already holds every later chunk's
  dependence on that state. So

    dg_t = sum_{u >= t} [q_u dq_u - k_u dk_u]   (inside the chunk, t = s terms
                                                 excluded: they cancel exactly)
         + sum_{s < t} k_s dk'_s + sum_v exp(b_C) S dS

  with dk'_s the part of dk_s that flows through the leaving state. Writing the
  last term as a prefix over s < t, rather than as the global
  sum_{u >= t} (-k_u dk'_u) plus a final-state term, matters under strong
  decay: the last token's key enters the final state with weight exactly 1, and
  that O(1) term would cancel against the final-state term and leave rounding
  noise far above the true gradient (about exp(-50) at log_g = -50).

  Value columns may come in blocks (``v_blocks``): every V-dependent term of
  dq, dk and dg is a sum over value columns, so each block adds its part, and
  dv is per block. The TPU kernel passes one block; the GPU kernels do not use
  this function but its parts (``intra_weights``, ``intra_grads``,
  ``finish_grads``) on 64-column tiles.

  Args:
    qs, ks: [16, K] blocks of the chunk; gs: [16, K] blocks, or [16, 1]
      columns for one gate per head (dg then comes as [16, 1] columns).
    v_blocks: one tuple (vs, dos, st, dst) per block of value columns: vs, dos
      [16, BV] sub-chunk blocks of v and of the output gradient (already
      scaled); st [BV, K] those rows of the transposed state entering the chunk;
      dst [BV, K] of the gradient for the state leaving it.
    prec: matmul precision for the data (not the gates).
    docs: the chunk's ``segments.DocTiles``, or None. With documents every
      term is cut as in the forward; each cut term is a 0/1 multiple, so the
      gate-gradient sums above hold with the cut terms' parts left out.

  Returns:
    dq, dk, dg: lists of [16, K]; dv: one list of [16, BV] per value block.
  """
  cut = (lambda mask, x: x) if docs is None else segments.cut  # noqa: E731
  same = (lambda i, j: None) if docs is None else docs.same  # noqa: E731
  carry = (lambda i: None) if docs is None else docs.carry  # noqa: E731
  tail = (lambda j: None) if docs is None else docs.tail  # noqa: E731
  sums = GateSums(gs)
  n = len(qs)
  strict = _strict(SUB)
  dec = [jnp.exp(z) for z in sums.z]  # exp(b_t - r_i)
  q_in = [qs[i] * dec[i] for i in range(n)]
  dec_between = {(j, i): jnp.exp(sums.between(j, i))
                 for i in range(n) for j in range(i)}
  k_end = [cut(tail(j), ks[j] * jnp.exp(sums.to_end(j))) for j in range(n)]
  diag = [cut(same(i, i), diag_block(qs[i], ks[i], sums.z[i])) for i in range(n)]
  zeros = [jnp.zeros_like(q) for q in qs]
  dq, dk, dk_out, da_tt = list(zeros), list(zeros), list(zeros), [0.0] * n
  leaving = 0.0
  dv_blocks = []
  for vs, dos, st, dst in v_blocks:
    dv = [tiles.mm_nt(k_end[j], dst, prec) for j in range(n)]
    leaving = leaving + jnp.sum(st * dst, axis=0, keepdims=True)
    for i in range(n):
      do = dos[i]
      dk_out[i] = dk_out[i] + cut(tail(i), tiles.mm(vs[i], dst, prec))
      dq[i] = dq[i] + cut(carry(i), tiles.mm(do, st, prec)
                          * (dec[i] * jnp.exp(sums.before(i))))
      for j in range(i):
        k_in = ks[j] * dec_between[(j, i)]
        da = cut(same(i, j), tiles.mm_nt(do, vs[j], prec))  # [16, 16]
        dv[j] = dv[j] + tiles.mm_tn(
            cut(same(i, j), tiles.mm_nt(q_in[i], k_in, prec)), do, prec)
        dq[i] = dq[i] + tiles.mm(da, k_in, prec) * dec[i]
        dk[j] = dk[j] + tiles.mm_tn(da, q_in[i], prec) * dec_between[(j, i)]
      dv[i] = dv[i] + tiles.mm_tn(diag[i], do, prec)
      da = jnp.where(strict, cut(same(i, i), tiles.mm_nt(do, vs[i], prec)), 0.0)
      dq_d, dk_d = diag_block_grads(qs[i], ks[i], sums.z[i], da)
      dq[i], dk[i] = dq[i] + dq_d, dk[i] + dk_d
      da_tt[i] = da_tt[i] + jnp.sum(do * vs[i], axis=1, keepdims=True)  # [16, 1]
    dv_blocks.append(dv)

  if docs is not None:
    leaving = segments.cut(docs.carry_out(), leaving)
  dq, dk, dg = finish_grads(sums, qs, ks, dq, dk, dk_out, da_tt, leaving)
  return dq, dk, dg, dv_blocks


def intra_grads(sums, qs, ks, da, prec):
  """The parts of dq and dk that flow through the strictly-lower intra-chunk
  weights (s < t), given their gradient in [16, 16] blocks ``da[(i, j)]``,
  j <= i (the diagonal t = s entries of ``da[(i, i)]`` are ignored).

  Per key channel given ``da``, so it runs on a block of key columns: ``sums``
  = GateSums of that block's gates, ``qs``, ``ks`` [16, BK]. Returns dq, dk:
  lists of [16, BK].
  """
  n = len(qs)
  strict = _strict(SUB)
  # The diagonal blocks first, all in one column loop, while little else is live.
  dq, dk = diag_blocks_grads(qs, ks, sums.z,
                             [jnp.where(strict, da[(i, i)], 0.0) for i in range(n)])
  dec = [jnp.exp(z) for z in sums.z]  # exp(b_t - r_i)
  for i in range(n):
    q_in = qs[i] * dec[i]
    for j in range(i):
      dec_between = jnp.exp(sums.between(j, i))
      dq[i] = dq[i] + tiles.mm(da[(i, j)], ks[j] * dec_between, prec) * dec[i]
      dk[j] = dk[j] + tiles.mm_tn(da[(i, j)], q_in, prec) * dec_between
  return dq, dk


def finish_grads(sums, qs, ks, dq, dk, dk_out, da_tt, leaving):
  """dq, dk and dg of one chunk (or block of key columns) from their parts.

  Args:
    sums: GateSums of the chunk's gates (per channel, or one per head).
    qs, ks: [16, K] blocks.
    dq: [16, K] blocks, every term but the t = s one (the state entering the
      chunk included).
    dk: [16, K] blocks, the strictly intra-chunk part (s < t).
    dk_out: [16, K] blocks, sum_v v_s dS before the decay to the chunk end.
    da_tt: [16, 1] blocks, the gradient of the t = s weights (do_t . v_t).
    leaving: [1, K], sum_v S * dS (before exp(b_C)).

  Returns:
    dq, dk: lists of [16, K]; dg: lists of [16, K], or of [16, 1] for one gate
    per head (summed over these key columns). The sums are as ``chunk_grads``
    explains.
  """
  n = len(qs)
  # One gate per head: its gradient is the per-channel one summed over the key
  # columns, so each term is summed over them first ([16, 1] columns).
  if is_head_gate(sums.tot[0]):
    over_k = lambda x: jnp.sum(x, axis=1, keepdims=True)  # noqa: E731
  else:
    over_k = lambda x: x  # noqa: E731
  dk_out = [dk_out[j] * jnp.exp(sums.to_end(j)) for j in range(n)]
  inner = [over_k(qs[i] * dq[i] - ks[i] * dk[i]) for i in range(n)]
  through_state = [over_k(ks[i] * dk_out[i]) for i in range(n)]
  inner_tot = [jnp.sum(x, axis=0, keepdims=True) for x in inner]
  state_tot = [jnp.sum(x, axis=0, keepdims=True) for x in through_state]
  leaving = over_k(leaving * jnp.exp(sums.total()))
  dg = []
  for i in range(n):
    x = inner[i] + suffix_sum_rows(inner[i])
    for m in range(i + 1, n):
      x = x + inner_tot[m]
    x = x + prefix_sum_rows_exclusive(through_state[i])
    for m in range(i):
      x = x + state_tot[m]
    dg.append(x + leaving)

  # The t = s terms: weight 1, no gate dependence, so added after dg.
  dq = [dq[i] + da_tt[i] * ks[i] for i in range(n)]
  dk = [dk[i] + da_tt[i] * qs[i] + dk_out[i] for i in range(n)]
  return dq, dk, dg
