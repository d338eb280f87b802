r"""The (gated) delta rule as Pallas kernels for GPUs (Triton lowering).

The recurrence is defined in ``reference.py``, the chunkwise UT / WY form in
``chunked.py`` and the per-chunk tile math in ``chunk_tiles.py`` (shared with
``pallas_tpu.py``); the padding, layout and custom VJP are ``pallas_vjp.py``.
The organisation follows flash-linear-attention: a sequential pass produces the
state entering every chunk, then chunk-parallel passes use it.

Kernels (BH = batch x heads, N chunks of C tokens; the value dim is split into
NV blocks of BV columns (``BV``, per kernel: 16 or 32) and the key dim into NK
blocks of BK = 64; warps per kernel in ``NUM_WARPS``, 8 but _wy_scalars' 4):

  _prepare       grid (BH, N): the chunk's T = (I + L)^{-1} [C, C] float32,
                 stored as t [BH, N C, C], built from 16 x 16 blocks.
  _states        grid (BH, NV); a ``fori_loop`` over the N chunks carries the
                 state as NK [BK, BV] float32 blocks, stores the state entering
                 each chunk (h_in [BH, N Kp, Vp]) and the final state.
  _output        grid (BH, N, NV): o of one chunk from h_in, loading each
                 key and state block where it is used (``_chunk_output``
                 takes loaders: at K = 256 float32 all of q's and k's [C, BK]
                 blocks live at once took 180 KiB of shared memory, over an
                 A100's 163 KiB); float32 inputs: ``_output_f32``, below.
  The backward's ``state_grads`` is two kernels:
  _intra         grid (BH, N, NV): P = (M o Q K^T)^T (scale dO) [BH, NC, Vp]
                 float32, the part of dU that does not depend on the carry.
  _state_grads   grid (BH, NV); the reverse loop: stores the cotangent of the
                 state leaving each chunk (dh_out) and returns dh0. It loads
                 P, T, K, Q and dO where each is used (``_state_grad`` takes
                 loaders), so no [C, C] product and few tiles are live at once;
                 float32 inputs: ``_state_grad_f32``, below.
  The backward's ``input_grads`` is four chunk-parallel kernels:
  _value_grads   grid (BH, N, NV): recomputes U = T X and its cotangent dU,
                 stores U and T^T dU (float32 [BH, NC, Vp]) with dv, and this
                 block's shares of dbeta, dc (c below), dT = dU X^T and
                 d(M o Q K^T) = scale dO U^T. Key and state blocks are
                 loaded per use as in _output (172 KiB at K = 256 float32
                 with the key blocks kept).
  _key_grads     grid (BH, N, NK), a loop over the NV value blocks: the state
                 parts of dq and dk (through S, dS' and X) and their share of
                 d log_g, for one key block.
  _wy_scalars    grid (BH, N): from dL (below) and d(M o Q K^T), the rest of
                 dbeta and d log_g.
  _wy_grads      grid (BH, N, NK): from dL and d(M o Q K^T), the intra-chunk
                 parts of dq and dk for one key block (split from _wy_scalars:
                 together they spilled 600-744 B on sm_90a).
  Between _value_grads and _wy_scalars / _wy_grads, XLA sums the per-block shares and applies
  the closed-form VJP of the inverse, dL = -T^T dT T^T (strict lower triangle,
  HIGHEST, batched over chunks: 2 C^3 FLOPs per chunk, and a [BH, NC, C]
  float32 dT and dL through memory). Inside a kernel those two [C, C] x [C, C]
  IEEE float32 products were FMA dots whose operand fragments alone overflowed
  the registers.

U is formed as T X with X = diag(beta) V - diag(c) (K S), c = beta exp(gamma):
``chunk_tiles``' U = T diag(beta) V - W_k S with W_k = T diag(c) K,
reassociated (W_k S = T (diag(c) (K S))), so no kernel forms W_k: one [C, C] x
[C, BV] product with T instead of NK [C, C] x [C, BK] ones, and no [C, BK]
float32 operand of a product with T. Likewise W_k^T dU = (diag(c) K)^T (T^T
dU), and the W_k part of dT is folded into dT = dU X^T.

Why this shape (registers and shared memory; measured with ptxas for sm_80 and
sm_90a at K = V = 128, C = 64, bf16): a Triton dot holds its operand fragments
for the whole contraction in registers, so no dot contracts or produces more
than 64 key or value columns, and float32 [C, K] tiles at K = 128 are never
held in one piece. The inverse's matmuls run at IEEE float32 (FMA, not tensor
cores), whose operand fragments are larger still, so the prepare kernel works
on 16 x 16 blocks: L's blocks below the diagonal, forward substitution inside
each diagonal block (``chunk_tiles.unit_lower_inverse``), then block forward
substitution T_ij = -T_ii sum_{j <= m < i} L_im T_mj for the blocks below the
diagonal (C = 64: 16 products of 16 x 16 tiles instead of 15 substitution
steps and 4 merge products of 64 x 64 tiles, so about 20 times fewer inverse
FLOPs). The backward is written by hand, not ``jax.vjp`` of the tile math in
one kernel, whose live set (every forward tile of the chunk plus every
cotangent) could not stay on chip: split four ways, each kernel holds a few
[C, 64] and [C, C] tiles at a time. Q K^T and K K^T take their operands in the
input dtype (see ``_qk``), halving those fragments for bf16.

float32 inputs (IEEE FMA dots, no tensor cores): an FMA dot's operand
fragments span its whole contraction, so [C, C] and [C, 64] float32 products
that contract 64 keys or tokens made ptxas fall back to 32 registers (10-45 KB
of spills) in _wy_scalars, _wy_grads and, at K = 128, _prepare and _output.
Their float32 path contracts F32_DOT = 16 columns per dot and sums the
products: Q K^T and K K^T over 16-wide key blocks (``_qk_from``; _prepare's
Gram blocks in a loop over the key columns), and _wy_grads over 16-token blocks
of dL and d(M o Q K^T), with M's blocks formed per use (``_gate_block``).
_output and _state_grads have float32 bodies (``_output_f32``,
``_state_grad_f32``) in which every product contracts 16 keys or SUB = 16
tokens: the [C, BV] intermediates X, U, dU and T^T dU (and M o Q K^T's column
blocks) are cut into 16-token blocks with ``jnp.split``, the carried [BK, BV]
state blocks into 16-row pieces, and _state_grads' key-block loops pick their
carried block by selects (``_pick``), so each block's keys and queries load
inside a loop (unrolled, ptxas fell back to 32 registers on sm_90a). At K = 256
that took _output from about 4 KB of spills (at 128 registers) to none and
_state_grads from 1.4-1.9 KB to none, on sm_80 and sm_90a. _wy_scalars runs 8
warps in float32 (``NUM_WARPS_F32``). 16-bit inputs keep the paths above
unchanged.

Cost of the split, per token and head at K = V = 128 (float32 intermediates):
U, T^T dU and the state parts of dq and dk go through memory (4 (2 V + 2 K) =
2 KiB written, about 3 KiB read), and the per-value-block shares of dT and
d(M o Q K^T) (2 NV C floats each, NV = V / 16 in _value_grads; their sums
dL and d(M o Q K^T) are read by both _wy_scalars and _wy_grads). FLOPs drop: the [C, C] x [C, K] work on the
key side and the inverse's VJP run once per chunk instead of once per value
block.

Recompute vs store: T is computed once per chunk by _prepare and loaded by the
other kernels ([C, C] float32, 16 KiB per chunk at C = 64) instead of being
recomputed in each of them for each value block. _state_grads' loop loads P
from _intra (V float32 per token) instead of recomputing M o Q K^T in each
chunk's step. K S and the decay factors are
recomputed where used (one [C, K] x [K, BV] matmul and elementwise work). The
backward recomputes T and h_in (see ``pallas_vjp``).

Numerics: matmuls on data run as ``tiles.precision_for(q.dtype)`` says: IEEE
float32 for float32 inputs; for bf16/f16 inputs their operands enter in that
dtype with float32 accumulation (loaded q, k, v, do as they are; float32
factors such as T, X, U, dU, the states and the decayed keys rounded to it
where they enter, as flash-linear-attention does; about 0.3% relative RMS
error against the 1e-2 bf16 rows). The query scale goes on float32 values,
never on a loaded 16-bit tile. The inverse itself (``_inverse_blocks``'
substitution) and its VJP stay at IEEE float32, as in ``chunk_tiles``: every
matmul here is one of ``chunk_tiles``'s with its contraction split into key or
value blocks, reassociated as above (the intermediates K S and T^T dU take the
rounding W_k and W_k^T dU took), or the VJP of one at the same precision. Every exponent of a decay is <= 0.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lsm.ops.common import segments, tiles
from lsm.ops.delta_rule import chunk_tiles, pallas_vjp
from lsm.ops.common import kernel_shapes

# What the kernels take (lsm.ops._dispatch reads it for impl= and "auto").
ACCEPTS = kernel_shapes.TRITON

_F32 = jnp.float32
# Value columns per tile / program, per kernel (state_grads' also _intra's):
# 32 halves the loop kernels' carried state blocks and every [C, BV] tile next
# to 64; 16 in _states, _state_grads and _value_grads removes their last sm_90a
# spills at K = V = 128 (44, 76 and 220 B at 32), at twice the programs (and,
# in _value_grads, twice the per-block dT and d(M o Q K^T) shares). _output at
# 16 too since its operands went 16-bit: at K = 256 it spilled 1336 B on sm_80
# with 32 columns, 816 B with 16 (none on sm_90a either way).
BV = dict(states=16, output=16, state_grads=16, value_grads=16, key_grads=32)
BK = 64  # key columns per tile: bounds every dot's operand fragments
# Contraction width of the float32 (IEEE, FMA) dots that _qk and _wy_grads
# split: an FMA dot holds each thread's operand rows or columns over the whole
# contraction, so 64-wide float32 contractions with [C, C] or [C, 64] results
# made ptxas fall back to 32 registers (10-45 KB of spills) in _wy_scalars,
# _wy_grads and, at K = 128, _prepare and _output. 16-bit operands (tensor
# cores) keep BK and one dot per block.
F32_DOT = 16
SUB = chunk_tiles.SUB  # rows of the inverse's blocks
NUM_STAGES = 1  # the sequential loops load one chunk at a time
# Warps per kernel: 8 measured best but in _wy_scalars (fewest spills on
# sm_90a at K = V = 128; 4 warps spill more in every other kernel but _output
# on sm_80, and make ptxas fall back to 32 registers in _key_grads on sm_80).
# _wy_scalars at 4: no sm_90a spills (12-20 B at 8), 144 B on sm_80 at K = 128.
NUM_WARPS = dict(prepare=8, intra=8, states=8, output=8, state_grads=8,
                 value_grads=8, key_grads=8, wy_scalars=4, wy_grads=8)


# float32 overrides: _wy_scalars' float32 (FMA) dots spilled 524-844 B with 4
# warps, none with 8 (K = V = 64 and 128, sm_80 and sm_90a).
NUM_WARPS_F32 = dict(wy_scalars=8)


def _params(kernel, dtype=None):
  warps = NUM_WARPS[kernel]
  if dtype is not None and jnp.dtype(dtype) == jnp.dtype(_F32):
    warps = NUM_WARPS_F32.get(kernel, warps)
  return plgpu.CompilerParams(num_warps=warps, num_stages=NUM_STAGES)


def _rows(ref, rows):
  """Rows ``rows`` (a ``pl.ds``) of a 2-D ref, as float32."""
  return ref[rows, :].astype(_F32)


def _key_blocks(ref, rows=slice(None), dtype=None):
  """Rows ``rows`` of a [*, Kp] ref as [rows, BK] column blocks of ``dtype``
  (None: the ref's own dtype, which matmuls take as it is and elementwise math
  with float32 factors promotes)."""
  Kp = ref.shape[-1]
  bk = min(BK, Kp)
  blocks = [ref[rows, pl.ds(i * bk, bk)] for i in range(Kp // bk)]
  return blocks if dtype is None else [b.astype(dtype) for b in blocks]


def _state_blocks(ref, row0=0, Kp=None, cols=slice(None)):
  """The [Kp, *] state starting at row ``row0`` of ``ref`` as [BK, *] row
  blocks."""
  Kp = ref.shape[0] if Kp is None else Kp
  bk = min(BK, Kp)
  return [ref[pl.ds(row0 + i * bk, bk), cols].astype(_F32)
          for i in range(Kp // bk)]


def _is_f32(precision):
  """Whether a kernel's data matmuls take float32 operands (IEEE, FMA)."""
  return (isinstance(precision, tiles.Matmuls)
          and precision.dtype == jnp.dtype(_F32))


