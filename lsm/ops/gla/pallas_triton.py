r"""GLA as Pallas kernels lowered through Triton (GPUs). The recurrence is defined
in ``reference.py``; the per-chunk math is in ``chunk_tiles.py`` and the custom
VJP in ``pallas_vjp.py`` (which also says why the backward recomputes states).

Kernels, on [B, T, H, D] arrays as the op receives them (no transposes; a block
squeezes B and H and keeps [C, D] tiles with stride H * D along T). Block sizes
and warps per kernel are in ``TILING``, which says how they were chosen: every
kernel works on tiles of at most 64 key and 64 value columns, so at head dims
up to 256 none outgrows an A100's or H100's shared memory or makes ptxas fall
back to 32 registers.

  states   grid (B, H, V / BV, K / BK), a loop over the N chunks inside: writes
           the (transposed) state entering every chunk, h_in [B, H, N, V, K]
           float32, and h_T. Sequential in T, so its parallelism is
           B * H * (V / BV) * (K / BK) programs; 64 x 32 state blocks keep that
           at 8x B * H for head dims of 128.
  intra    grid (B, H, N), a loop over key blocks inside: the intra-chunk
           weights A [B, T, H, C] float32 (row t of a chunk holds A_ts, zero for
           s > t), from 16-row sub-chunk tiles (``chunk_tiles.intra_weights``).
           Forward, and again in the backward (recomputed like the states).
  output   grid (B, H, N, V / BV), a loop over key blocks: o = A v + q h_in.
  dstates  grid (B, H, V / BV, K / BK), the reverse loop: the gradient for the
           state leaving every chunk, dh_out, and dh0.
  dv       grid (B, H, N, V / BV), a loop over key blocks: dv = A^T do +
           (decayed k) dh_out.
  dqkg     grid (B, H, N, K / BK), a loop over value blocks that gathers dA =
           do v^T (as [16, 16] blocks), do h_in, v dh_out and sum h_in dh_out;
           then dq, dk and d log_g of the key block from them
           (``chunk_tiles.intra_grads``, ``finish_grads``). dA is recomputed by
           each of the K / BK programs of a chunk (ten [16, 16] blocks, 5 KFLOP
           per value column) rather than written out and read back.

Gates. Per-channel gates are [B, T, H, K] and every kernel reads them as
[C, BK] tiles beside q and k. One gate per head comes as the op received it,
[B, T, H] (viewed as [B, T, H, 1], a reshape; ``pallas_vjp``): the kernels
read a [C, 1] gate column per chunk (a static choice by the gate's last dim,
``_head_gates``), form the cumulative gate, one number per token, once per
chunk rather than once per key block (output, dv: a [C, 1] decay column
hoisted out of the key loop), and every decay factor is a [C, 1] column or
[1, 1] scalar broadcast over the key columns (``chunk_tiles``). The gate
gradient is summed over K in the kernel: each dqkg program sums its key
block's terms into a [C, 1] column and writes it as one column of a
[B, T, H, K / BK] float32 array (4 columns at K = 128), which ``grads`` sums
to [B, T, H, 1]; no [B, T, H, K] gate or gate gradient exists in this path.
The head-gate kernels use the per-channel ones' tilings; compiled for sm_80
and sm_90a (experiments/kernel_resources.py --gates head, bf16, K x V 64 x 64
to 256 x 512) none spills, dqkg peaks at 253 registers (sm_80), and shared
memory is at most the per-channel kernels' (no [C, BK] gate tiles).

Cost of the split against one kernel per chunk: A is written once in the
forward and once in the backward and read by output and dv (C float32 per
token and head, the size of a bf16 [T, 128] array at C = 64); q, k, g are read
by intra, output / dv and dqkg, and v, do by dqkg and output / dv, each program
reading its own column block, so beyond A the extra traffic is re-reads of the
same chunk's tiles.

Matmuls run as ``tiles.precision_for(q.dtype)`` says: IEEE float32 for float32
inputs (TF32 would miss the float32 tolerance); for bf16 / f16 inputs every
data matmul takes its operands in that dtype with float32 accumulation (the
tensor cores' full 16-bit rate, no TF32): v and do enter as loaded (dqkg's do
scaled first), and the float32 factors (q exp(b), the decayed keys, A and the
states) are rounded to it where they enter, as flash-linear-attention does
(about 0.3% relative RMS error, measured against the 1e-2 bf16 rows). One
exception, for registers: dqkg's products of the [16, 16] dA blocks with the
decayed q and k take float32 operands at TF32 (see there). Gate sums are
always IEEE float32.

Head shapes: K up to 256 and V up to 512 (``kernel_shapes``); every kernel
takes V in blocks (a grid axis or dqkg's loop), so V = 512 adds programs or
loop steps, not live tiles. Registers, spills and shared memory at those
shapes: experiments/kernel_resources.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lsm.ops.common import segments, tiles
from lsm.ops.gla import chunk_tiles, pallas_vjp
from lsm.ops.common import kernel_shapes

# What the kernels take (lsm.ops._dispatch reads it for impl= and "auto"):
# every gate kind (its default ``gates``): per-channel [B, T, H, K] gates, one
# gate per head [B, T, H] read as it is ([C, 1] gate columns), and no gate
# (the api passes [B, T, H] zeros).
ACCEPTS = kernel_shapes.TRITON

_F32 = jnp.float32
SUB = chunk_tiles.SUB


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Per-kernel tile sizes and Triton launch options.

  bk, bv: key / value columns per tile (grid blocks, or the step of the loop
  over the other head dim inside a program); capped at the padded head dims.
  Chosen by compiling each kernel to cubin for sm_80 and sm_90a (PyPI triton
  3.9.0 + ptxas, K = V = 64 and 128, bf16, chunk 64) and taking a setting
  without spills on either; rechecked at K 256 x V 256 and 512 with 16-bit
  matmul operands (experiments/kernel_resources.py). Two effects dominate:
  an IEEE float32 matmul (the
  gate prefix and suffix sums, ``tiles.HIGHEST``) runs on FMA units, and each
  thread then holds its operands' whole contraction dimension in registers;
  and on sm_80 (mma.sync, no wgmma) a warp holds its share of both float32
  operands of a tensor-core matmul in registers too. Past about 255 registers
  ptxas -O3 gives up and compiles for 32 registers with kilobytes of spills,
  so settings near the edge are not safe.
  """
  bk: int
  bv: int
  num_warps: int
  num_stages: int

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps,
                                num_stages=self.num_stages)


