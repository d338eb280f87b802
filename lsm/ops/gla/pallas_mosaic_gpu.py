r"""GLA as Mosaic GPU Pallas kernels (Hopper and newer), with a custom VJP.

The recurrence is defined in ``reference.py``. The chunk math is that of
``chunk_tiles.py`` (which explains the numerics), recast for the Hopper tensor
core: a chunk of C = 64 tokens is one wgmma M tile, so every kernel works on
whole [64, D] tiles and the 16-token sub-chunks appear as row masks and as row
offsets into SMEM, not as separate [16, D] tiles. ``pallas_vjp.make_gla``
supplies the custom VJP (the backward recomputes the chunk states instead of
storing them; see there); the five kernels below make up its four launchers
(``forward``, ``states``, ``dstates``, ``grads``).

With b_t the gate sum from the chunk start to t (inclusive) and st = S^T
[V, K] the transposed state entering the chunk:

    o_t = scale [(q_t exp(b_t)) S + sum_{s <= t} A_ts v_s],
    A_ts = sum_k q_tk k_sk exp(b_tk - b_sk),
    st'  = exp(b_C) st + v^T (k exp(b_C - b)).

Kernels (one warpgroup each; all on [B, T, H, D] arrays as the op gets them, a
[C, D] tile of one (b, h) being a strided TMA box):

  gla_states_mgpu   grid (B, H, V / 64), loop over the N chunks: the state
                    entering every chunk (input dtype) and h_T. Forward, and
                    again in the backward.
  gla_output_mgpu   grid (B, H, N): A (``_intra_weights``), then o by two
                    wgmmas into one accumulator, per V block.
  gla_dstates_mgpu  grid (B, H, V / 64), the reverse loop: the gradient for
                    the state leaving every chunk, and dh0.
  gla_dv_mgpu       grid (B, H, N): A again, dv = scale A^T do + k_end dS,
                    per V block.
  gla_dqkg_mgpu     grid (B, H, N, K / 64): dq, dk and d log_g of 64 key
                    columns (``_dqkg_kernel``), the V contractions summed
                    over the V blocks.

V blocks (V up to 512, issue 28): the state passes already work on 64-row
blocks of V in their grid. The three chunk kernels take V in blocks of BVC =
``mosaic_gpu.v_block(V)`` columns (all of V up to 128, else 128), in a static
loop inside the program: A and the key-side factors, the expensive part, are
formed once per chunk, and each block's [C, BVC] value tile and [BVC, K]
state block come in by TMA into one set of tiles, the next block's fetch
issued as soon as this one's wgmmas are done. output and dv store a [C, BVC]
result per block; dqkg sums dA, dA^T, the ``leaving`` column sums and its two
state terms over the blocks (the state terms as bf16 hi / lo pairs in its
gate-sum tile, 16 significant bits). So no kernel's SMEM grows past V = 128
(``smem_bytes``). K stays at most 128: every kernel holds [C, K] tiles and
[BV, K] state blocks whole.

Packed documents (``resets``; convention and masks in ``segments``): every
kernel also takes the chunk-local document index d_t of its chunk
(``segments.kernel_docs``' rows, [B, N, 1, C] float32, from
``pallas_vjp.make_gla``), a [1, C] TMA box into a plain float32 tile, and cuts
each term with ``jnp.where`` on the masks of ``_DocMasks`` (never a -inf
gate; the cut terms are finite, every exponent being <= 0), exactly the terms
that ``chunked._cut`` and ``chunked._fast_bwd`` cut:

  same[t, s] = (d_t == d_s)        A in gla_output_mgpu and gla_dv_mgpu, dA
                                   and dA^T in gla_dqkg_mgpu (pivot and
                                   diagonal parts alike);
  carry[t] = (d_t == 0)            the rows of q exp(b): against S in
                                   gla_output_mgpu, into the reverse pass in
                                   gla_dstates_mgpu, dq's S-in term in
                                   gla_dqkg_mgpu;
  tail[s] = (d_s == d_{C-1})       the rows of k exp(b_C - b): into the state
                                   in gla_states_mgpu, dv's dS term in
                                   gla_dv_mgpu, dk's S-out term in
                                   gla_dqkg_mgpu;
  carry_out = (d_{C-1} == 0)       the decay exp(b_C) of the carry in both
                                   state passes, and d log_g's ``leaving``
                                   term exp(b_C) sum_v S dS.

d log_g needs nothing else: its row sums are of the already cut dq, dk and
dk_state terms (the t = s terms of A are always kept). The document forms
add 1 KiB and one barrier to the chunk kernels (the state passes: a
double-buffered [2, C] tile, two barriers, and the 2 KiB reduction scratch of
``_DocMasks``' row sums: +3 KiB); the largest, gla_dqkg_mgpu at V >= 128, is
199,744 B of the 232,448 B per block (``smem_bytes(..., docs=True)``).

Gate forms. Per-channel gates [B, T, H, K] are read as above: b in [C, K]
tiles (plain padded float32 in the chunk kernels, read at row offsets by the
sub-chunk pivots and the log-space diagonal loops). One gate per head
[B, T, H] (Mamba-2, RetNet, Lightning) is read as it is, never broadcast over
K: each kernel has a head-gate form, a static choice by the shape of b. The
launchers give it the chunk's [1, C] row of b (``_gate_prefix``: [B, H, N, 1,
C], [B, T, H] sized), a TMA box into a float32 row tile, loaded as a
per-token vector (``_COL``) that stands where the per-channel form has a
[C, K] tile: exp(b_t) and exp(b_C - b_t) are one factor per row, exp(b_C) a
scalar (loaded from SMEM), and

    A_ts = (q_t . k_s) exp(b_t - b_s)   (s <= t)

is one [C, K] x [K, C] wgmma of q and k as they come (swizzled tiles, by
TMA) times a [C, C] decay tile (``_head_weights``): every exponent kept is
<= 0 at any decay, so there are no sub-chunk pivots, no log-space diagonal
loops and no padded plain tiles. dq and dk below the diagonal are two wgmmas
of one dA o W tile, and d log_g is the per-channel gradient summed over K
(the chain rule through a broadcast): per token inside each dqkg program,
then over the K / 64 programs' [1, C] rows in XLA, as the Triton kernels do
(``_head_dqkg``). Documents cut the same terms with the same masks. The head
forms take less SMEM (``smem_bytes(..., head=True)``; K = 128, V >= 128, no
documents: state passes 115,768 B against 180,280, output and dv 107,560
against 198,696, dqkg 127,032 against 198,712).

Each launcher's docstring gives its tiles, SMEM bytes (``smem_bytes``; the
lowering's own count is checked against it in the tests) and register plan
(registers per thread of the 128-thread warpgroup; a float32 [64, 64] tile in
the WGMMA layout is 32). Registers and spills are only visible where ptxas
runs, on a GPU; the plans are estimates, not measurements.

Numerics.
- Gate prefix sums b are formed in XLA before the kernels (``_gate_prefix``;
  one [C] row a chunk for head gates), in float32: Mosaic GPU has no cumsum,
  and a prefix sum by wgmma would round the gates to bf16 / TF32. Inside the
  kernels every exponent is <= 0 (head gates: see Gate forms above): q
  exp(b), k exp(b_C - b), and the intra-chunk blocks below the sub-chunk
  diagonal pivot on r_i, the gate sum before sub-chunk i (q exp(b_t - r_i),
  k exp(r_i - b_s)). The 16 x 16 diagonal blocks are formed in log space, one
  offset d = t - s at a time, exp(b_t - b_(t-d)) on [64, 64] tiles read d rows
  off from plain SMEM tiles: exact for any decay (log_g = -50 per token
  included).
- wgmma operands are the input dtype (bf16 or f16) with float32 accumulation:
  q exp(b), the key factors, A, dA and the per-chunk states are rounded to it
  before the products (as flash-linear-attention does), about 0.3% relative
  RMS error against the 1e-2 bf16 tolerance. The gate-gradient sums run on a
  two-part bf16 split (``_dqkg_kernel``). float32 inputs are refused: wgmma's
  float32 path is TF32 (10-bit mantissa), ~5e-4 relative per product, above
  the float32 tolerance of 1e-4. With float16 inputs the per-chunk states are
  float16 too, so a state entry past 65504 (long sequences with little decay
  and large keys and values) would overflow where bf16 would not.
- Masked entries (pad rows, and with documents the terms ``_DocMasks`` cuts)
  are selected away with ``where`` before they can meet a
  multiply (the pad rows of the plain tiles are never written, and interpret
  mode fills them with NaN).

Mosaic GPU facts these kernels rely on (jax 0.11.2, Warpgroup lowering
semantics, pinned in ``_PARAMS``; checked by lowering for CUDA and in
``plgpu.InterpretGPUParams`` interpret mode):
- Registers <-> SMEM in the WGMMA layout: optimized (``ref[...]``) only for
  tiled + swizzled refs; plain refs need ``plgpu.load(..., optimized=False)``,
  which also takes dynamic row offsets (``ref.at[pl.ds(16 - d, 64)]``). A
  single row loads as a 1-D ``Layout.WGMMA.reduce(0)`` vector and broadcasts
  with ``lax.broadcast_in_dim(r, shape, [1])``; slicing a row out of a swizzled
  ref fails (offsets must be multiples of the 8-row tile).
- wgmma takes transposed 16-bit SMEM operands (``ref.T``) for A and B. Its
  accumulator is zeroed by ``pl.run_scoped(..., plgpu.ACC(...))``; the
  interpreter does not handle ``pl.run_state`` (``plgpu.ACC.init``), so initial
  values are added after the product.
- ``plgpu.commit_smem()`` before a TMA that overwrites a tile read in the
  previous loop step: without it the interpreter's race detector reports the
  read / TMA-write pair.
- A kernel with a reduction gets the 2 KiB reduction scratch
  (``_PARAMS.reduction_scratch_bytes``) from the lowering: the state passes,
  whose only reductions are ``_DocMasks``' [C, C] row sums (axis 1), have it
  in their document form and not without (``smem_bytes``); so have the
  head-gate forms of output and dv.
- A [C] float32 row of a plain ref loads as a per-token vector too
  (``Layout.WGMMA.reduce(1)``, ``_COL``; C = 64, one value per row of the
  64-row tile) and broadcasts with ``lax.broadcast_in_dim(r, shape, [0])``;
  such a vector stores back to a row (the d log_g row sums); a scalar loads
  as ``ref[i, j]``. Loading one SMEM view in both vector layouts (``_COL``
  and ``_ROW``) fails layout inference (the two identical loads become one
  value with two layouts), so ``_head_decay`` copies the row within its tile.
- Hazards reported for jax 0.11.2 are avoided: no warpgroup exits early (one
  warpgroup per kernel, no early returns) and no accumulator is negated
  (``-acc * x`` gave zeros): gradients use differences, never negations.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lsm.ops.common import kernel_shapes, mosaic_gpu
from lsm.ops.gla import pallas_vjp

# What the kernels take (lsm.ops._dispatch reads it for impl= and "auto").
ACCEPTS = mosaic_gpu.ACCEPTS

_F32 = jnp.float32
C = mosaic_gpu.CHUNK  # chunk length: one wgmma M tile
SUB = 16  # sub-chunk length of the intra-chunk pivots
BV = 64  # value columns per program of the sequential state passes (wgmma M)
BK = 64  # key columns per program of the dq / dk / d log_g kernel
PAD = SUB  # rows above and below the chunk in the plain tiles read at offsets
MAX_HEAD_DIM, DTYPES = mosaic_gpu.MAX_HEAD_DIM, mosaic_gpu.DTYPES
_WGMMA, _ROW = mosaic_gpu.WGMMA, mosaic_gpu.ROW
# A [C] vector laid out like a tile column (one value per row of a 64-row
# WGMMA tile): per-token values of one chunk, e.g. a head gate's sums.
_COL = plgpu.Layout.WGMMA.reduce(1)
_PARAMS = mosaic_gpu.PARAMS
_swizzled, _plain, _load, _load_row, _iota, _mm = (
    mosaic_gpu.swizzled, mosaic_gpu.plain, mosaic_gpu.load, mosaic_gpu.load_row,
    mosaic_gpu.iota, mosaic_gpu.mm)
_interpret_params, _padded, _v_block = (
    mosaic_gpu.interpret_params, mosaic_gpu.padded, mosaic_gpu.v_block)


def _is_head(g) -> bool:
  """Whether gates ``g`` [B, Tp, H, 1] hold one gate per head (the
  ``pallas_vjp`` view of [B, T, H] gates; per-channel gates have K >= 64)."""
  return g.shape[-1] == 1


def _gate_prefix(g):
  """b: inclusive prefix sums of the gates inside each chunk of C tokens,
  float32: [B, Tp, H, K] for per-channel gates; for one gate per head ([B,
  Tp, H, 1]) [B, H, N, 1, C], chunk n of head h as one row, the [1, C] TMA
  box of the head-gate kernels (a [C, 1] column of the op's layout is no TMA
  box: its 4-byte rows are below TMA's 16-byte minimum). Either is [B, T, H]
  or [B, T, H, K] sized as the op got the gates: no K-wide copy of a head
  gate."""
  B, Tp, H, K = g.shape
  if _is_head(g):
    rows = jnp.swapaxes(g[..., 0], 1, 2).reshape(B, H, Tp // C, 1, C)
    return jnp.cumsum(rows, axis=-1)
  return jnp.cumsum(g.reshape(B, Tp // C, C, H, K), axis=2).reshape(g.shape)


def _load_col(ref):
  """A plain [C] float32 row ref (gate sums of one chunk, one per token) as a
  per-token vector: laid out like a tile column (``_COL``), so it broadcasts
  across the columns of a [C, D] tile with ``_down``."""
  return plgpu.load(ref, layout=_COL, optimized=False).astype(_F32)


def _down(vec, shape):
  """A per-token [C] vector (``_COL`` layout) broadcast across the columns of
  ``shape`` [C, D]: row t holds vec[t] in every entry."""
  return lax.broadcast_in_dim(vec, shape, [0])


# ------------------------------------------------------------ documents ---


class _DocMasks:
  """The masks of ``segments.chunk_masks`` for one chunk, from row ``i`` of
  the plain float32 [n, C] tile ``d_s``: its chunk-local document indices d_t
  (``segments.kernel_docs``' rows: 0 until the chunk's first reset, +1 at
  each reset). The row loads as a ``_ROW`` vector and broadcasts down the
  columns (d_s at [t, s]); the per-token column vectors d_t and d_{C-1} (in
  every entry) come from it by masked row sums on a [C, C] tile (exact for
  small integers), the transpose-free way of ``da_tt`` in ``_dqkg_kernel``.
  Every mask is a bool tile for ``jnp.where``:

    same [C, C]         d_t == d_s         intra-chunk weights A and dA;
    carry(shape)        d_t == 0           q exp(b) against the incoming
                                           state, and their gradients;
    tail(shape)         d_t == d_{C-1}     k exp(b_C - b) into the outgoing
                                           state, and their gradients;
    carry_out(shape)    d_{C-1} == 0       exp(b_C) on the incoming state
                                           (forward and reverse pass) and the
                                           ``leaving`` part of d log_g.

  ``shape`` is [64, D] (rows = the chunk's tokens, or the BV = 64 state rows
  for carry_out, whose value is one per chunk).
  """

  def __init__(self, d_s, i=0):
    shape = (C, C)
    self._row = _load_row(d_s, i, shape)  # [C, C]: d_s at [t, s]
    r, c = _iota(shape, 0), _iota(shape, 1)
    self._col = jnp.sum(jnp.where(r == c, self._row, 0.0), axis=1)  # [C]: d_t
    self._last = jnp.sum(jnp.where(c == C - 1, self._row, 0.0), axis=1)

  def _bcast(self, vec, shape):
    return lax.broadcast_in_dim(vec, shape, [0])

  @property
  def same(self):
    return self._bcast(self._col, (C, C)) == self._row

  def carry(self, shape):
    return self._bcast(self._col, shape) == 0.0

  def tail(self, shape):
    return self._bcast(self._col, shape) == self._bcast(self._last, shape)

  def carry_out(self, shape):
    return self._bcast(self._last, shape) == 0.0


def _cut(mask, x):
  """x where ``mask``, else 0; x itself without documents (mask None)."""
  return x if mask is None else jnp.where(mask, x, 0.0)


def _with_docs(kernel, n_in, n_out, docs):
  """A ``plgpu.kernel`` body for ``kernel(*refs, docs=...)``: without
  documents ``docs=None``; with them the launcher appends the document row
  array as the last input and the doc scratch (``_DOC_SCRATCH``: the SMEM
  tile and its barriers) after the kernel's own scratch, and ``kernel`` gets
  ``docs=(GMEM ref, SMEM tile, barriers)``."""
  if not docs:
    return functools.partial(kernel, docs=None)

  def body(*refs):
    d_ref, outs = refs[n_in], refs[n_in + 1:n_in + 1 + n_out]
    *scratch, d_s, d_bars = refs[n_in + 1 + n_out:]
    return kernel(*refs[:n_in], *outs, *scratch, docs=(d_ref, d_s, d_bars))
  return body


def _doc_rows(docs):
  """The launchers' ``docs`` (None, or ``segments.kernel_docs``' (cols,
  rows)) as the kernels' extra inputs: () or (rows [B, N, 1, C] float32,)."""
  return () if docs is None else (docs[1],)