def _key_block(ref, rows=slice(None), dtype=None, width=BK):
  """Loader of column block i of rows ``rows`` of a [*, Kp] ref (``_key_blocks``'
  block i, of ``width`` columns), and the number of blocks: for kernels that
  load each block where it is used instead of keeping all of them live."""
  bk = min(width, ref.shape[-1])

  def load(i):
    b = ref[rows, pl.ds(i * bk, bk)]
    return b if dtype is None else b.astype(dtype)
  return load, ref.shape[-1] // bk


def _state_block(ref):
  """Loader of row block i of a [Kp, *] state ref (``_state_blocks``' block
  i)."""
  bk = min(BK, ref.shape[0])
  return lambda i: ref[pl.ds(i * bk, bk), :].astype(_F32)


def _total(x):
  """Sum of a 2-D tile as [1, 1]."""
  return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _split_rows(x, n):
  """x [R, *] as n blocks of R / n rows (n a power of two)."""
  return jnp.split(x, n, axis=0) if n > 1 else [x]


def _pick(blocks, i):
  """blocks[i] for a traced i, by selects (exact): a loop over key blocks can
  then load each block's keys inside the loop (see ``_state_grad_f32``)."""
  return sum(jnp.where(i == m, b, 0.0) for m, b in enumerate(blocks))


# ----------------------------------------------------- key-blocked tile math ---
# ``chunk_tiles``'s functions with K split into blocks: b_q, b_k are sequences
# (lists, or lazy ``map``s of loaders) of [C, BK] tiles, b_s, b_ds of [BK, BV]
# state blocks.


def _qk(b_q, b_k, precision):
  """Q K^T [C, C] from q and k blocks in the input dtype (the operands of
  every data matmul here are in it, see ``tiles.Matmuls``)."""
  return sum(tiles.mm_nt(q_i, k_i, precision) for q_i, k_i in zip(b_q, b_k))