TILING = {
    # [BV, BK] state blocks of 64 x 32 (8 x B x H programs at K = V = 128); 64
    # key columns with 4 warps spill on sm_80, with 8 warps ptxas falls back.
    "gla_states": Tiling(bk=32, bv=64, num_warps=8, num_stages=2),
    "gla_dstates": Tiling(bk=32, bv=64, num_warps=8, num_stages=2),
    # bk: the step of the loop over key columns; the [16, 16] blocks are tiny.
    "gla_intra": Tiling(bk=64, bv=64, num_warps=8, num_stages=2),
    # bv: grid block; bk: loop step. A 16-wide step keeps the [C, C] x [C, BK]
    # IEEE cumsum and the [BV, BK] float32 state slice small.
    "gla_output": Tiling(bk=16, bv=64, num_warps=4, num_stages=2),
    # float32 inputs (output, dv): V blocks of 32. With 64, output spilled
    # 1.8-2.0 KB on sm_80 with documents (0.6 KB without), dv 1.5 KB on both
    # targets at K = 256 with documents.
    "gla_output_f32": Tiling(bk=16, bv=32, num_warps=4, num_stages=2),
    "gla_dv": Tiling(bk=16, bv=64, num_warps=4, num_stages=2),
    "gla_dv_f32": Tiling(bk=16, bv=32, num_warps=4, num_stages=2),
    # bk: grid block; bv: loop step. Many [16, x] sub-chunk tiles are live
    # across the intra-chunk part; 64 key columns spill on both archs.
    "gla_dqkg": Tiling(bk=32, bv=32, num_warps=8, num_stages=2),
    # float32 inputs (IEEE matmuls on FMA units): a 16-wide V step. With 32,
    # sm_80 spilled 2.4-2.6 KB at every head shape (1.8 KB with head gates).
    "gla_dqkg_f32": Tiling(bk=32, bv=16, num_warps=8, num_stages=2),
}