def _doc_scratch(n_buffers):
  """The doc tile [n_buffers, C] float32 (a row per buffer, each the TMA
  destination of a [1, C] box; one 1 KiB allocation), one barrier each."""
  return [_plain((n_buffers, C), _F32), plgpu.Barrier(num_barriers=n_buffers)]


# --------------------------------------------------------- state passes ---


def _state_pass_kernel(x_ref, y_ref, b_ref, h_ref, hs_ref, hlast_ref,
                       x_s, y_s, b_s, xe_s, st_s, h_s, bars, *, reverse, scale,
                       docs):
  ib, ih, iv = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
  N = hs_ref.shape[2]
  K = x_ref.shape[-1]
  vcols = pl.ds(iv * BV, BV)
  head = b_s.ndim == 2  # one gate per head: [2, C], a gate-sum row a buffer

  def fetch(i, slot):  # chunk i of the loop's order into buffer ``slot``
    n = N - 1 - i if reverse else i
    rows = pl.ds(n * C, C)
    plgpu.copy_gmem_to_smem(x_ref.at[ib, rows, ih], x_s.at[slot],
                            bars.at[3 * slot])
    plgpu.copy_gmem_to_smem(y_ref.at[ib, rows, ih, vcols], y_s.at[slot],
                            bars.at[3 * slot + 1])
    if head:  # the chunk's [1, C] row of b
      plgpu.copy_gmem_to_smem(b_ref.at[ib, ih, n], b_s.at[pl.ds(slot, 1)],
                              bars.at[3 * slot + 2])
    else:
      plgpu.copy_gmem_to_smem(b_ref.at[ib, rows, ih], b_s.at[slot],
                              bars.at[3 * slot + 2])
    if docs:
      d_ref, d_s, d_bars = docs
      plgpu.copy_gmem_to_smem(d_ref.at[ib, N - 1 - i if reverse else i],
                              d_s.at[pl.ds(slot, 1)], d_bars.at[slot])

  plgpu.copy_gmem_to_smem(h_ref.at[ib, ih, vcols], h_s, bars.at[6])
  fetch(0, 0)
  plgpu.barrier_wait(bars.at[6])

  def body(i, st):
    slot = lax.rem(i, 2)
    n = N - 1 - i if reverse else i

    @pl.when(i + 1 < N)
    def _():
      plgpu.commit_smem()  # the last step's reads of that buffer come first
      fetch(i + 1, 1 - slot)

    st_s[...] = st.astype(st_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(st_s, hs_ref.at[ib, ih, n, vcols])
    for j in range(3):
      plgpu.barrier_wait(bars.at[3 * slot + j])
    x_t, b_t = x_s.at[slot], b_s.at[slot]
    masks = None
    if docs:
      plgpu.barrier_wait(docs[2].at[slot])
      masks = _DocMasks(docs[1], slot)
    # Documents: only tokens before the chunk's first reset read the incoming
    # state (reverse: carry), only the last document's write the outgoing one
    # (forward: tail), and the incoming state leaves only a reset-free chunk.
    rows_in = None if masks is None else (
        masks.carry((C, 64)) if reverse else masks.tail((C, 64)))
    if head:
      return _head_state_step(st, x_t, y_s.at[slot], b_t, xe_s, rows_in, masks,
                              reverse=reverse, scale=scale)
    for kc in range(K // 64):  # 64 key columns at a time: fewer live registers
      cols = pl.ds(kc * 64, 64)
      b = _load(b_t.at[:, cols])  # [C, 64]
      if reverse:  # q_t exp(b_t)
        e = jnp.exp(b)
      else:  # k_s exp(b_C - b_s)
        e = jnp.exp(_load_row(b_t.at[:, cols], C - 1, (C, 64)) - b)
      xe_s[:, cols] = _cut(rows_in, _load(x_t.at[:, cols]) * e).astype(
          xe_s.dtype)
    plgpu.commit_smem()
    upd = _mm(y_s.at[slot].T, xe_s, (BV, K))  # [BV, C] x [C, K]
    decay = jnp.exp(_load_row(b_t, C - 1, (BV, K)))
    if masks is not None:
      decay = _cut(masks.carry_out((BV, K)), decay)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # st_s is written next step
    return st * decay + scale * upd

  h_s[...] = lax.fori_loop(0, N, body, h_s[...])
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(h_s, hlast_ref.at[ib, ih, vcols])
  plgpu.wait_smem_to_gmem(0)


def _head_state_step(st, x_t, y_t, b_t, xe_s, rows_in, masks, *, reverse,
                     scale):
  """One chunk of ``_state_pass_kernel`` with one gate per head: ``b_t`` the
  chunk's [C] row of gate sums, so every factor is one number per token
  (exp(b_t) or exp(b_C - b_t), a ``_COL`` vector down the rows of x) and the
  decay exp(b_C) one scalar over the [BV, K] carry."""
  K = x_t.shape[-1]
  b = _load_col(b_t)  # [C]
  b_end = b_t[C - 1]  # b_C, a scalar
  e = jnp.exp(b) if reverse else jnp.exp(b_end - b)  # [C]
  for kc in range(K // 64):  # 64 key columns at a time, as per channel
    cols = pl.ds(kc * 64, 64)
    xe_s[:, cols] = _cut(rows_in, _load(x_t.at[:, cols]) * _down(
        e, (C, 64))).astype(xe_s.dtype)
  plgpu.commit_smem()
  upd = _mm(y_t.T, xe_s, (BV, K))  # [BV, C] x [C, K]
  decay = jnp.exp(b_end)
  if masks is not None:
    decay = _cut(masks.carry_out((BV, K)), decay)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # st_s is written next step
  return st * decay + scale * upd


def _state_pass_scratch(K, V, dtype, head=False):
  """Plain x [2, C, K], swizzled y [2, C, BV], plain float32 b [2, C, K]
  (one gate per head: [2, C], a row per buffer), swizzled x exp(.) [C, K],
  the carry's input-dtype copy [BV, K], float32 [BV, K] for h in and out."""
  del V
  b = _plain((2, C), _F32) if head else _plain((2, C, K), _F32)
  return [_plain((2, C, K), dtype), _swizzled((2, C, BV), dtype), b,
          _swizzled((C, K), dtype), _swizzled((BV, K), dtype),
          _swizzled((BV, K), _F32)]


def _state_pass(x, y, b, h, *, reverse, scale, interpret, docs=None):
  """The sequential pass over the chunks.

  Forward (``reverse=False``; x = k, y = v, h = h0t): the transposed state
  entering every chunk, st' = exp(b_C) st + v^T (k exp(b_C - b)). Backward
  (``reverse=True``; x = q, y = do, h = dh_Tt): the gradient for the state
  leaving every chunk, last chunk first, dst' = exp(b_C) dst + scale do^T
  (q exp(b)).

  Grid (B, H, V / BV), BV = 64: each program carries a float32 [BV, K] block
  of the state in registers (M = 64, one warpgroup's wgmma) through the N
  chunks. The next chunk's x, b [C, K] and y [C, BV] tiles come in by TMA
  while this one is worked on (two buffers); x exp(.) goes to a swizzled tile
  and one wgmma [BV, C] x [C, K] (y^T as a transposed operand) updates the
  carry. The carry leaves every step as an input-dtype tile by TMA.

  SMEM (``_state_pass_scratch``): plain x [2, C, K], swizzled y [2, C, BV],
  plain float32 b [2, C, K], swizzled x exp(.) [C, K], the carry's
  input-dtype copy [BV, K], float32 [BV, K] for h in and out: 176 KiB at K =
  128, 96 KiB at K = 64. Registers: the carry and the update
  [BV, K] (2 x 64 at K = 128), one [C, 64] column half of x and b at a time
  (64).

  Documents (``docs``: ``segments.kernel_docs``' pair, or None): the chunk's
  [1, C] row of document indices comes in by TMA with the other tiles (two
  more buffers and barriers, and the reduction scratch of ``_DocMasks``'
  row sums: +3 KiB, 179 KiB at K = 128, 99 KiB at K = 64), and ``_DocMasks``
  cuts the rows of x exp(.) (forward: tail, reverse: carry) and the decay
  exp(b_C) (carry_out).

  One gate per head (``b`` [B, H, N, 1, C], ``_gate_prefix``): the chunk's
  [1, C] row of b comes in by TMA instead of the [C, K] tile
  (``_head_state_step``; b [2, C] in SMEM, 1 KiB for both buffers: 113 KiB at
  K = 128, 65 KiB at K = 64; with documents 116 / 68 KiB); x is scaled by
  one factor per token, the carry decays by one scalar.

  Returns the per-chunk values [B, H, N, V, K] in the input dtype (the
  gradient kernels read them as wgmma operands) and the float32 carry after
  the last chunk [B, H, V, K].
  """
  B, Tp, H, K = x.shape
  V = y.shape[-1]
  N = Tp // C
  name = "gla_dstates_mgpu" if reverse else "gla_states_mgpu"
  head = b.ndim == 5
  return plgpu.kernel(
      _with_docs(functools.partial(_state_pass_kernel, reverse=reverse,
                                   scale=scale), 4, 2, docs),
      out_type=(jax.ShapeDtypeStruct((B, H, N, V, K), x.dtype),
                jax.ShapeDtypeStruct((B, H, V, K), _F32)),
      scratch_types=[*_state_pass_scratch(K, V, x.dtype, head),
                     plgpu.Barrier(num_barriers=KERNELS[name][1]),
                     *_DOC_SCRATCH[name](docs)],
      grid=(B, H, V // BV), grid_names=("b", "h", "v"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(x, y, b, h, *_doc_rows(docs))


def states(k, v, g, h0t, *, docs, scale, chunk_size, interpret):
  del scale, chunk_size
  return _state_pass(k, v, _gate_prefix(g), h0t, reverse=False, scale=1.0,
                     interpret=interpret, docs=docs)[0]


def dstates(q, do, g, dh_tt, *, docs, scale, chunk_size, interpret):
  del chunk_size
  return _state_pass(q, do, _gate_prefix(g), dh_tt, reverse=True, scale=scale,
                     interpret=interpret, docs=docs)


# ------------------------------------------------------ intra-chunk part ---


def _block_of_rows(shape):
  return lax.div(_iota(shape, 0), SUB)


def _pivots(b_p, shape):
  """The pivots r_i (gate sum before sub-chunk i) from the padded plain gate
  tile ``b_p`` (chunk at rows PAD ..): (r_own, [r_1, r_2, r_3]), r_own [C, D]
  holding each row's own sub-chunk's pivot (r_0 = 0), the r_i broadcast to
  ``shape``."""
  rs = [_load_row(b_p, PAD + SUB * i - 1, shape) for i in range(1, C // SUB)]
  blk = _block_of_rows(shape)
  r_own = jnp.zeros(shape, _F32)
  for i, r in enumerate(rs, start=1):
    r_own = jnp.where(blk == i, r, r_own)
  return r_own, rs


def _intra_weights(q_c, k_p, b_p, qp_s, kb_s):
  """A [C, C] float32: A_ts = sum_k q_tk k_sk exp(b_tk - b_sk) for s <= t,
  zero above the diagonal.

  Below the sub-chunk diagonal by wgmma, one per pivot: with Q'_t = q_t
  exp(b_t - r_{t // 16}) (in ``qp_s``) and K_i = k_s exp(r_i - b_s) for
  s < 16 i, zero elsewhere (in ``kb_s``, rewritten per i), the rows of
  sub-chunk i of A are those of Q' K_i^T. Every exponent is <= 0. The diagonal
  16 x 16 blocks in log space (``_diag_blocks``).

  Args:
    q_c: plain [C, K] ref, the chunk's queries.
    k_p, b_p: plain [PAD + C + PAD, K] refs, keys and gate prefix sums at rows
      PAD .. PAD + C - 1.
    qp_s, kb_s: swizzled [C, K] scratch in the input dtype.
  """
  K = q_c.shape[-1]
  mid = pl.ds(PAD, C)
  b = _load(b_p.at[mid])  # [C, K]
  r_own, rs = _pivots(b_p, (C, K))
  qp_s[...] = (_load(q_c) * jnp.exp(b - r_own)).astype(qp_s.dtype)
  k = _load(k_p.at[mid])  # [C, K]
  row = _iota((C, K), 0)
  blk = _block_of_rows((C, C))
  a = jnp.zeros((C, C), _F32)
  for i, r in enumerate(rs, start=1):
    kb_s[...] = jnp.where(row < SUB * i, k * jnp.exp(jnp.minimum(r - b, 0.0)),
                          0.0).astype(kb_s.dtype)
    plgpu.commit_smem()
    a = jnp.where(blk == i, _mm(qp_s, kb_s.T, (C, C)), a)
  return a + _diag_blocks(q_c, k_p, b_p)


def _diag_blocks(q_c, k_p, b_p):
  """The 16 x 16 diagonal blocks of A, offset by offset: for d = 0 .. 15,
  c_t = sum_k q_tk k_(t-d)k exp(b_tk - b_(t-d)k) where t - d lies in t's
  sub-chunk, on [C, 64] tiles of 64 key columns (k and b read d rows up from
  the padded plain tiles), scattered to A[t, t - d]. [C, C] float32, zero off
  those blocks."""
  K = q_c.shape[-1]
  row_cc, col_cc = _iota((C, C), 0), _iota((C, C), 1)
  in_sub = lax.rem(_iota((C, 64), 0), SUB)
  a = jnp.zeros((C, C), _F32)
  for kc in range(K // 64):
    cols = pl.ds(kc * 64, 64)
    q = _load(q_c.at[:, cols])  # [C, 64]
    b = _load(b_p.at[pl.ds(PAD, C), cols])  # [C, 64]

    def offset(d, a, cols=cols, q=q, b=b):
      up = pl.ds(PAD - d, C)
      k_d = _load(k_p.at[up, cols])  # [C, 64]: row t holds k_(t-d)
      b_d = _load(b_p.at[up, cols])
      ok = in_sub >= d
      w = jnp.exp(jnp.where(ok, b - b_d, 0.0))
      c = jnp.sum(jnp.where(ok, q * k_d * w, 0.0), axis=1)  # [C]
      return a + jnp.where(col_cc == row_cc - d, c[:, None], 0.0)

    a = lax.fori_loop(0, SUB, offset, a)
  return a


def _fetch_docs(docs, ib, n):
  """The chunk's doc row into its [1, C] tile, then ``_DocMasks`` (None
  without documents). Issued before the chunk's tiles, waited after them."""
  if not docs:
    return None
  d_ref, d_s, d_bars = docs
  plgpu.copy_gmem_to_smem(d_ref.at[ib, n], d_s, d_bars.at[0])
  return lambda: (plgpu.barrier_wait(d_bars.at[0]), _DocMasks(d_s))[1]


def _fetch_chunk(q_ref, k_ref, b_ref, q_c, k_p, b_p, bars, ib, ih, n):
  """TMA the chunk's q (plain [C, K]), k and b (rows PAD .. of the padded
  plain tiles) on barriers 0 .. 2; waited by the caller."""
  rows, mid = pl.ds(n * C, C), pl.ds(PAD, C)
  for i, (src, dst) in enumerate([(q_ref.at[ib, rows, ih], q_c),
                                  (k_ref.at[ib, rows, ih], k_p.at[mid]),
                                  (b_ref.at[ib, rows, ih], b_p.at[mid])]):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])


def _fetch_head_chunk(q_ref, k_ref, b_ref, q_s, k_s, b_s, bars, ib, ih, n,
                      kcols=slice(None)):
  """One gate per head: TMA the chunk's q and k [C, K] (or the key columns
  ``kcols``) straight into swizzled wgmma operand tiles (no offset reads, so
  no plain padded tiles) and its [1, C] row of b into row 0 of the [2, C]
  gate tile (``_head_decay`` uses row 1), on barriers 0 .. 2."""
  rows = pl.ds(n * C, C)
  for i, (src, dst) in enumerate([(q_ref.at[ib, rows, ih, kcols], q_s),
                                  (k_ref.at[ib, rows, ih, kcols], k_s),
                                  (b_ref.at[ib, ih, n], b_s.at[pl.ds(0, 1)])]):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[i])


def _head_decay(b_s, *, strict):
  """exp(b_t - b_s) [C, C] float32 for s < t (``strict``) or s <= t, zero
  elsewhere, from the chunk's row of b (one gate per head, row 0 of the
  [2, C] tile ``b_s``): b_t down the rows, b_s along the columns. Every
  exponent kept is <= 0, so no pivot is needed at any decay; the others are
  zeroed before the exp (an exponent > 0 there could overflow).

  The row is read along the columns from a copy in row 1, written here from
  the per-token vector: Mosaic GPU's layout inference (jax 0.11.2) finds no
  solution when one SMEM view is loaded in both vector layouts (``_COL`` and
  ``_ROW``; the two identical loads become one value with two layouts)."""
  r, c = _iota((C, C), 0), _iota((C, C), 1)
  keep = (c < r) if strict else (c <= r)
  b = _load_col(b_s.at[0])  # [C]: b_t
  b_s[1, :] = b
  expo = _down(b, (C, C)) - _load_row(b_s, 1, (C, C))
  return jnp.where(keep, jnp.exp(jnp.where(keep, expo, 0.0)), 0.0)


def _head_weights(q_s, k_s, b_s):
  """A [C, C] float32 for one gate per head: A_ts = (q_t . k_s) exp(b_t - b_s)
  for s <= t, zero above the diagonal: one [C, K] x [K, C] wgmma of the
  chunk's own q and k (swizzled tiles), then the decay (``_head_decay``)."""
  return _mm(q_s, k_s.T, (C, C)) * _head_decay(b_s, strict=False)


def _output_kernel(q_ref, k_ref, v_ref, b_ref, hin_ref, o_ref, *scratch, scale,
                   docs, head=False):
  ib, ih, n = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("n")
  rows, mid = pl.ds(n * C, C), pl.ds(PAD, C)
  if head:
    q_s, k_s, b_s, v_s, st_s, a_s, o_s, bars = scratch
  else:
    q_c, k_p, b_p, v_s, st_s, qp_s, kb_s, a_s, o_s, bars = scratch
  BVC = v_s.shape[-1]  # value columns per V block
  wait_docs = _fetch_docs(docs, ib, n)

  def fetch_block(j):  # V block j: v [C, BVC] and S^T [BVC, K]
    cols = pl.ds(j * BVC, BVC)
    plgpu.copy_gmem_to_smem(v_ref.at[ib, rows, ih, cols], v_s, bars.at[3])
    plgpu.copy_gmem_to_smem(hin_ref.at[ib, ih, n, cols], st_s, bars.at[4])

  if head:
    _fetch_head_chunk(q_ref, k_ref, b_ref, q_s, k_s, b_s, bars, ib, ih, n)
  else:
    _fetch_chunk(q_ref, k_ref, b_ref, q_c, k_p, b_p, bars, ib, ih, n)
  fetch_block(0)
  for i in range(3):
    plgpu.barrier_wait(bars.at[i])
  masks = wait_docs and wait_docs()
  if head:  # one gate per head: A by one wgmma; q exp(b) into k's tile
    K = q_s.shape[-1]
    a = _head_weights(q_s, k_s, b_s)
    a_s[...] = _cut(masks and masks.same, a).astype(a_s.dtype)
    e = _down(jnp.exp(_load_col(b_s.at[0])), (C, K))  # exp(b_t)
    # k_s's one reader, the wgmma of A, is done (``_mm`` waits for it)
    kb_s = k_s
    kb_s[...] = _cut(masks and masks.carry((C, K)), q_s[...].astype(_F32)
                     * e).astype(kb_s.dtype)  # q exp(b), carry rows
  else:
    K = q_c.shape[-1]
    a = _intra_weights(q_c, k_p, b_p, qp_s, kb_s)
    a_s[...] = _cut(masks and masks.same, a).astype(a_s.dtype)
    kb_s[...] = _cut(masks and masks.carry((C, K)), _load(q_c) * jnp.exp(
        _load(b_p.at[mid]))).astype(kb_s.dtype)  # q exp(b), carry rows
  plgpu.commit_smem()

  def body(acc_ref):
    plgpu.wgmma(acc_ref, kb_s, st_s.T)  # (q exp(b)) S: [C, K] x [K, BVC]
    plgpu.wgmma(acc_ref, a_s, v_s)  # A v: [C, C] x [C, BVC]
    return acc_ref[...]

  # A and q exp(b) once; then each V block (static: at most 4) in turn, the
  # next block's tiles on their way while this one's result is stored.
  nvb = v_ref.shape[-1] // BVC
  for j in range(nvb):
    plgpu.barrier_wait(bars.at[3])
    plgpu.barrier_wait(bars.at[4])
    o = scale * pl.run_scoped(body, plgpu.ACC(o_s.shape, _F32))
    if j + 1 < nvb:
      plgpu.commit_smem()
      fetch_block(j + 1)
    if j:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_s: last block's
    o_s[...] = o.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_ref.at[ib, rows, ih, pl.ds(j * BVC, BVC)])
  plgpu.wait_smem_to_gmem(0)


def _chunk_scratch(K, V, dtype, head=False):
  """SMEM of the output and dv kernels (same shapes): plain q [C, K], plain
  padded k (input dtype) and b (float32) [PAD + C + PAD, K], swizzled v or do
  [C, BVC], the V block of the chunk's state or state gradient [BVC, K], Q'
  and key-factor tiles [C, K], A [C, C], the result [C, BVC]; BVC =
  ``v_block(V)`` (V itself up to 128), so nothing grows past V = 128.

  One gate per head (``head``): swizzled q and k [C, K] (wgmma operands as
  they come, the key-factor tile afterwards: see the kernels), b a float32
  [2, C] tile (the chunk's row, and its copy for ``_head_decay``), v or do,
  the state block, A and the result as above."""
  bv = _v_block(V)
  if head:
    return [_swizzled((C, K), dtype), _swizzled((C, K), dtype),
            _plain((2, C), _F32), _swizzled((C, bv), dtype),
            _swizzled((bv, K), dtype), _swizzled((C, C), dtype),
            _swizzled((C, bv), dtype)]
  return [_plain((C, K), dtype), _plain((PAD + C + PAD, K), dtype),
          _plain((PAD + C + PAD, K), _F32), _swizzled((C, bv), dtype),
          _swizzled((bv, K), dtype), _swizzled((C, K), dtype),
          _swizzled((C, K), dtype), _swizzled((C, C), dtype),
          _swizzled((C, bv), dtype)]


def _outputs(q, k, v, b, h_in, *, scale, interpret, docs=None):
  """o [B, Tp, H, V] in q's dtype from the chunk states ``h_in``.

  Grid (B, H, N), one chunk per program. A by ``_intra_weights`` (three
  [C, K] x [K, C] pivot wgmmas and the 16-offset log-space loop on [C, 64]
  tiles), once; then for each V block of BVC = ``v_block(V)`` columns (one
  up to V = 128, 4 at V = 512) o = scale ((q exp(b)) S + A v), two wgmmas
  into one [C, BVC] accumulator, the next block's v and S^T tiles fetched
  while this one's result is stored.

  SMEM (``_chunk_scratch``, with the 2 KiB reduction scratch; the same at
  every V >= 128): 194 KiB at K = 128, V >= 128, 118 KiB at K = 64,
  V >= 128, 94 KiB at K = V = 64. Documents
  add the [1, C] doc tile and its barrier (+1 KiB: 195 KiB at K = V = 128);
  A is cut by same, q exp(b) against S by carry (``_DocMasks``).
  Registers: the log-space loop holds A [C, C] (32),
  q and b [C, 64] (64), the two shifted tiles and their product (~96); the
  pivot part b, k and one [C, C] product (~160 at K = 128).

  One gate per head (``b`` [B, H, N, 1, C]): q and k come by TMA into
  swizzled tiles and A = (q k^T) exp(b_t - b_s), s <= t, is one [C, K] x
  [K, C] wgmma and a [C, C] decay (``_head_weights``): no pivots, no
  log-space loop, every exponent <= 0 at any decay. q exp(b_t) goes to k's
  tile once A is formed. SMEM (``_chunk_scratch(..., head=True)``, no
  reduction scratch: nothing is reduced): 105 KiB at K = 128, V >= 128, 73
  KiB at K = 64, V >= 128, 49 KiB at K = V = 64; documents +1 KiB and the
  2 KiB reduction scratch of ``_DocMasks`` (108 KiB at K = V = 128).
  Registers: A and its decay (64), then one [C, K] factor tile (64 at
  K = 128).
  """
  B, Tp, H, K = q.shape
  V = v.shape[-1]
  name = "gla_output_mgpu"
  head = b.ndim == 5
  return plgpu.kernel(
      _with_docs(functools.partial(_output_kernel, scale=scale, head=head), 5,
                 1, docs),
      out_type=jax.ShapeDtypeStruct((B, Tp, H, V), q.dtype),
      scratch_types=[*_chunk_scratch(K, V, q.dtype, head),
                     plgpu.Barrier(num_barriers=KERNELS[name][1]),
                     *_DOC_SCRATCH[name](docs)],
      grid=(B, H, Tp // C), grid_names=("b", "h", "n"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(q, k, v, b, h_in, *_doc_rows(docs))


def forward(q, k, v, g, h0t, *, docs, scale, chunk_size, interpret):
  del chunk_size
  b = _gate_prefix(g)  # per channel, or one row a chunk for head gates
  h_in, h_tt = _state_pass(k, v, b, h0t, reverse=False, scale=1.0,
                           interpret=interpret, docs=docs)
  return _outputs(q, k, v, b, h_in, scale=scale, interpret=interpret,
                  docs=docs), h_tt


# ------------------------------------------------------------- gradients ---


def _dv_kernel(q_ref, k_ref, b_ref, do_ref, dout_ref, dv_ref, *scratch, scale,
               docs, head=False):
  ib, ih, n = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("n")
  rows, mid = pl.ds(n * C, C), pl.ds(PAD, C)
  if head:
    q_s, k_s, b_s, do_s, dst_s, a_s, dv_s, bars = scratch
  else:
    q_c, k_p, b_p, do_s, dst_s, qp_s, kb_s, a_s, dv_s, bars = scratch
  BVC = do_s.shape[-1]  # value columns per V block
  wait_docs = _fetch_docs(docs, ib, n)

  def fetch_block(j):  # V block j: do [C, BVC] and dS^T [BVC, K]
    cols = pl.ds(j * BVC, BVC)
    plgpu.copy_gmem_to_smem(do_ref.at[ib, rows, ih, cols], do_s, bars.at[3])
    plgpu.copy_gmem_to_smem(dout_ref.at[ib, ih, n, cols], dst_s, bars.at[4])

  if head:
    _fetch_head_chunk(q_ref, k_ref, b_ref, q_s, k_s, b_s, bars, ib, ih, n)
  else:
    _fetch_chunk(q_ref, k_ref, b_ref, q_c, k_p, b_p, bars, ib, ih, n)
  fetch_block(0)
  for i in range(3):
    plgpu.barrier_wait(bars.at[i])
  masks = wait_docs and wait_docs()
  if head:  # one gate per head: A by one wgmma; k exp(b_C - b) into q's tile
    K = q_s.shape[-1]
    a = _head_weights(q_s, k_s, b_s)
    a_s[...] = _cut(masks and masks.same, scale * a).astype(a_s.dtype)
    b = _load_col(b_s.at[0])  # [C]
    e = _down(jnp.exp(b_s[0, C - 1] - b), (C, K))  # exp(b_C - b_t)
    # q_s's one reader, the wgmma of A, is done (``_mm`` waits for it)
    kb_s = q_s
    kb_s[...] = _cut(masks and masks.tail((C, K)), k_s[...].astype(_F32)
                     * e).astype(kb_s.dtype)  # k exp(b_C - b), tail rows
  else:
    a = _intra_weights(q_c, k_p, b_p, qp_s, kb_s)
    a_s[...] = _cut(masks and masks.same, scale * a).astype(a_s.dtype)
    K = q_c.shape[-1]
    b_end = _load_row(b_p, PAD + C - 1, (C, K))
    kb_s[...] = _cut(masks and masks.tail((C, K)), _load(k_p.at[mid]) * jnp.exp(
        b_end - _load(b_p.at[mid]))).astype(kb_s.dtype)  # k exp(b_C - b), tail
  plgpu.commit_smem()

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_s.T, do_s)  # scale A^T do: [C, C] x [C, BVC]
    plgpu.wgmma(acc_ref, kb_s, dst_s.T)  # k exp(b_C - b) dS: [C, K] x [K, BVC]
    return acc_ref[...]

  # A and k exp(b_C - b) once; then the V blocks as in ``_output_kernel``.
  nvb = do_ref.shape[-1] // BVC
  for j in range(nvb):
    plgpu.barrier_wait(bars.at[3])
    plgpu.barrier_wait(bars.at[4])
    dv = pl.run_scoped(body, plgpu.ACC(dv_s.shape, _F32))
    if j + 1 < nvb:
      plgpu.commit_smem()
      fetch_block(j + 1)
    if j:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dv_s: last block's
    dv_s[...] = dv.astype(dv_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dv_s, dv_ref.at[ib, rows, ih, pl.ds(j * BVC, BVC)])
  plgpu.wait_smem_to_gmem(0)


def _dqkg_kernel(q_ref, k_ref, b_ref, v_ref, do_ref, hin_ref, dout_ref,
                 dq_ref, dk_ref, dg_ref, *scratch, scale, docs, head=False):
  ib, ih, n, ik = (lax.axis_index(a) for a in ("b", "h", "n", "k"))
  rows, kcols, mid = pl.ds(n * C, C), pl.ds(ik * BK, BK), pl.ds(PAD, C)
  if head:
    q_s, k_s, b_s, v_s, do_s, st_s, dst_s, da_s, parts_s, sum_s, bars = scratch
  else:
    (q_p, k_p, b_p, v_s, do_s, st_s, dst_s, qp_s, kb_s, da_s, dat_s, tri_s,
     parts_s, bars) = scratch
  BVC = v_s.shape[-1]  # value columns per V block
  wait_docs = _fetch_docs(docs, ib, n)

  def fetch_block(j):  # V block j: v, do [C, BVC], S^T and dS^T [BVC, BK]
    cols = pl.ds(j * BVC, BVC)
    for i, (src, dst) in enumerate([
        (v_ref.at[ib, rows, ih, cols], v_s),
        (do_ref.at[ib, rows, ih, cols], do_s),
        (hin_ref.at[ib, ih, n, cols, kcols], st_s),
        (dout_ref.at[ib, ih, n, cols, kcols], dst_s)], start=3):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[i])

  if head:
    _fetch_head_chunk(q_ref, k_ref, b_ref, q_s, k_s, b_s, bars, ib, ih, n,
                      kcols)
  else:
    for i, (src, dst) in enumerate([
        (q_ref.at[ib, rows, ih, kcols], q_p.at[mid]),
        (k_ref.at[ib, rows, ih, kcols], k_p.at[mid]),
        (b_ref.at[ib, rows, ih, kcols], b_p.at[mid])]):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
  fetch_block(0)
  r, c = _iota((C, C), 0), _iota((C, C), 1)
  if not head:
    # While the tiles arrive: the 0/1 matrices of the gate-gradient row sums.
    tri_s[0] = jnp.where(c >= r, 1.0, 0.0).astype(tri_s.dtype)  # u >= t
    tri_s[1] = jnp.where(c < r, 1.0, 0.0).astype(tri_s.dtype)  # s < t
  for i in range(3):
    plgpu.barrier_wait(bars.at[i])
  masks = wait_docs and wait_docs()
  shape = (C, BK)

  # Every term with a V contraction, summed over the V blocks (static: at
  # most 4), the next block's tiles on their way while this one's sums are
  # stored: dA = do v^T and dA^T = v do^T [C, C] (registers), the state terms
  # do S [C, BK] (dq's S-in term) and v dS [C, BK] (dk_state's) in SMEM as
  # bf16 hi / lo pairs in parts_s (16 significant bits, as the gate-gradient
  # sums below, which reuse the tile after these are read), and the
  # ``leaving`` column sums of S o dS [BK]. (One gate per head: no dA^T, the
  # wgmma for dk reads dA's tile transposed.)
  nvb = v_ref.shape[-1] // BVC
  da = dat = leaving = None
  for j in range(nvb):
    for i in range(3, 7):
      plgpu.barrier_wait(bars.at[i])
    for i, (x_s, y_s) in enumerate([(do_s, st_s), (v_s, dst_s)]):
      x = _mm(x_s, y_s, shape)  # [C, BVC] x [BVC, BK]
      if j:
        x = x + parts_s[2 * i].astype(_F32) + parts_s[2 * i + 1].astype(_F32)
      hi = x.astype(parts_s.dtype)
      parts_s[2 * i] = hi
      parts_s[2 * i + 1] = (x - hi.astype(_F32)).astype(parts_s.dtype)
    leaving = _plus(leaving, jnp.sum(
        st_s[...].astype(_F32) * dst_s[...].astype(_F32), axis=0))
    da = _plus(da, _mm(do_s, v_s.T, (C, C)))  # [C, BVC] x [BVC, C]
    if not head:
      dat = _plus(dat, _mm(v_s, do_s.T, (C, C)))
    if j + 1 < nvb:
      plgpu.commit_smem()  # this block's reads come before the next TMA
      fetch_block(j + 1)

  # dA_ts = scale do_t . v_s [t, s], and its transpose [s, t] for dk; with
  # documents only within one (same is symmetric), which carries through
  # every dA term below (the t = s terms are always kept).
  da = _cut(masks and masks.same, scale * da)
  if not head:
    dat = _cut(masks and masks.same, scale * dat)
  da_tt = jnp.sum(jnp.where(r == c, da, 0.0), axis=1)  # [C]: the t = s terms
  if head:
    dq, dk, dg = _head_dqkg(q_s, k_s, b_s, da_s, parts_s, sum_s, da, da_tt,
                            leaving, masks, scale=scale)
    # Out through tiles no longer read: dq and dk by q's and k's tiles,
    # d log_g by the last row of the sums' tile.
    q_s[...] = dq.astype(q_s.dtype)
    k_s[...] = dk.astype(k_s.dtype)
    sum_s[2, :] = dg
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s, dq_ref.at[ib, rows, ih, kcols])
    plgpu.copy_smem_to_gmem(k_s, dk_ref.at[ib, rows, ih, kcols])
    plgpu.copy_smem_to_gmem(sum_s.at[pl.ds(2, 1)], dg_ref.at[ib, ih, ik, n])
    plgpu.wait_smem_to_gmem(0)
    return  # at trace time: the head form ends here (no early exit on device)

  # Below the sub-chunk diagonal, by the pivots of ``_intra_weights``:
  # dq_t = exp(b_t - r_i) sum_{s < 16 i} dA_ts K_i[s]       (t in sub-chunk i)
  # dk_s = sum_i K_i-factor_s sum_{t in sub-chunk i} dA_ts Q'_t
  q, k, b = _load(q_p.at[mid]), _load(k_p.at[mid]), _load(b_p.at[mid])
  blk = _block_of_rows(shape)
  r_own, rs = _pivots(b_p, shape)
  q_fac = jnp.exp(b - r_own)
  qp_s[...] = (q * q_fac).astype(qp_s.dtype)
  da_s[...] = jnp.where(c < SUB * lax.div(r, SUB), da, 0.0).astype(da_s.dtype)
  dq = jnp.zeros(shape, _F32)
  dk = jnp.zeros(shape, _F32)
  row = _iota(shape, 0)
  for i, r_i in enumerate(rs, start=1):
    k_fac = jnp.where(row < SUB * i, jnp.exp(jnp.minimum(r_i - b, 0.0)), 0.0)
    kb_s[...] = (k * k_fac).astype(kb_s.dtype)
    dat_s[...] = jnp.where((lax.div(c, SUB) == i) & (r < SUB * i), dat,
                           0.0).astype(dat_s.dtype)
    plgpu.commit_smem()
    dq = jnp.where(blk == i, _mm(da_s, kb_s, shape), dq)
    dk = dk + k_fac * _mm(dat_s, qp_s, shape)
  dq = dq * q_fac + _diag_grad(da, k_p, b_p, b, down=True)
  dk = dk + _diag_grad(dat, q_p, b_p, b, down=False)

  b_end = _load_row(b_p, PAD + C - 1, shape)
  # Through S in (carry rows read it) and S out (tail rows write it): the
  # V-block sums do S and v dS from their hi / lo parts.
  do_st, v_dst = (parts_s[2 * i].astype(_F32) + parts_s[2 * i + 1].astype(_F32)
                  for i in range(2))
  dq = dq + _cut(masks and masks.carry(shape), scale * do_st * jnp.exp(b))
  dk_state = _cut(masks and masks.tail(shape), v_dst * jnp.exp(b_end - b))

  # d log_g_t = sum_{u >= t} (q_u dq_u - k_u dk_u) + sum_{s < t} k_s dk_state_s
  #             + exp(b_C) sum_v S dS
  # (``chunk_tiles.chunk_grads``; dq, dk still without their t = s terms, which
  # cancel exactly). Both row sums by wgmma against the 0/1 matrices, each
  # summand split into two bf16 parts: hi + lo carry 16 significant bits, so
  # the sums are good to about 2^-17 relative.
  for j, x in enumerate((q * dq - k * dk, k * dk_state)):
    hi = x.astype(parts_s.dtype)
    parts_s[2 * j] = hi
    parts_s[2 * j + 1] = (x - hi.astype(_F32)).astype(parts_s.dtype)
  plgpu.commit_smem()

  def sums(acc_ref):
    for j in range(4):
      plgpu.wgmma(acc_ref, tri_s.at[j // 2], parts_s.at[j])
    return acc_ref[...]

  dg = pl.run_scoped(sums, plgpu.ACC(shape, _F32))
  dg = dg + _cut(masks and masks.carry_out(shape), jnp.exp(b_end)
                 * lax.broadcast_in_dim(leaving, shape, [1]))  # S's decay
  tt = lax.broadcast_in_dim(da_tt, shape, [0])
  dq = dq + tt * k
  dk = dk + dk_state + tt * q
  # Out through tiles no longer read: dq and dk by the two operand tiles,
  # d log_g by the gate tile.
  qp_s[...] = dq.astype(qp_s.dtype)
  kb_s[...] = dk.astype(kb_s.dtype)
  b_p[mid] = dg
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(qp_s, dq_ref.at[ib, rows, ih, kcols])
  plgpu.copy_smem_to_gmem(kb_s, dk_ref.at[ib, rows, ih, kcols])
  plgpu.copy_smem_to_gmem(b_p.at[mid], dg_ref.at[ib, rows, ih, kcols])
  plgpu.wait_smem_to_gmem(0)


def _plus(acc, x):
  """acc + x, or x for the first V block (acc None)."""
  return x if acc is None else acc + x


def _head_dqkg(q_s, k_s, b_s, da_s, parts_s, sum_s, da, da_tt, leaving, masks,
               *, scale):
  """dq, dk [C, BK] and this key block's share of d log_g [C] (a ``_COL``
  vector) for one gate per head, after ``_dqkg_kernel``'s V sums: ``da``
  [C, C] (scaled, cut), ``da_tt`` its diagonal, ``leaving`` [BK] the column
  sums of S o dS, the state terms do S and v dS in ``parts_s`` (hi / lo).

  With W_ts = exp(b_t - b_s) for s < t (``_head_decay``, a [C, C] tile: no
  pivots, every exponent <= 0), the s < t parts are two wgmmas of one tile
  dA o W (rounded to the input dtype, as the per-channel pivot products
  round dA):
    dq_t = sum_{s < t} dA_ts W_ts k_s          ([C, C] x [C, BK])
    dk_s = sum_{t > s} dA_ts W_ts q_t          ((dA o W)^T by wgmma's
                                                transposed operand)
  then the state terms with exp(b_t) and exp(b_C - b_t) one factor per token.
  d log_g is ``chunk_tiles.finish_grads``' per-channel sum, summed over the
  key columns (the chain rule through a broadcast over K) before its sums
  over tokens:
    d log_g_t = sum_{u >= t} y_u + sum_{s < t} z_s + exp(b_C) sum_k leaving_k
    y = sum_k (q dq - k dk) (t = s terms excluded; they cancel exactly),
    z = sum_k k dk_state,
  y and z by float32 row sums, stored as rows of ``sum_s`` and read back
  along the columns of a [C, C] tile for the sums over tokens (float32, no
  bf16 split: the sums are of [C] vectors, not [C, BK] tiles).
  """
  shape = (C, BK)
  r, c = _iota((C, C), 0), _iota((C, C), 1)
  da_s[...] = (da * _head_decay(b_s, strict=True)).astype(da_s.dtype)
  plgpu.commit_smem()
  dq = _mm(da_s, k_s, shape)  # [C, C] x [C, BK]
  dk = _mm(da_s.T, q_s, shape)  # [C, C]^T x [C, BK]
  q, k = q_s[...].astype(_F32), k_s[...].astype(_F32)  # [C, BK]
  b = _load_col(b_s.at[0])  # [C]
  b_end = b_s[0, C - 1]  # b_C, a scalar
  do_st, v_dst = (parts_s[2 * i].astype(_F32) + parts_s[2 * i + 1].astype(_F32)
                  for i in range(2))
  dq = dq + _cut(masks and masks.carry(shape),
                 scale * do_st * _down(jnp.exp(b), shape))
  dk_state = _cut(masks and masks.tail(shape),
                  v_dst * _down(jnp.exp(b_end - b), shape))
  sum_s[0, :] = jnp.sum(q * dq - k * dk, axis=1)  # y [C]
  sum_s[1, :] = jnp.sum(k * dk_state, axis=1)  # z [C]
  # [t, u]: y_u for u >= t, z_u for u < t; plus (BK = C columns) the leaving
  # term exp(b_C) leaving_k, the same in every row: one row sum for all three.
  tile = jnp.where(c >= r, _load_row(sum_s, 0, (C, C)),
                   _load_row(sum_s, 1, (C, C)))
  tile = tile + _cut(masks and masks.carry_out((C, C)), jnp.exp(b_end)
                     * lax.broadcast_in_dim(leaving, (C, C), [1]))
  dg = jnp.sum(tile, axis=1)  # [C]
  tt = _down(da_tt, shape)
  return dq + tt * k, dk + dk_state + tt * q, dg


def _diag_grad(w, x_p, b_p, b, *, down):
  """The diagonal 16 x 16 blocks' part of dq (``down``) or of dk, offset by
  offset in log space as in ``_diag_blocks``, for pairs inside one sub-chunk:

    dq_t += sum_{d >= 1} dA[t, t-d] k_(t-d) exp(b_t - b_(t-d))   (w = dA,
                                                       x = k read d rows up)
    dk_s += sum_{d >= 1} dA[s+d, s] q_(s+d) exp(b_(s+d) - b_s)   (w = dA^T,
                                                       x = q read d rows down)

  ``w`` [C, C]; ``x_p``, ``b_p`` plain padded [PAD + C + PAD, BK] refs; ``b``
  the chunk's gate prefix [C, BK]. Returns [C, BK] float32.
  """
  shape = (C, BK)
  row_cc, col_cc = _iota((C, C), 0), _iota((C, C), 1)
  in_sub = lax.rem(_iota(shape, 0), SUB)

  def offset(d, acc):
    if down:
      at, ok, pair = PAD - d, in_sub >= d, col_cc == row_cc - d
    else:
      at, ok, pair = PAD + d, in_sub + d < SUB, col_cc == row_cc + d
    x_d = _load(x_p.at[pl.ds(at, C)])  # [C, BK]
    b_d = _load(b_p.at[pl.ds(at, C)])
    expo = (b - b_d) if down else (b_d - b)
    w_d = jnp.sum(jnp.where(pair, w, 0.0), axis=1)  # [C]: one diagonal of w
    f = jnp.where(ok, x_d * jnp.exp(jnp.where(ok, expo, 0.0)), 0.0)
    return acc + lax.broadcast_in_dim(w_d, shape, [0]) * f

  return lax.fori_loop(1, SUB, offset, jnp.zeros(shape, _F32))


def _dqkg_scratch(K, V, dtype, head=False):
  """Plain padded q, k (input dtype) and b (float32) [PAD + C + PAD, BK],
  swizzled v and do [C, BVC], the V block of the chunk's state and state
  gradient [BVC, BK] (BVC = ``v_block(V)``), Q' and key-factor tiles [C, BK]
  (reused for dq and dk out), dA and dA^T operand tiles [C, C], the two bf16
  0/1 matrices [2, C, C], the bf16 hi / lo parts of the two state terms' V
  sums, then of the two gate-gradient summands [4, C, BK].

  One gate per head (``head``): swizzled q and k [C, BK] (wgmma operands,
  then dq and dk out), b a float32 [2, C] tile (as ``_chunk_scratch``'s),
  v, do and the state blocks as above, one dA o W operand tile [C, C], the
  hi / lo parts of the two state terms [4, C, BK], and a float32 [3, C]
  tile for the two per-token sums of d log_g and its row out
  (``_head_dqkg``)."""
  del K
  padded = (PAD + C + PAD, BK)
  bv = _v_block(V)
  if head:
    return [_swizzled((C, BK), dtype), _swizzled((C, BK), dtype),
            _plain((2, C), _F32), _swizzled((C, bv), dtype),
            _swizzled((C, bv), dtype), _swizzled((bv, BK), dtype),
            _swizzled((bv, BK), dtype), _swizzled((C, C), dtype),
            _swizzled((4, C, BK), jnp.bfloat16), _plain((3, C), _F32)]
  return [_plain(padded, dtype), _plain(padded, dtype), _plain(padded, _F32),
          _swizzled((C, bv), dtype), _swizzled((C, bv), dtype),
          _swizzled((bv, BK), dtype), _swizzled((bv, BK), dtype),
          _swizzled((C, BK), dtype), _swizzled((C, BK), dtype),
          _swizzled((C, C), dtype), _swizzled((C, C), dtype),
          _swizzled((2, C, C), jnp.bfloat16),
          _swizzled((4, C, BK), jnp.bfloat16)]


def _dv(q, k, b, do, dh_out, *, scale, interpret, docs=None):
  B, Tp, H, K = q.shape
  V = do.shape[-1]
  name = "gla_dv_mgpu"
  head = b.ndim == 5
  return plgpu.kernel(
      _with_docs(functools.partial(_dv_kernel, scale=scale, head=head), 5, 1,
                 docs),
      out_type=jax.ShapeDtypeStruct(do.shape, do.dtype),
      scratch_types=[*_chunk_scratch(K, V, q.dtype, head),
                     plgpu.Barrier(num_barriers=KERNELS[name][1]),
                     *_DOC_SCRATCH[name](docs)],
      grid=(B, H, Tp // C), grid_names=("b", "h", "n"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(q, k, b, do, dh_out, *_doc_rows(docs))


def _dqkg(q, k, b, v, do, h_in, dh_out, *, scale, interpret, docs=None):
  """dq, dk [B, Tp, H, K] and d log_g: per channel float32 [B, Tp, H, K]; for
  one gate per head (``b`` [B, H, N, 1, C]) each key block's share, float32
  [B, H, K / BK, N, 1, C] (a [1, C] row per program), summed by ``grads``."""
  B, Tp, H, K = q.shape
  V = v.shape[-1]
  name = "gla_dqkg_mgpu"
  head = b.ndim == 5
  dg_shape = (B, H, K // BK, *b.shape[2:]) if head else q.shape
  return plgpu.kernel(
      _with_docs(functools.partial(_dqkg_kernel, scale=scale, head=head), 7,
                 3, docs),
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct(k.shape, k.dtype),
                jax.ShapeDtypeStruct(dg_shape, _F32)),
      scratch_types=[*_dqkg_scratch(K, V, q.dtype, head),
                     plgpu.Barrier(num_barriers=KERNELS[name][1]),
                     *_DOC_SCRATCH[name](docs)],
      grid=(B, H, Tp // C, K // BK), grid_names=("b", "h", "n", "k"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(q, k, b, v, do, h_in, dh_out, *_doc_rows(docs))


def grads(q, k, v, g, do, h_in, dh_out, *, docs, scale, chunk_size, interpret):
  """dq, dk, dv (input dtypes) and d log_g (float32), [B, Tp, H, D].

  gla_dv_mgpu, grid (B, H, N): A by ``_intra_weights`` as in the forward, then
  per V block of BVC columns dv = scale A^T do + (k exp(b_C - b)) dS, two
  wgmmas ([C, C]^T x [C, BVC] and [C, K] x [K, BVC]) into one accumulator.
  SMEM and registers as ``_outputs`` (``_chunk_scratch``: 194 KiB at K =
  128, V >= 128).

  gla_dqkg_mgpu, grid (B, H, N, K / BK), BK = 64: one chunk and 64 key
  columns per program (dq, dk and d log_g are per key channel given dA, which
  each of the K / BK programs recomputes). First the V contractions, summed
  over the V blocks of BVC columns: dA and dA^T (two [C, BVC] x [BVC, C]
  wgmmas per block, in registers), the state terms do S and v dS (two
  [C, BVC] x [BVC, BK] wgmmas per block, kept as bf16 hi / lo pairs in the
  gate-sum tile) and the ``leaving`` sums. Then dq and
  dk below the sub-chunk diagonal by three pairs of pivot wgmmas, the
  diagonal blocks by two 15-offset log-space loops (``_diag_grad``), the
  gate-gradient row sums by
  four [C, C] x [C, BK] wgmmas (``_dqkg_kernel``). SMEM
  (``_dqkg_scratch``; the same at every V >= 128): 194 KiB at V >= 128,
  162 KiB at V = 64. Registers: dA
  and dA^T (64) live through the loops, with q, k, b, dq, dk [C, 64]
  (160): about 250 at the peak, near the 255 ceiling, so ptxas may spill
  there; the V-block loop before them holds dA, dA^T and one [C, BK]
  product (~100).

  Documents: both kernels take the chunk's [1, C] doc row (+1 KiB and a
  barrier: 195 KiB at V = 128). gla_dv_mgpu cuts A by same and the rows of
  k exp(b_C - b) by tail; gla_dqkg_mgpu cuts dA and dA^T by same, dq's S-in
  term by carry, dk_state by tail and the ``leaving`` term by carry_out
  (``_DocMasks``; each mask's registers, a [C, C] or [C, 64] bool tile, live
  only where it is applied).

  One gate per head (g [B, Tp, H, 1]; b one [1, C] row a chunk): gla_dv_mgpu
  as ``_outputs``' head form (A by ``_head_weights``, k exp(b_C - b) into
  q's tile): 105 KiB at K = 128, V >= 128 (108 KiB with documents).
  gla_dqkg_mgpu reads q and k straight into swizzled tiles and forms dq and
  dk below the diagonal by two wgmmas of one dA o W tile, no dA^T, no pivots
  and no log-space loops; its d log_g is the per-token sum over the
  program's key columns (``_head_dqkg``), one [1, C] row per program, and
  the K / BK rows of a chunk add up here ([B, Tp, H] sized, as Triton's).
  SMEM (``_dqkg_scratch(..., head=True)``, with the reduction scratch):
  124 KiB at V >= 128, 92 KiB at V = 64; documents +1 KiB. Registers: dA
  (32) through the V loop with one [C, BK] product; then dA o W, q, k, dq,
  dk and the state terms [C, 64] (~200 at the peak, below the per-channel
  form's ~250).
  """
  del chunk_size
  b = _gate_prefix(g)  # per channel, or one row a chunk for head gates
  dv = _dv(q, k, b, do, dh_out, scale=scale, interpret=interpret, docs=docs)
  dq, dk, dg = _dqkg(q, k, b, v, do, h_in, dh_out, scale=scale,
                     interpret=interpret, docs=docs)
  if _is_head(g):  # [B, H, K / BK, N, 1, C] shares -> [B, Tp, H, 1]
    B, Tp, H, _ = g.shape
    dg = jnp.swapaxes(jnp.sum(dg, axis=2).reshape(B, H, Tp), 1, 2)[..., None]
  return dq, dk, dv, dg


# ------------------------------------------------------------ SMEM sizes ---

# name -> (scratch shapes fn(K, V, dtype, head), barriers, has cross-warp
# reductions (per-channel form, head-gate form)): the head forms of output
# and dv reduce nothing (their A needs no log-space loop), dqkg's does (its
# row sums), the state passes neither form.
KERNELS = {
    "gla_states_mgpu": (_state_pass_scratch, 7, (False, False)),
    "gla_dstates_mgpu": (_state_pass_scratch, 7, (False, False)),
    "gla_output_mgpu": (_chunk_scratch, 5, (True, False)),
    "gla_dv_mgpu": (_chunk_scratch, 5, (True, False)),
    "gla_dqkg_mgpu": (_dqkg_scratch, 7, (True, True)),
}


# name -> the extra scratch of its documents form (the doc tile, [1, C] or
# double-buffered [2, 1, C] float32, and one barrier per buffer) from the
# launcher's ``docs``; nothing without documents.
_DOC_SCRATCH = {
    name: functools.partial(
        lambda docs, n: [] if docs is None else _doc_scratch(n),
        n=2 if name in ("gla_states_mgpu", "gla_dstates_mgpu") else 1)
    for name in KERNELS}


def smem_bytes(name: str, K: int, V: int, dtype, docs: bool = False,
               head: bool = False) -> int:
  """Dynamic SMEM of kernel ``name`` at padded head dims K, V: its scratch
  tiles, each aligned to 1 KiB as Pallas allocates them, its barriers, and the
  reduction scratch of ``_PARAMS`` for kernels that reduce across warps;
  ``docs``: in its packed-documents form (``_DOC_SCRATCH``: +1 KiB and a
  barrier for the chunk kernels; +1 KiB, two barriers and, as ``_DocMasks``
  reduces, the 2 KiB reduction scratch for the state passes, and for the
  head-gate forms of output and dv); ``head``: in its head-gate form (one
  gate per head, a [1, C] gate row a chunk)."""
  scratch, barriers, reduces = KERNELS[name]
  extra = _DOC_SCRATCH[name](() if docs else None)
  reduces = reduces[head]
  shapes = [*scratch(K, V, dtype, head),
            *(s for s in extra if not isinstance(s, plgpu.Barrier))]
  barriers += sum(math.prod(s.num_barriers) for s in extra
                  if isinstance(s, plgpu.Barrier))
  # any jnp.sum in a kernel allocates the reduction scratch
  return mosaic_gpu.scratch_bytes(shapes, barriers, reduces or docs)


# ------------------------------------------------------------------- op ---

_core = pallas_vjp.make_gla(forward=forward, states=states, dstates=dstates,
                            grads=grads)


def gla(q, k, v, log_g, *, h0, scale: float, chunk_size: int = 64,
        interpret=False, resets=None):
  """Mosaic GPU GLA. Arguments as in ``lsm.ops.gla.gla``, with ``log_g``
  float32 [B, T, H, K] or [B, T, H] and ``h0`` float32 [B, H, K, V].

  Args:
    q, k: [B, T, H, K], bfloat16 or float16.
    v: [B, T, H, V], q's dtype.
    log_g: float32 log forget gates, [B, T, H, K] per key channel or
      [B, T, H] one per head (read as they are: the kernels' head-gate forms
      take a [1, C] row of gate sums per chunk, never a K-wide copy).
    h0: float32 [B, H, K, V] initial state.
    scale: query scale.
    chunk_size: must be 64 (one wgmma tile of tokens).
    interpret: False (compile for the GPU), True or a
      ``plgpu.InterpretGPUParams`` (the Mosaic GPU interpreter, any platform).
    resets: None, or bool [B, T] ``segments.resets(segment_ids)`` (packed
      documents; the kernels' masks are those of ``_DocMasks``).

  Returns:
    o: [B, T, H, V] in q's dtype; h_T: [B, H, K, V] float32.

  Raises:
    ValueError: float32 inputs, chunk_size != 64, K over 128 or V over
      512.
  """
  K, V = q.shape[-1], v.shape[-1]
  mosaic_gpu.check_inputs("gla: impl='pallas_mosaic_gpu'", q.dtype, chunk_size,
                          K, V)
  Kp, Vp = _padded(K), _padded(V)
  pad = functools.partial(kernel_shapes.pad_axis, axis=3)
  h0 = kernel_shapes.pad_axis(kernel_shapes.pad_axis(h0, 2, Kp), 3, Vp)
  g = log_g if log_g.ndim == 3 else pad(log_g, size=Kp)
  o, h_t = _core(pad(q, size=Kp), pad(k, size=Kp), pad(v, size=Vp),
                 g, h0=h0, scale=scale, chunk_size=C,
                 interpret=_interpret_params(interpret), resets=resets)
  return o[..., :V], h_t[:, :, :K, :V]