def _qk_from(q_ref, k_ref, rows=slice(None), precision=None):
  """Q K^T [C, C] of rows ``rows`` of two [*, Kp] refs, from input-dtype
  blocks (see ``_qk``)."""
  # Each block pair is loaded where its product is taken (``map`` of
  # loaders), so the NK blocks of both are not live at once (at K = 256 that
  # held _wy_scalars at 1104 B of sm_80 spills).
  if _is_f32(precision):
    # float32: F32_DOT-wide blocks (see F32_DOT) in a loop, which loads each
    # pair where it is used (unrolled, the 16 pairs at K = 256 made ptxas fall
    # back to 32 registers in _value_grads on sm_80). _output's float32 body
    # forms Q K^T in its own key loop (``_output_f32``).
    q, nk = _key_block(q_ref, rows, width=F32_DOT)
    k, _ = _key_block(k_ref, rows, width=F32_DOT)
    C = q_ref.shape[0] if isinstance(rows, slice) else rows.size
    return jax.lax.fori_loop(
        0, nk, lambda i, acc: acc + tiles.mm_nt(q(i), k(i), precision),
        jnp.zeros((C, C), _F32))
  q, nk = _key_block(q_ref, rows)
  k, _ = _key_block(k_ref, rows)
  return _qk(map(q, range(nk)), map(k, range(nk)), precision)


def _key_state(b_k, b_s, precision):
  """K S [C, BV] from [C, BK] key and [BK, BV] state blocks."""
  return sum(tiles.mm(k_i, s_i, precision) for k_i, s_i in zip(b_k, b_s))


def _wy_input(ks, b_v, b_beta, gt):
  """X [C, BV] = diag(beta) V - diag(beta exp(gamma)) K S, so U = T X."""
  return b_beta * b_v - (b_beta * gt.decay_in) * ks


def _pseudo_values(t, b_s, b_k, b_v, b_beta, gt, precision):
  """U [C, BV] = T diag(beta) V - W_k S with W_k = T diag(beta exp(gamma)) K,
  formed as T X (``_wy_input``): W_k S = T (diag(beta exp(gamma)) (K S))."""
  return tiles.mm(t, _wy_input(_key_state(b_k, b_s, precision), b_v, b_beta,
                               gt), precision)


def _masks(doc_ref, C, start=0, row_ref=None):
  """The document masks of the chunk at rows start .. start + C of the
  ``kernel_docs`` column ref (for ``chunk_tiles.gates``), or None. Kernels that
  form pair weights (M, L) pass the chunk's row ref; the others get no pair
  mask (``chunk_masks(pairs=False)``), which keeps [C, C] masks out of their
  registers (the sequential kernels spilled with them)."""
  if doc_ref is None:
    return None
  docs = segments.DocTiles(doc_ref, row_ref, chunk=C, sub=SUB, start=start)
  return docs.chunk_masks(pairs=row_ref is not None)


def _docs(docs, pairs: bool):
  """The ``kernel_docs`` arrays a launch passes: (cols, rows) for kernels with
  pair weights, (cols,) otherwise; None without documents."""
  return None if docs is None else tuple(docs[:2 if pairs else 1])


def _row_spec(chunk):
  """Chunk n's [1, C] row of ``kernel_docs``' rows, for grids (BH, N, ...)."""
  return pl.BlockSpec((None, None, 1, chunk), lambda b, n, *_: (b, n, 0, 0))


def _next_state(t, b_s, b_k, b_v, b_beta, b_g, precision, masks=None):
  """S' = exp(gamma_C) S + (exp(gamma_C - gamma) o K)^T U, as blocks."""
  gt = chunk_tiles.gates(b_g, masks)
  u = _pseudo_values(t, b_s, b_k, b_v, b_beta, gt, precision)  # [C, BV]
  return [gt.decay_out * s_i + tiles.mm_tn(gt.decay_to_end * k_i, u, precision)
          for k_i, s_i in zip(b_k, b_s)]


def _chunk_output(t, s, q, k, nk, qk, b_v, b_beta, b_g, *, scale, precision,
                  masks=None):
  """O [C, BV] = scale [diag(exp(gamma)) Q S + (M o Q K^T) U]; qk = Q K^T.

  t and qk are loaders, s(i), q(i), k(i) load block i of the state, q and k
  (of nk): each tile is loaded where it is used, so the NK [C, BK] blocks of q
  and k are not all live at once (at K = 256 float32 they overflowed an
  A100's shared memory)."""
  gt = chunk_tiles.gates(b_g, masks)
  u = _pseudo_values(t(), map(s, range(nk)), map(k, range(nk)), b_v, b_beta,
                     gt, precision)  # [C, BV]
  a = gt.m * qk()  # [C, C]
  inter = sum(tiles.mm(gt.decay_in * q(i), s(i), precision)
              for i in range(nk))
  return scale * (inter + tiles.mm(a, u, precision))


def _decayed_key_state(b_ds, b_k, gt, precision):
  """(exp(gamma_C - gamma) o K) dS' [C, BV]."""
  return sum(tiles.mm(gt.decay_to_end * k_i, ds_i, precision)
             for k_i, ds_i in zip(b_k, b_ds))


def _pseudo_value_grad(b_ds, b_k, a, b_do_s, gt, precision):
  """dU [C, BV] = (M o Q K^T)^T dO_s + (exp(gamma_C - gamma) o K) dS', with
  dO_s = scale dO and a = M o Q K^T."""
  return (tiles.mm_tn(a, b_do_s, precision)
          + _decayed_key_state(b_ds, b_k, gt, precision))


def _state_grad(t, b_ds, b_k, p, b_beta, b_g, qdo, *, precision, masks=None):
  """``chunk_tiles.state_grad`` on blocks: dS = scale (exp(gamma) o Q)^T dO +
  exp(gamma_C) dS' - W_k^T dU; p = (M o Q K^T)^T dO_s, dU's first term, and
  qdo(i) block i of scale (exp(gamma) o Q)^T dO. t, b_k, p and qdo are loaders
  (called where used, so the loads are not all live at once)."""
  gt = chunk_tiles.gates(b_g, masks)
  du = p() + _decayed_key_state(b_ds, b_k(), gt, precision)
  # W_k^T dU = (diag(c) K)^T (T^T dU), c = beta exp(gamma).
  tdu = tiles.mm_tn(t(), du, precision)  # [C, BV]
  c = b_beta * gt.decay_in
  return [qdo(i) + gt.decay_out * ds_i - tiles.mm_tn(c * k_i, tdu, precision)
          for i, (k_i, ds_i) in enumerate(zip(b_k(), b_ds))]


def _gates_vjp(b_g, dm, d_in, d_to_end, d_out, masks=None):
  """d log_g [C, 1] from cotangents of ``chunk_tiles.gates``' four factors
  (cut by the document ``masks`` as the factors are)."""
  _, pullback = jax.vjp(lambda g: chunk_tiles.gates(g, masks), b_g)
  return pullback(chunk_tiles.Gates(dm, d_in, d_to_end, d_out))[0]