def _whole_time_spec(Tp, width, which):
  """All of T for one (b, h), column block from grid axis ``which`` (2 or 3)."""
  if which == 2:
    return pl.BlockSpec((None, Tp, None, width), lambda b, h, x, y: (b, 0, h, x))
  return pl.BlockSpec((None, Tp, None, width), lambda b, h, x, y: (b, 0, h, y))


def _doc_specs(C, docs, *, whole_time=None, rows=True):
  """BlockSpecs of ``segments.kernel_docs`` (cols [B, Tp, 1], rows
  [B, N, 1, C]) for grids (B, H, N, ...): chunk n's [C, 1] column and [1, C]
  row, or (``whole_time=Tp``, for the sequential kernels) the whole [Tp, 1]
  column. [] without documents."""
  if docs is None:
    return []
  if whole_time is not None:
    return [pl.BlockSpec((None, whole_time, 1), lambda b, *_: (b, 0, 0))]
  specs = [pl.BlockSpec((None, C, 1), lambda b, h, n, *_: (b, n, 0))]
  if rows:
    specs.append(pl.BlockSpec((None, None, 1, C), lambda b, h, n, *_: (b, n, 0, 0)))
  return specs


def _doc_args(docs, rows=True):
  return [] if docs is None else list(docs if rows else docs[:1])


def _states_kernel(k_ref, v_ref, g_ref, h0_ref, *refs, C, N, prec, n_docs):
  col_ref = refs[0] if n_docs else None
  hin_ref, ht_ref = refs[n_docs:]

  def body(n, st):
    hin_ref[n] = st  # [BV, BK]
    t0 = pl.multiple_of(n * C, C)
    b_k = k_ref[pl.ds(t0, C), :].astype(_F32)  # [C, BK]
    b_v = v_ref[pl.ds(t0, C), :]  # [C, BV], input dtype (a matmul operand)
    b_g = g_ref[pl.ds(t0, C), :]  # [C, BK], or [C, 1] (head gates)
    docs = (None if col_ref is None else
            segments.DocTiles(col_ref, chunk=C, sub=SUB, start=t0))
    return chunk_tiles.state_update(b_k, b_v, b_g, st, prec, docs)

  ht_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...])


def _state_pass(kernel, a, b, g, h_last, *, docs, chunk_size, interpret, name):
  """Shared launch of the two sequential kernels: inputs a [.., K], b [.., V],
  g [.., K]; h_last [B, H, V, K]; docs (``pallas_vjp``). Returns per-chunk
  states [B, H, N, V, K] and the state after the loop."""
  B, Tp, H, Kp = a.shape
  Vp = b.shape[-1]
  N = Tp // chunk_size
  tiling = TILING[name]
  BK, BV = min(Kp, tiling.bk), min(Vp, tiling.bv)
  state_spec = pl.BlockSpec((None, None, BV, BK), lambda b_, h, iv, ik: (b_, h, iv, ik))
  if _head_gates(g):  # the [Tp, 1] gate column of (b, h), for every block
    g_spec = pl.BlockSpec((None, Tp, None, 1), lambda b_, h, iv, ik: (b_, 0, h, 0))
  else:
    g_spec = _whole_time_spec(Tp, BK, 3)
  return pl.pallas_call(
      functools.partial(kernel, C=chunk_size, N=N,
                        prec=tiles.precision_for(a.dtype),
                        n_docs=len(_doc_args(docs, rows=False))),
      grid=(B, H, Vp // BV, Kp // BK),
      in_specs=[_whole_time_spec(Tp, BK, 3), _whole_time_spec(Tp, BV, 2),
                g_spec, state_spec,
                *_doc_specs(chunk_size, docs, whole_time=Tp)],
      out_specs=[pl.BlockSpec((None, None, N, BV, BK),
                              lambda b_, h, iv, ik: (b_, h, 0, iv, ik)),
                 state_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, N, Vp, Kp), _F32),
                 jax.ShapeDtypeStruct((B, H, Vp, Kp), _F32)],
      compiler_params=tiling.params(), interpret=interpret, name=name,
  )(a, b, g, h_last, *_doc_args(docs, rows=False))


def _head_gates(g) -> bool:
  """Whether ``g`` holds one gate per head ([B, T, H, 1], see ``pallas_vjp``)."""
  return g.shape[-1] == 1