def _inverse_blocks(k_ref, beta_ref, g_ref, precision, docs=None):
  """T = (I + L)^{-1} of the chunk as a dict of [SUB, SUB] blocks (i, j),
  j <= i, by block forward substitution (see the module docstring).

  L's blocks are ``chunk_tiles.intra_matrix`` restricted to rows of block i
  and columns of block j, with gamma formed as in ``chunk_tiles.gates`` (masked
  sums over the whole chunk, only for the block's rows or columns), and with
  ``docs`` (``segments.DocTiles``) zero across documents.
  """
  C = k_ref.shape[0]
  nb = C // SUB
  hi = tiles.HIGHEST
  b_g = g_ref[...]  # [C, 1]
  b_g_row = tiles.col_to_row(b_g)  # [1, C]
  rs, cs = tiles.iota((SUB, SUB), 0), tiles.iota((SUB, SUB), 1)

  def gamma_col(i):  # [SUB, 1]: gamma_t for the rows of block i
    r = tiles.iota((SUB, C), 0) + i * SUB
    c = tiles.iota((SUB, C), 1)
    return jnp.sum(jnp.where(c <= r, b_g_row, 0.0), axis=1, keepdims=True)

  def gamma_row(j):  # [1, SUB]: gamma_s for the columns of block j
    r = tiles.iota((C, SUB), 0)
    c = tiles.iota((C, SUB), 1) + j * SUB
    return jnp.sum(jnp.where(r <= c, b_g, 0.0), axis=0, keepdims=True)

  # Each row block's keys are loaded once: loads are issued early, so loading
  # them per (i, j) pair would keep all of them live at once. K K^T takes them
  # in the input dtype.
  if _is_f32(precision):
    # float32: the Gram blocks K_i K_j^T (j <= i) accumulate over F32_DOT-wide
    # key columns in a loop, which loads each column block's keys where they
    # are used (with all key blocks live, as below, ptxas fell back to 32
    # registers at K = 128: 9 KB of spills).
    pairs = [(i, j) for i in range(nb) for j in range(i + 1)]

    def gram_step(c, acc):
      cols = pl.ds(c * F32_DOT, F32_DOT)
      kb = [k_ref[pl.ds(i * SUB, SUB), cols] for i in range(nb)]  # [SUB, S]
      return {ij: acc[ij] + tiles.mm_nt(kb[ij[0]], kb[ij[1]], precision)
              for ij in pairs}

    gram = jax.lax.fori_loop(
        0, k_ref.shape[-1] // F32_DOT, gram_step,
        {ij: jnp.zeros((SUB, SUB), _F32) for ij in pairs})
    qk = lambda i, j: gram[i, j]
  else:
    b_k = [_key_blocks(k_ref, pl.ds(i * SUB, SUB))  # [SUB, BK]
           for i in range(nb)]
    qk = lambda i, j: _qk(b_k[i], b_k[j], precision)

  def l_block(i, j):
    kk = qk(i, j)  # [SUB, SUB]
    diff = gamma_col(i) - gamma_row(j)
    if i == j:  # masked before exp, as in chunk_tiles.gates
      m = jnp.where(rs >= cs, jnp.exp(jnp.where(rs > cs, diff, 0.0)), 0.0)
    else:
      m = jnp.exp(diff)
    l = beta_ref[pl.ds(i * SUB, SUB), :] * m * kk
    if docs is not None:
      l = jnp.where(docs.same(i, j), l, 0.0)
    return jnp.where(rs > cs, l, 0.0) if i == j else l

  t = {}
  for i in range(nb):
    l_row = {j: l_block(i, j) for j in range(i)}
    t[i, i] = chunk_tiles.unit_lower_inverse(l_block(i, i))
    for j in range(i):
      acc = sum(tiles.mm(l_row[m], t[m, j], hi) for m in range(j, i))
      t[i, j] = -tiles.mm(t[i, i], acc, hi)
  return t


# ---------------------------------------------------------------- kernels ---


def _prepare_kernel(k_ref, beta_ref, g_ref, t_ref, *, precision, doc_ref,
                    row_ref=None):
  docs = (None if doc_ref is None else
          segments.DocTiles(doc_ref, row_ref, chunk=k_ref.shape[0], sub=SUB))
  t = _inverse_blocks(k_ref, beta_ref, g_ref, precision, docs)
  nb = t_ref.shape[0] // SUB
  zeros = jnp.zeros((SUB, SUB), _F32)
  for i in range(nb):
    for j in range(nb):
      t_ref[pl.ds(i * SUB, SUB), pl.ds(j * SUB, SUB)] = t.get((i, j), zeros)


def _states_kernel(k_ref, v_ref, beta_ref, g_ref, t_ref, h0_ref, h_in_ref,
                   ht_ref, *, C, N, precision, doc_ref):
  Kp = k_ref.shape[-1]

  def body(n, b_s):
    rows = pl.ds(n * C, C)
    bk = b_s[0].shape[0]
    for i, s_i in enumerate(b_s):
      h_in_ref[pl.ds(n * Kp + i * bk, bk), :] = s_i
    return _next_state(
        t_ref[rows, :],  # [C, C]
        b_s,
        _key_blocks(k_ref, rows),  # [C, BK] each
        v_ref[rows, :],  # [C, BV]
        _rows(beta_ref, rows), _rows(g_ref, rows),  # [C, 1]
        precision, _masks(doc_ref, C, n * C))

  b_s = jax.lax.fori_loop(0, N, body, _state_blocks(h0_ref))  # [BK, BV] each
  bk = b_s[0].shape[0]
  for i, s_i in enumerate(b_s):
    ht_ref[pl.ds(i * bk, bk), :] = s_i


def _output_f32(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, h_ref, o_ref, *,
                scale, precision, doc_ref, row_ref):
  """_output_kernel for float32 inputs: every product contracts F32_DOT keys
  or SUB tokens (see F32_DOT). A loop over F32_DOT-wide key blocks forms K S,
  diag(exp(gamma)) Q S and Q K^T; U = T X and (M o Q K^T) U then contract
  SUB-token blocks of X and U (``jnp.split``) with column blocks of T and of
  M o Q K^T."""
  C, Kp = q_ref.shape
  bv = v_ref.shape[-1]
  gt = chunk_tiles.gates(g_ref[...], _masks(doc_ref, C, row_ref=row_ref))

  def body(i, acc):
    ks, qs, qk = acc
    cols = pl.ds(i * F32_DOT, F32_DOT)
    b_q, b_k = q_ref[:, cols], k_ref[:, cols]  # [C, F32_DOT]
    b_s = h_ref[cols, :]  # [F32_DOT, BV]
    return (ks + tiles.mm(b_k, b_s, precision),
            qs + tiles.mm(gt.decay_in * b_q, b_s, precision),
            qk + tiles.mm_nt(b_q, b_k, precision))

  zv = jnp.zeros((C, bv), _F32)
  ks, qs, qk = jax.lax.fori_loop(0, Kp // F32_DOT, body,
                                 (zv, zv, jnp.zeros((C, C), _F32)))
  nb = C // SUB
  x = _wy_input(ks, v_ref[...], beta_ref[...], gt)  # [C, BV]
  # U = T X [C, BV] from T's [C, SUB] column blocks and X's [SUB, BV] blocks
  u = sum(tiles.mm(t_ref[:, pl.ds(m * SUB, SUB)], x_m, precision)
          for m, x_m in enumerate(_split_rows(x, nb)))
  a = gt.m * qk  # [C, C]: M o Q K^T
  a_blocks = jnp.split(a, nb, axis=1) if nb > 1 else [a]  # [C, SUB] each
  inter = sum(tiles.mm(a_j, u_j, precision)
              for a_j, u_j in zip(a_blocks, _split_rows(u, nb)))
  o_ref[...] = (scale * (qs + inter)).astype(o_ref.dtype)


def _output_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, h_ref, o_ref, *,
                   scale, precision, doc_ref, row_ref=None):
  if _is_f32(precision):
    return _output_f32(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, h_ref,
                       o_ref, scale=scale, precision=precision,
                       doc_ref=doc_ref, row_ref=row_ref)
  q, nk = _key_block(q_ref)  # [C, BK] each
  k, _ = _key_block(k_ref)
  b_o = _chunk_output(
      lambda: t_ref[...],  # [C, C]
      _state_block(h_ref),  # [BK, BV] each
      q, k, nk,
      lambda: _qk_from(q_ref, k_ref, precision=precision),  # [C, C]
      v_ref[...],  # [C, BV]
      beta_ref[...], g_ref[...],  # [C, 1]
      scale=scale, precision=precision,
      masks=_masks(doc_ref, q_ref.shape[0], row_ref=row_ref))
  o_ref[...] = b_o.astype(o_ref.dtype)


def _intra_kernel(q_ref, k_ref, g_ref, do_ref, p_ref, *, scale, precision,
                  doc_ref, row_ref=None):
  a = (chunk_tiles.gates(g_ref[...],
                         _masks(doc_ref, q_ref.shape[0], row_ref=row_ref)).m
       * _qk_from(q_ref, k_ref, precision=precision))  # [C, C]: M o Q K^T
  p_ref[...] = scale * tiles.mm_tn(a, do_ref[...], precision)