def _gate_spec(C, g):
  """[C, 1] head-gate column at chunk n, or the whole [C, K] gate tile."""
  return _chunk_spec(C, g.shape[-1])


def _cols(i, width):
  """Columns i * width .. of a ref; i may be a loop index."""
  return pl.ds(pl.multiple_of(i * width, width), width)


def _sub_rows(C):
  return [pl.ds(i * SUB, SUB) for i in range(C // SUB)]


def _chunk_spec(C, width, col_axis=None):
  """[C, width] tile at chunk n of a [B, T, H, D] array, for grids
  (B, H, N[, X]); the column block comes from grid axis ``col_axis`` (3) or is
  the only one."""
  if col_axis is None:
    return pl.BlockSpec((None, C, None, width), lambda b, h, n, *_: (b, n, h, 0))
  return pl.BlockSpec((None, C, None, width), lambda b, h, n, x: (b, n, h, x))


def _intra_kernel(q_ref, k_ref, g_ref, *refs, C, BK, prec, n_docs):
  docs, (a_ref,) = segments.doc_tiles(refs, n_docs, chunk=C, sub=SUB)
  rows = _sub_rows(C)
  n = len(rows)

  head = g_ref.shape[-1] == 1
  gs = [g_ref[r, :] for r in rows] if head else None  # [16, 1]: every block's

  def body(ik, a):
    cols = _cols(ik, BK)
    load = lambda ref: [ref[r, cols].astype(_F32) for r in rows]  # [16, BK]
    part = chunk_tiles.intra_weights(load(q_ref), load(k_ref),
                                     gs if head else load(g_ref), prec)
    return {key: a[key] + part[key] for key in a}

  zero = jnp.zeros((SUB, SUB), _F32)
  a = jax.lax.fori_loop(0, q_ref.shape[-1] // BK, body,
                        {(i, j): zero for i in range(n) for j in range(i + 1)})
  if docs is not None:  # pairs in one document only
    a = {(i, j): jnp.where(docs.same(i, j), x, 0.0) for (i, j), x in a.items()}
  for i in range(n):
    for j in range(n):
      a_ref[rows[i], rows[j]] = a[(i, j)] if j <= i else zero  # [16, 16]


def _intra(q, k, g, *, docs, chunk_size, interpret):
  """A [B, T, H, C] float32: row t holds the chunk's weights A_ts (zero for
  s > t, and with documents for s in another one), summed over key blocks of
  BK inside the program."""
  B, Tp, H, Kp = q.shape
  C = chunk_size
  kspec = _chunk_spec(C, Kp)
  return pl.pallas_call(
      functools.partial(_intra_kernel, C=C, BK=min(Kp, TILING["gla_intra"].bk),
                        prec=tiles.precision_for(q.dtype),
                        n_docs=len(_doc_args(docs))),
      grid=(B, H, Tp // C),
      in_specs=[kspec, kspec, _gate_spec(C, g), *_doc_specs(C, docs)],
      out_specs=_chunk_spec(C, C),
      out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), _F32),
      compiler_params=TILING["gla_intra"].params(), interpret=interpret,
      name="gla_intra",
  )(q, k, g, *_doc_args(docs))


def _output_kernel(q_ref, g_ref, v_ref, a_ref, hin_ref, *refs, BK, scale, prec,
                   n_docs):
  C = q_ref.shape[0]
  docs, (o_ref,) = segments.doc_tiles(refs, n_docs, chunk=C, sub=SUB)

  # Head gates: one decay exp(b_t) per token, [C, 1], for every key block.
  head = g_ref.shape[-1] == 1
  dec = jnp.exp(chunk_tiles.cumsum_rows(g_ref[...])) if head else None

  def body(ik, o):
    cols = _cols(ik, BK)
    b_q = q_ref[:, cols].astype(_F32)  # [C, BK]
    b_st = hin_ref[:, cols]  # [BV, BK]
    if head:
      return o + tiles.mm_nt(b_q * dec, b_st, prec)
    b_g = g_ref[:, cols]  # [C, BK]
    b = tiles.cumsum_rows(b_g, tiles.HIGHEST)
    return o + tiles.mm_nt(b_q * jnp.exp(b), b_st, prec)

  b_a = a_ref[...]  # [C, C]
  b_v = v_ref[...]  # [C, BV], input dtype
  if docs is None:
    o = jax.lax.fori_loop(0, q_ref.shape[-1] // BK, body, tiles.mm(b_a, b_v, prec))
  else:  # the incoming state reaches the tokens before the first reset only
    o_state = jax.lax.fori_loop(0, q_ref.shape[-1] // BK, body,
                                jnp.zeros(o_ref.shape, _F32))
    o = tiles.mm(b_a, b_v, prec) + segments.cut(docs.carry_all(), o_state)
  o_ref[...] = (scale * o).astype(o_ref.dtype)


def forward(q, k, v, g, h0t, *, docs, scale, chunk_size, interpret):
  h_in, h_tt = _state_pass(_states_kernel, k, v, g, h0t, docs=docs,
                           chunk_size=chunk_size, interpret=interpret,
                           name="gla_states")
  a = _intra(q, k, g, docs=docs, chunk_size=chunk_size, interpret=interpret)
  B, Tp, H, Kp = q.shape
  Vp = v.shape[-1]
  tiling = TILING["gla_output_f32" if q.dtype == _F32 else "gla_output"]
  C, BV = chunk_size, min(Vp, tiling.bv)
  kspec = _chunk_spec(C, Kp)
  gspec = _gate_spec(C, g)
  o = pl.pallas_call(
      functools.partial(_output_kernel, BK=min(Kp, tiling.bk), scale=scale,
                        prec=tiles.precision_for(q.dtype),
                        n_docs=len(_doc_args(docs, rows=False))),
      grid=(B, H, Tp // C, Vp // BV),
      in_specs=[kspec, gspec, _chunk_spec(C, BV, 3), _chunk_spec(C, C),
                pl.BlockSpec((None, None, None, BV, Kp),
                             lambda b, h, n, iv: (b, h, n, iv, 0)),
                *_doc_specs(C, docs, rows=False)],
      out_specs=_chunk_spec(C, BV, 3),
      out_shape=jax.ShapeDtypeStruct((B, Tp, H, Vp), q.dtype),
      compiler_params=tiling.params(), interpret=interpret, name="gla_output",
  )(q, g, v, a, h_in, *_doc_args(docs, rows=False))
  return o, h_tt


def states(k, v, g, h0t, *, docs, scale, chunk_size, interpret):
  del scale
  return _state_pass(_states_kernel, k, v, g, h0t, docs=docs,
                     chunk_size=chunk_size, interpret=interpret,
                     name="gla_states")[0]


def _dstates_kernel(q_ref, do_ref, g_ref, dht_ref, *refs, C, N, prec, scale,
                    n_docs):
  col_ref = refs[0] if n_docs else None
  dout_ref, dh0_ref = refs[n_docs:]

  def body(i, dst):
    n = N - 1 - i
    dout_ref[n] = dst  # [BV, BK]
    t0 = pl.multiple_of(n * C, C)
    # scale (q exp(b))^T do: the scale goes on the float32 q side, which is
    # rounded where it enters the product anyway, and do enters as loaded.
    b_q = scale * q_ref[pl.ds(t0, C), :].astype(_F32)  # [C, BK]
    b_do = do_ref[pl.ds(t0, C), :]  # [C, BV]
    b_g = g_ref[pl.ds(t0, C), :]  # [C, BK], or [C, 1] (head gates)
    docs = (None if col_ref is None else
            segments.DocTiles(col_ref, chunk=C, sub=SUB, start=t0))
    return chunk_tiles.state_grad_update(b_q, b_do, b_g, dst, prec, docs)

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dht_ref[...])


def dstates(q, do, g, dh_tt, *, docs, scale, chunk_size, interpret):
  return _state_pass(functools.partial(_dstates_kernel, scale=scale), q, do, g,
                     dh_tt, docs=docs, chunk_size=chunk_size,
                     interpret=interpret, name="gla_dstates")


def _dv_kernel(k_ref, g_ref, do_ref, a_ref, dout_ref, *refs, BK, scale, prec,
               n_docs):
  C = k_ref.shape[0]
  docs, (dv_ref,) = segments.doc_tiles(refs, n_docs, chunk=C, sub=SUB)

  # Head gates: one decay to the chunk end per token, [C, 1].
  head = g_ref.shape[-1] == 1
  dec = jnp.exp(chunk_tiles.suffix_sum_rows(g_ref[...])) if head else None

  def body(ik, dv):
    cols = _cols(ik, BK)
    b_k = k_ref[:, cols].astype(_F32)  # [C, BK]
    b_dst = dout_ref[:, cols]  # [BV, BK]
    if head:
      return dv + tiles.mm_nt(b_k * dec, b_dst, prec)
    b_g = g_ref[:, cols]  # [C, BK]
    to_end = tiles.suffix_sum_rows(b_g, tiles.HIGHEST)
    return dv + tiles.mm_nt(b_k * jnp.exp(to_end), b_dst, prec)

  b_a = scale * a_ref[...]  # [C, C]: the scale on the float32 side
  b_do = do_ref[...]  # [C, BV], input dtype
  if docs is None:
    dv = jax.lax.fori_loop(0, k_ref.shape[-1] // BK, body,
                           tiles.mm_tn(b_a, b_do, prec))
  else:  # only the last document's values reach the state leaving the chunk
    dv_state = jax.lax.fori_loop(0, k_ref.shape[-1] // BK, body,
                                 jnp.zeros(dv_ref.shape, _F32))
    dv = tiles.mm_tn(b_a, b_do, prec) + segments.cut(docs.tail_all(), dv_state)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqkg_kernel(q_ref, k_ref, g_ref, v_ref, do_ref, hin_ref, dout_ref, *refs, C,
                 BV, scale, prec, n_docs):
  docs, (dq_ref, dk_ref, dg_ref) = segments.doc_tiles(refs, n_docs, chunk=C,
                                                      sub=SUB)
  rows = _sub_rows(C)
  n = len(rows)

  def body(iv, carry):
    da, da_tt, dq_st, dk_st, leaving = carry
    cols = _cols(iv, BV)
    # v as loaded; do scaled in float32 and rounded back to the input dtype
    # where it enters a product (scaling the loop's results instead, after the
    # loop, cost 64 B more sm_90a spills at K = V = 128).
    vs = [v_ref[r, cols] for r in rows]  # [16, BV]
    dos = [scale * do_ref[r, cols].astype(_F32) for r in rows]  # [16, BV]
    b_st = hin_ref[cols, :]  # [BV, BK]
    b_dst = dout_ref[cols, :]  # [BV, BK]
    da = {(i, j): x + tiles.mm_nt(dos[i], vs[j], prec) for (i, j), x in da.items()}
    da_tt = [x + jnp.sum(dos[i] * vs[i].astype(_F32), axis=1, keepdims=True)
             for i, x in enumerate(da_tt)]  # [16, 1]
    dq_st = [x + tiles.mm(dos[i], b_st, prec) for i, x in enumerate(dq_st)]
    dk_st = [x + tiles.mm(vs[i], b_dst, prec) for i, x in enumerate(dk_st)]
    leaving = leaving + jnp.sum(b_st * b_dst, axis=0, keepdims=True)
    return da, da_tt, dq_st, dk_st, leaving

  BK = q_ref.shape[-1]
  zero_da, zero_k = jnp.zeros((SUB, SUB), _F32), jnp.zeros((SUB, BK), _F32)
  init = ({(i, j): zero_da for i in range(n) for j in range(i + 1)},
          [jnp.zeros((SUB, 1), _F32)] * n, [zero_k] * n, [zero_k] * n,
          jnp.zeros((1, BK), _F32))
  da, da_tt, dq_st, dk_st, leaving = jax.lax.fori_loop(
      0, v_ref.shape[-1] // BV, body, init)
  if docs is not None:  # the forward's cuts, on each term's gradient
    da = {(i, j): jnp.where(docs.same(i, j), x, 0.0) for (i, j), x in da.items()}
    dq_st = [segments.cut(docs.carry(i), x) for i, x in enumerate(dq_st)]
    dk_st = [segments.cut(docs.tail(i), x) for i, x in enumerate(dk_st)]
    leaving = segments.cut(docs.carry_out(), leaving)

  qs, ks, gs = (chunk_tiles.load_sub_blocks(r, n) for r in (q_ref, k_ref, g_ref))
  sums = chunk_tiles.GateSums(gs)
  # The intra-chunk products of dA ([16, 16] blocks) with the decayed q and k
  # take float32 operands (TF32 for 16-bit inputs): with 16-bit operands this
  # kernel, already at 255 registers, spilled 92 B on sm_90a at K = V = 128
  # (ptxas, experiments/kernel_resources.py), and none with these; every
  # product in the loop above takes its operands in the input dtype.
  intra_prec = prec if prec.dtype == _F32 else tiles.DEFAULT
  dq, dk = chunk_tiles.intra_grads(sums, qs, ks, da, intra_prec)
  dq = [dq[i] + dq_st[i] * (jnp.exp(sums.z[i]) * jnp.exp(sums.before(i)))
        for i in range(n)]
  dq, dk, dg = chunk_tiles.finish_grads(sums, qs, ks, dq, dk, dk_st, da_tt,
                                        leaving)
  for i, r in enumerate(rows):
    dq_ref[r, :] = dq[i].astype(dq_ref.dtype)  # [16, BK]
    dk_ref[r, :] = dk[i].astype(dk_ref.dtype)
    dg_ref[r, :] = dg[i]  # [16, BK], or [16, 1]: this key block's share


def grads(q, k, v, g, do, h_in, dh_out, *, docs, scale, chunk_size, interpret):
  B, Tp, H, Kp = q.shape
  Vp = v.shape[-1]
  C = chunk_size
  prec = tiles.precision_for(q.dtype)
  a = _intra(q, k, g, docs=docs, chunk_size=C, interpret=interpret)
  kspec = _chunk_spec(C, Kp)
  t_dv = TILING["gla_dv_f32" if q.dtype == _F32 else "gla_dv"]
  t_dqkg = TILING["gla_dqkg_f32" if q.dtype == _F32 else "gla_dqkg"]
  BV = min(Vp, t_dv.bv)
  dv = pl.pallas_call(
      functools.partial(_dv_kernel, BK=min(Kp, t_dv.bk), scale=scale, prec=prec,
                        n_docs=len(_doc_args(docs, rows=False))),
      grid=(B, H, Tp // C, Vp // BV),
      in_specs=[kspec, _gate_spec(C, g), _chunk_spec(C, BV, 3),
                _chunk_spec(C, C),
                pl.BlockSpec((None, None, None, BV, Kp),
                             lambda b, h, n, iv: (b, h, n, iv, 0)),
                *_doc_specs(C, docs, rows=False)],
      out_specs=_chunk_spec(C, BV, 3),
      out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
      compiler_params=t_dv.params(), interpret=interpret, name="gla_dv",
  )(k, g, do, a, dh_out, *_doc_args(docs, rows=False))
  BK = min(Kp, t_dqkg.bk)
  kblock = _chunk_spec(C, BK, 3)
  vspec = _chunk_spec(C, Vp)
  head = _head_gates(g)
  # Head gates: each of the Kp / BK programs of a chunk writes its key block's
  # share of dg as one column of [B, Tp, H, Kp / BK]; the shares add up below
  # (Kp / BK float32 per token and head: 4 at K = 128, never K-wide).
  gspec = _gate_spec(C, g) if head else kblock
  dg_spec = _chunk_spec(C, 1, 3) if head else kblock
  dg_shape = (B, Tp, H, Kp // BK) if head else q.shape
  sspec = pl.BlockSpec((None, None, None, Vp, BK),
                       lambda b, h, n, ik: (b, h, n, 0, ik))
  dq, dk, dg = pl.pallas_call(
      functools.partial(_dqkg_kernel, C=C, BV=min(Vp, t_dqkg.bv), scale=scale,
                        prec=prec, n_docs=len(_doc_args(docs))),
      grid=(B, H, Tp // C, Kp // BK),
      in_specs=[kblock, kblock, gspec, vspec, vspec, sspec, sspec,
                *_doc_specs(C, docs)],
      out_specs=[kblock, kblock, dg_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(dg_shape, _F32)],
      compiler_params=t_dqkg.params(), interpret=interpret,
      name="gla_dqkg",
  )(q, k, g, v, do, h_in, dh_out, *_doc_args(docs))
  if head:
    dg = jnp.sum(dg, axis=-1, keepdims=True)  # [B, Tp, H, 1]
  return dq, dk, dv, dg


gla = pallas_vjp.make_gla(forward=forward, states=states, dstates=dstates,
                          grads=grads)