def _state_grad_f32(n, b_ds, q_ref, k_ref, beta_ref, g_ref, t_ref, p_ref,
                    do_ref, *, C, scale, precision, masks):
  """``_state_grad`` of chunk n for float32 inputs: every product contracts
  F32_DOT keys or SUB tokens (see F32_DOT); dU and T^T dU are split into
  SUB-token blocks (``jnp.split``) for the products over tokens. Both
  key-block passes are loops that pick the carried block by selects
  (``_pick``), so each block's keys and queries are loaded inside the loop:
  unrolled (the step's q and k loads, about 200 floats per thread at K = 256,
  outside any loop) ptxas fell back to 32 registers on sm_90a (15 KB of
  spills)."""
  bk = b_ds[0].shape[0]
  nk, nb = len(b_ds), C // SUB
  rows = pl.ds(n * C, C)
  gt = chunk_tiles.gates(_rows(g_ref, rows), masks)

  # dU = (M o Q K^T)^T dO_s + (exp(gamma_C - gamma) o K) dS'
  def du_step(i, du):
    for f, ds_f in enumerate(_split_rows(_pick(b_ds, i), bk // F32_DOT)):
      k_f = k_ref[rows, pl.ds(i * bk + f * F32_DOT, F32_DOT)].astype(_F32)
      du = du + tiles.mm(gt.decay_to_end * k_f, ds_f, precision)  # [C, BV]
    return du

  du = jax.lax.fori_loop(0, nk, du_step, p_ref[rows, :])  # [C, BV]
  # T^T dU [C, BV]
  tdu = sum(tiles.mm_tn(t_ref[pl.ds(n * C + m * SUB, SUB), :], du_m, precision)
            for m, du_m in enumerate(_split_rows(du, nb)))
  c = _rows(beta_ref, rows) * gt.decay_in  # [C, 1], c = beta exp(gamma)
  d_in_j, c_j, tdu_j = (_split_rows(x, nb) for x in (gt.decay_in, c, tdu))

  def ds_step(i, out):
    cols = pl.ds(i * bk, bk)
    qdo = wk = 0.0
    for j in range(nb):
      blk = pl.ds(n * C + j * SUB, SUB)
      qdo = qdo + tiles.mm_tn(d_in_j[j] * q_ref[blk, cols].astype(_F32),
                              do_ref[blk, :], precision)  # [BK, BV]
      wk = wk + tiles.mm_tn(c_j[j] * k_ref[blk, cols].astype(_F32),
                            tdu_j[j], precision)  # [BK, BV]
    new = scale * qdo + gt.decay_out * _pick(b_ds, i) - wk
    return [jnp.where(i == m, new, o) for m, o in enumerate(out)]

  return jax.lax.fori_loop(0, nk, ds_step, list(b_ds))


def _state_grads_kernel(q_ref, k_ref, beta_ref, g_ref, t_ref, p_ref, do_ref,
                        dht_ref, dh_out_ref, dh0_ref, *, C, N, scale,
                        precision, doc_ref):
  Kp = k_ref.shape[-1]

  def body(i, b_ds):
    n = N - 1 - i
    rows = pl.ds(n * C, C)
    bk = b_ds[0].shape[0]
    for m, ds_m in enumerate(b_ds):
      dh_out_ref[pl.ds(n * Kp + m * bk, bk), :] = ds_m
    masks = _masks(doc_ref, C, n * C)
    if _is_f32(precision):
      return _state_grad_f32(n, b_ds, q_ref, k_ref, beta_ref, g_ref, t_ref,
                             p_ref, do_ref, C=C, scale=scale,
                             precision=precision, masks=masks)
    return _state_grad(
        lambda: t_ref[rows, :],  # [C, C]
        b_ds,
        lambda: _key_blocks(k_ref, rows),  # [C, BK] each, loaded per use
        lambda: p_ref[rows, :],  # [C, BV]: (M o Q K^T)^T dO_s
        _rows(beta_ref, rows), _rows(g_ref, rows),  # [C, 1]
        lambda m: scale * tiles.mm_tn(  # [BK, BV]
            chunk_tiles.gates(_rows(g_ref, rows), masks).decay_in
            * q_ref[rows, pl.ds(m * bk, bk)].astype(_F32),
            do_ref[rows, :], precision),
        precision=precision, masks=masks)

  b_ds = jax.lax.fori_loop(0, N, body, _state_blocks(dht_ref))  # [BK, BV] each
  bk = b_ds[0].shape[0]
  for m, ds_m in enumerate(b_ds):
    dh0_ref[pl.ds(m * bk, bk), :] = ds_m


def _value_grads_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, do_ref,
                        h_ref, dh_ref, u_ref, tdu_ref, dv_ref, dbeta_ref,
                        dc_ref, dt_ref, da_ref, *, scale, precision, doc_ref,
                        row_ref=None):
  b_t = t_ref[...]  # [C, C]
  b_beta = beta_ref[...]  # [C, 1]
  b_v = v_ref[...]  # [C, BV]
  # Key and state blocks are loaded where used (map: one at a time), so the
  # NK [C, BK] key blocks are not live across both products (at K = 256
  # float32 they overflowed an A100's shared memory).
  k, nk = _key_block(k_ref)  # [C, BK] each
  gt = chunk_tiles.gates(g_ref[...],
                         _masks(doc_ref, k_ref.shape[0], row_ref=row_ref))
  ks = _key_state(map(k, range(nk)), map(_state_block(h_ref), range(nk)),
                  precision)  # [C, BV]
  x = _wy_input(ks, b_v, b_beta, gt)  # [C, BV]
  u = tiles.mm(b_t, x, precision)  # [C, BV]
  u_ref[...] = u
  # do enters the products as loaded; the query scale goes on their float32
  # results or on the float32 operand.
  b_do = do_ref[...]  # [C, BV]
  # this block's d(M o Q K^T)
  da_ref[...] = scale * tiles.mm_nt(b_do, u, precision)
  du = _pseudo_value_grad(
      map(_state_block(dh_ref), range(nk)),  # [BK, BV] each
      map(k, range(nk)),
      (scale * gt.m) * _qk_from(q_ref, k_ref, precision=precision),  # [C, C]
      b_do, gt, precision)
  dt_ref[...] = tiles.mm_nt(du, x, precision)  # U = T X: this block's dT
  tdu = tiles.mm_tn(b_t, du, precision)  # dX = T^T dU
  tdu_ref[...] = tdu
  dv_ref[...] = b_beta * tdu
  dbeta_ref[...] = jnp.sum(b_v * tdu, axis=1, keepdims=True)
  # d c for c = beta exp(gamma) in X = beta V - c (K S).
  dc_ref[...] = -jnp.sum(ks * tdu, axis=1, keepdims=True)


def _key_grads_kernel(q_ref, k_ref, beta_ref, g_ref, do_ref, u_ref, tdu_ref,
                      h_ref, dh_ref, dq_ref, dk_ref, dg_ref, *, scale,
                      precision, doc_ref):
  C, bk = q_ref.shape
  Vp = u_ref.shape[-1]
  bv = min(BV["key_grads"], Vp)

  def body(j, carry):
    dqs, dke, dck, d_out = carry
    cols = pl.ds(j * bv, bv)
    b_s, b_ds = h_ref[:, cols], dh_ref[:, cols]  # [BK, BV]
    return (dqs + tiles.mm_nt(do_ref[:, cols].astype(_F32), b_s, precision),
            dke + tiles.mm_nt(u_ref[:, cols], b_ds, precision),
            dck - tiles.mm_nt(tdu_ref[:, cols], b_s, precision),
            d_out + _total(b_s * b_ds))

  zk = jnp.zeros((C, bk), _F32)
  # dqs = d(exp(gamma) o Q) / scale, dke = d(exp(gamma_C - gamma) o K),
  # dck = d(diag(c) K) through X = beta V - c (K S), all for this key block;
  # d_out = d exp(gamma_C). The intra-chunk part d(M o Q K^T) is _wy_grads'.
  dqs, dke, dck, d_out = jax.lax.fori_loop(
      0, Vp // bv, body, (zk, zk, zk, jnp.zeros((1, 1), _F32)))
  dqs = scale * dqs
  b_q, b_k = q_ref[...].astype(_F32), k_ref[...].astype(_F32)  # [C, BK]
  b_g = g_ref[...]  # [C, 1]
  masks = _masks(doc_ref, C)
  gt = chunk_tiles.gates(b_g, masks)
  dq_ref[...] = gt.decay_in * dqs
  dk_ref[...] = (gt.decay_to_end * dke + (beta_ref[...] * gt.decay_in) * dck)
  dg_ref[...] = _gates_vjp(
      b_g, jnp.zeros((C, C), _F32),
      jnp.sum(b_q * dqs, axis=1, keepdims=True),
      jnp.sum(b_k * dke, axis=1, keepdims=True), d_out, masks)


def _wy_scalars_kernel(q_ref, k_ref, beta_ref, g_ref, dl_ref, da_ref, dc_ref,
                       dbeta_ref, dg_ref, *, precision, doc_ref, row_ref=None):
  C = k_ref.shape[0]
  b_beta, b_g = beta_ref[...], g_ref[...]  # [C, 1]
  masks = _masks(doc_ref, C, row_ref=row_ref)
  gt = chunk_tiles.gates(b_g, masks)
  # L = (beta M) o K K^T on the strict lower triangle.
  d_bm = dl_ref[...] * _qk_from(k_ref, k_ref, precision=precision)  # [C, C]
  d_c = dc_ref[...]  # [C, 1], c = beta exp(gamma)
  dbeta_ref[...] = (jnp.sum(d_bm * gt.m, axis=1, keepdims=True)
                    + gt.decay_in * d_c)
  # da = d(M o Q K^T)
  dg_ref[...] = _gates_vjp(
      b_g, d_bm * b_beta + da_ref[...] * _qk_from(q_ref, k_ref,
                                                  precision=precision),
      b_beta * d_c, jnp.zeros((C, 1), _F32), jnp.zeros((1, 1), _F32), masks)


def _gate_block(b_g, r0, nr, c0, nc, docs):
  """Rows r0 .. r0 + nr and columns c0 .. c0 + nc of ``chunk_tiles.gates``' M
  (cut by ``docs``, a ``segments.DocTiles``, or None): nr or nc is the chunk
  and the other one F32_DOT = SUB, with gamma summed as ``gates`` does."""
  C = b_g.shape[0]
  b_g_row = tiles.col_to_row(b_g)  # [1, C]
  g_rows = jnp.sum(jnp.where(tiles.iota((nr, C), 1)
                             <= tiles.iota((nr, C), 0) + r0, b_g_row, 0.0),
                   axis=1, keepdims=True)  # [nr, 1]
  g_cols = jnp.sum(jnp.where(tiles.iota((C, nc), 0)
                             <= tiles.iota((C, nc), 1) + c0, b_g, 0.0),
                   axis=0, keepdims=True)  # [1, nc]
  r = tiles.iota((nr, nc), 0) + r0
  c = tiles.iota((nr, nc), 1) + c0
  m = jnp.where(r >= c, jnp.exp(jnp.where(r > c, g_rows - g_cols, 0.0)), 0.0)
  if docs is None:
    return m
  # pylint: disable=protected-access
  same = (docs._col() == docs._row(c0 // SUB) if nr == C
          else docs._col(r0 // SUB) == docs._row())
  return jnp.where(same, m, 0.0)


def _wy_grads_f32(q_ref, k_ref, beta_ref, g_ref, dl_ref, da_ref, dq_in_ref,
                  dk_in_ref, dq_ref, dk_ref, *, precision, doc_ref, row_ref):
  """_wy_grads_kernel for float32 inputs: every product contracts F32_DOT
  tokens (see F32_DOT), blocks of M loaded or formed per use. With A = dL o
  (beta M) (rows scaled by beta) and D = M o d(M o Q K^T):
  dq += sum_j D[:, j] K[j], dk += sum_j (A[:, j] K[j] + A[j]^T K[j] + D[j]^T
  Q[j]) over F32_DOT-token blocks j (d(K K^T) = A + A^T)."""
  C = k_ref.shape[0]
  b_g, b_beta = g_ref[...], beta_ref[...]  # [C, 1]
  docs = (None if doc_ref is None else
          segments.DocTiles(doc_ref, row_ref, chunk=C, sub=SUB))
  dq, dk = dq_in_ref[...], dk_in_ref[...]  # [C, BK]
  for j in range(C // F32_DOT):
    blk = pl.ds(j * F32_DOT, F32_DOT)
    m_c = _gate_block(b_g, 0, C, j * F32_DOT, F32_DOT, docs)  # [C, S]
    m_r = _gate_block(b_g, j * F32_DOT, F32_DOT, 0, C, docs)  # [S, C]
    k_j = k_ref[blk, :].astype(_F32)  # [S, BK]
    dq = dq + tiles.mm(m_c * da_ref[:, blk], k_j, precision)
    dk = (dk + tiles.mm(dl_ref[:, blk] * (b_beta * m_c), k_j, precision)
          + tiles.mm_tn(dl_ref[blk, :] * (beta_ref[blk, :] * m_r), k_j,
                        precision)
          + tiles.mm_tn(m_r * da_ref[blk, :], q_ref[blk, :].astype(_F32),
                        precision))
  dq_ref[...] = dq
  dk_ref[...] = dk


def _wy_grads_kernel(q_ref, k_ref, beta_ref, g_ref, dl_ref, da_ref, dq_in_ref,
                     dk_in_ref, dq_ref, dk_ref, *, precision, doc_ref,
                     row_ref=None):
  if _is_f32(precision):
    return _wy_grads_f32(q_ref, k_ref, beta_ref, g_ref, dl_ref, da_ref,
                         dq_in_ref, dk_in_ref, dq_ref, dk_ref,
                         precision=precision, doc_ref=doc_ref, row_ref=row_ref)
  gt = chunk_tiles.gates(g_ref[...],
                         _masks(doc_ref, k_ref.shape[0], row_ref=row_ref))
  d_kk = dl_ref[...] * (beta_ref[...] * gt.m)  # [C, C], dl strict lower
  d_kk = d_kk + d_kk.T  # K K^T is symmetric: one product per key block
  d_qk = gt.m * da_ref[...]  # [C, C]: da = d(M o Q K^T)
  k_i = k_ref[...].astype(_F32)  # [C, BK]
  dq_ref[...] = dq_in_ref[...] + tiles.mm(d_qk, k_i, precision)
  dk_ref[...] = (dk_in_ref[...] + tiles.mm(d_kk, k_i, precision)
                 + tiles.mm_tn(d_qk, q_ref[...].astype(_F32), precision))


# ---------------------------------------------------------------- calls ---


def _dims(q_or_k, v, chunk, kernel):
  BH, Tp, Kp = q_or_k.shape
  Vp = v.shape[-1]
  bv = min(BV[kernel], Vp)
  return BH, Tp, Kp, Vp, bv, Tp // chunk, Vp // bv


def _prepare(k, beta, g, *, docs, chunk, interpret):
  BH, Tp, Kp = k.shape
  N = Tp // chunk
  keys = pl.BlockSpec((None, chunk, Kp), lambda b, n: (b, n, 0))
  col = pl.BlockSpec((None, chunk, 1), lambda b, n: (b, n, 0))
  kernel = functools.partial(_prepare_kernel,
                             precision=tiles.precision_for(k.dtype))
  return segments.pallas_call(
      kernel, 3, _docs(docs, True), [keys, col, col], (col, _row_spec(chunk)),
      (k, beta, g), grid=(BH, N),
      out_specs=pl.BlockSpec((None, chunk, chunk), lambda b, n: (b, n, 0)),
      out_shape=jax.ShapeDtypeStruct((BH, Tp, chunk), _F32),
      compiler_params=_params("prepare"), interpret=interpret,
      name="delta_rule_prepare")


def _states(k, v, beta, g, t, h0, *, docs, chunk, interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(k, v, chunk, "states")
  whole = lambda d: pl.BlockSpec((None, Tp, d), lambda b, j: (b, 0, 0))
  kernel = functools.partial(_states_kernel, C=chunk, N=N,
                             precision=tiles.precision_for(k.dtype))
  return segments.pallas_call(
      kernel, 6, _docs(docs, False),
      [whole(Kp), pl.BlockSpec((None, Tp, bv), lambda b, j: (b, 0, j)),
       whole(1), whole(1), whole(chunk),
       pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      (whole(1),), (k, v, beta, g, t, h0), grid=(BH, NV),
      out_specs=[pl.BlockSpec((None, N * Kp, bv), lambda b, j: (b, 0, j)),
                 pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((BH, N * Kp, Vp), _F32),
                 jax.ShapeDtypeStruct((BH, Kp, Vp), _F32)],
      compiler_params=_params("states"), interpret=interpret,
      name="delta_rule_states")


def _chunk_specs(Kp, bv, chunk):
  """Block specs of one chunk for a grid (BH, N, NV): keys, values, per-token
  scalars, the chunk's inverse T and its [Kp, bv] state block."""
  keys = pl.BlockSpec((None, chunk, Kp), lambda b, n, j: (b, n, 0))
  vals = pl.BlockSpec((None, chunk, bv), lambda b, n, j: (b, n, j))
  col = pl.BlockSpec((None, chunk, 1), lambda b, n, j: (b, n, 0))
  inv = pl.BlockSpec((None, chunk, chunk), lambda b, n, j: (b, n, 0))
  state = pl.BlockSpec((None, Kp, bv), lambda b, n, j: (b, n, j))
  return keys, vals, col, inv, state


def _output(q, k, v, beta, g, t, h_in, *, docs, scale, chunk, interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(q, v, chunk, "output")
  keys, vals, col, inv, state = _chunk_specs(Kp, bv, chunk)
  kernel = functools.partial(_output_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return segments.pallas_call(
      kernel, 7, _docs(docs, True), [keys, keys, vals, col, col, inv, state],
      (col, _row_spec(chunk)), (q, k, v, beta, g, t, h_in), grid=(BH, N, NV),
      out_specs=vals,
      out_shape=jax.ShapeDtypeStruct((BH, Tp, Vp), q.dtype),
      compiler_params=_params("output"), interpret=interpret,
      name="delta_rule_output")


def _intra(q, k, g, do, *, docs, scale, chunk, interpret):
  """(M o Q K^T)^T dO_s [BH, NC, Vp] float32 of every chunk, dO_s = scale dO:
  the part of _state_grads' dU that does not depend on the carried dS'."""
  BH, Tp, Kp, Vp, bv, N, NV = _dims(q, do, chunk, "state_grads")
  keys, vals, col, _, _ = _chunk_specs(Kp, bv, chunk)
  kernel = functools.partial(_intra_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return segments.pallas_call(
      kernel, 4, _docs(docs, True), [keys, keys, col, vals],
      (col, _row_spec(chunk)), (q, k, g, do), grid=(BH, N, NV), out_specs=vals,
      out_shape=jax.ShapeDtypeStruct((BH, Tp, Vp), _F32),
      compiler_params=_params("intra"), interpret=interpret,
      name="delta_rule_intra")


def _state_grads(q, k, beta, g, t, do, dh_t, *, docs, scale, chunk, interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(q, do, chunk, "state_grads")
  p = _intra(q, k, g, do, docs=docs, scale=scale, chunk=chunk,
             interpret=interpret)
  whole = lambda d: pl.BlockSpec((None, Tp, d), lambda b, j: (b, 0, 0))
  vals = pl.BlockSpec((None, Tp, bv), lambda b, j: (b, 0, j))
  kernel = functools.partial(_state_grads_kernel, C=chunk, N=N, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return segments.pallas_call(
      kernel, 8, _docs(docs, False),
      [whole(Kp), whole(Kp), whole(1), whole(1), whole(chunk), vals, vals,
       pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      (whole(1),), (q, k, beta, g, t, p, do, dh_t), grid=(BH, NV),
      out_specs=[pl.BlockSpec((None, N * Kp, bv), lambda b, j: (b, 0, j)),
                 pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((BH, N * Kp, Vp), _F32),
                 jax.ShapeDtypeStruct((BH, Kp, Vp), _F32)],
      compiler_params=_params("state_grads"), interpret=interpret,
      name="delta_rule_state_grads")


def _value_grads(q, k, v, beta, g, t, do, h_in, dh_out, *, docs, scale, chunk,
                 interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(q, v, chunk, "value_grads")
  keys, vals, col, inv, state = _chunk_specs(Kp, bv, chunk)
  col_part = pl.BlockSpec((None, None, chunk, 1), lambda b, n, j: (j, b, n, 0))
  inv_part = pl.BlockSpec((None, None, chunk, chunk),
                          lambda b, n, j: (j, b, n, 0))
  kernel = functools.partial(_value_grads_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  per_value = jax.ShapeDtypeStruct((BH, Tp, Vp), _F32)
  per_block = jax.ShapeDtypeStruct((NV, BH, Tp, 1), _F32)
  per_block_cc = jax.ShapeDtypeStruct((NV, BH, Tp, chunk), _F32)
  u, tdu, dv, dbeta, dc, dt, da = segments.pallas_call(
      kernel, 9, _docs(docs, True),
      [keys, keys, vals, col, col, inv, vals, state, state],
      (col, _row_spec(chunk)), (q, k, v, beta, g, t, do, h_in, dh_out),
      grid=(BH, N, NV),
      out_specs=[vals, vals, vals, col_part, col_part, inv_part, inv_part],
      out_shape=[per_value, per_value, per_value, per_block, per_block,
                 per_block_cc, per_block_cc],
      compiler_params=_params("value_grads"), interpret=interpret,
      name="delta_rule_value_grads")
  return u, tdu, dv, dbeta.sum(0), dc.sum(0), dt.sum(0), da.sum(0)


def _key_grads(q, k, beta, g, do, u, tdu, h_in, dh_out, *, docs, scale, chunk,
               interpret):
  BH, Tp, Kp = q.shape
  Vp = u.shape[-1]
  bk = min(BK, Kp)
  N, NK = Tp // chunk, Kp // bk
  keys = pl.BlockSpec((None, chunk, bk), lambda b, n, i: (b, n, i))
  col = pl.BlockSpec((None, chunk, 1), lambda b, n, i: (b, n, 0))
  vals = pl.BlockSpec((None, chunk, Vp), lambda b, n, i: (b, n, 0))
  state = pl.BlockSpec((None, bk, Vp), lambda b, n, i: (b, n * NK + i, 0))
  col_part = pl.BlockSpec((None, None, chunk, 1), lambda b, n, i: (i, b, n, 0))
  kernel = functools.partial(_key_grads_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  per_key = jax.ShapeDtypeStruct((BH, Tp, Kp), _F32)
  dq, dk, dg = segments.pallas_call(
      kernel, 9, _docs(docs, False),
      [keys, keys, col, col, vals, vals, vals, state, state],
      (col,), (q, k, beta, g, do, u, tdu, h_in, dh_out), grid=(BH, N, NK),
      out_specs=[keys, keys, col_part],
      out_shape=[per_key, per_key,
                 jax.ShapeDtypeStruct((NK, BH, Tp, 1), _F32)],
      compiler_params=_params("key_grads"), interpret=interpret,
      name="delta_rule_key_grads")
  return dq, dk, dg.sum(0)


def _wy_grads(q, k, beta, g, dl, da, dc, dq_in, dk_in, *, docs, chunk,
              interpret):
  BH, Tp, Kp = k.shape
  bk = min(BK, Kp)
  N, NK = Tp // chunk, Kp // bk
  precision = tiles.precision_for(k.dtype)
  row = lambda d: pl.BlockSpec((None, chunk, d), lambda b, n: (b, n, 0))
  col = jax.ShapeDtypeStruct((BH, Tp, 1), _F32)
  dbeta, dg = segments.pallas_call(
      functools.partial(_wy_scalars_kernel, precision=precision), 7,
      _docs(docs, True),
      [row(Kp), row(Kp), row(1), row(1), row(chunk), row(chunk), row(1)],
      (row(1), _row_spec(chunk)), (q, k, beta, g, dl, da, dc), grid=(BH, N),
      out_specs=[row(1), row(1)],
      out_shape=[col, col],
      compiler_params=_params("wy_scalars", k.dtype), interpret=interpret,
      name="delta_rule_wy_scalars")
  keys = pl.BlockSpec((None, chunk, bk), lambda b, n, i: (b, n, i))
  rows = lambda d: pl.BlockSpec((None, chunk, d), lambda b, n, i: (b, n, 0))
  dq, dk = segments.pallas_call(
      functools.partial(_wy_grads_kernel, precision=precision), 8,
      _docs(docs, True),
      [keys, keys, rows(1), rows(1), rows(chunk), rows(chunk), keys, keys],
      (rows(1), _row_spec(chunk)), (q, k, beta, g, dl, da, dq_in, dk_in),
      grid=(BH, N, NK),
      out_specs=[keys, keys],
      out_shape=[jax.ShapeDtypeStruct((BH, Tp, Kp), _F32)] * 2,
      compiler_params=_params("wy_grads"), interpret=interpret,
      name="delta_rule_wy_grads")
  return dq, dk, dbeta, dg


def _inverse_vjp(t, dt, chunk):
  """dL [BH, NC, C] from T and dT of every chunk, in XLA (see the module
  docstring): ``chunk_tiles.unit_lower_inverse_vjp`` batched over chunks."""
  BH, Tp, C = t.shape
  blocks = lambda x: x.reshape(BH * Tp // chunk, chunk, C)
  dl = jax.vmap(chunk_tiles.unit_lower_inverse_vjp)(blocks(t), blocks(dt))
  return dl.reshape(BH, Tp, C)


def _input_grads(q, k, v, beta, g, t, do, h_in, dh_out, *, docs, scale, chunk,
                 interpret):
  """``Kernels.input_grads`` as four kernels (see the module docstring)."""
  kw = dict(docs=docs, chunk=chunk, interpret=interpret)
  u, tdu, dv, dbeta_v, dc, dt, da = _value_grads(
      q, k, v, beta, g, t, do, h_in, dh_out, scale=scale, **kw)
  dq_out, dk_out, dg_out = _key_grads(q, k, beta, g, do, u, tdu, h_in, dh_out,
                                      scale=scale, **kw)
  dq, dk, dbeta, dg = _wy_grads(q, k, beta, g, _inverse_vjp(t, dt, chunk), da,
                                dc, dq_out, dk_out, **kw)
  return dq, dk, dv, dbeta + dbeta_v, dg + dg_out


def delta_rule(q, k, v, beta, log_g, *, h0, scale: float, chunk_size: int = 64,
               interpret=False, resets=None):
  """Pallas (Triton) delta rule. Arguments as in ``chunked.delta_rule`` (log_g
  and beta float32 [B, T, H], h0 float32 [B, H, K, V]), plus ``interpret`` for
  Pallas interpret mode. chunk_size in ``kernel_shapes.CHUNK_SIZES`` and head
  dims up to ``kernel_shapes.MAX_HEAD_DIM`` (K) and ``MAX_V`` (checked in
  ``api.py``).

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32.
  """
  kernels = pallas_vjp.bind(_prepare, _states, _output, _state_grads,
                            _input_grads, scale=scale, chunk=chunk_size,
                            interpret=interpret)
  return pallas_vjp.delta_rule(kernels, q, k, v, beta, log_g, h0=h0,
                               chunk_size=chunk_size, resets=resets)
