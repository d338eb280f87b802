r"""GLA as Pallas kernels for TPUs (Mosaic). The recurrence is defined in
``reference.py``; the per-chunk math is in ``chunk_tiles.py`` (the same code the
GPU kernels run) and the custom VJP in ``pallas_vjp.py`` (which also says why the
backward recomputes states).

Layout. Mosaic wants each block's last two dims to be whole (8, 128)-tiles or
the full array dims, so a [C, D] tile of a [B, T, H, D] array (H squeezed
between them) is not a legal block. The launchers move H ahead of T
([B, H, T, D]) and back; taking that layout from the layer directly would save
those copies and is the next step once a TPU is at hand to measure it.

Kernels. The TPU grid runs in order on each core, so the sequential passes are
grids over (B, H, N) with the chunk axis "arbitrary" and the [V, K] float32
state carried in VMEM scratch; the parallel passes mark every axis "parallel".

  forward  (B, H, N), N sequential: o of each chunk from the carried state, then
           the state update; h_T written after the last chunk. One kernel: the
           TPU gains nothing from splitting states and outputs, unlike the GPU.
  states   (B, H, N), N sequential: the state entering every chunk (backward).
  dstates  (B, H, N), N sequential in reverse (index maps count down): the
           gradient for the state leaving every chunk, and dh0.
  grads    (B, H, N) parallel: dq, dk, dv and d log_g of one chunk.

Gates. Per-channel gates come as [C, K] tiles; one gate per head as a [C, 1]
column of a [B, H, T, 1] array (the [B, T, H] gate as the op received it,
reshaped and moved heads-first like the other inputs: T float32 per head, not
T * K), and its gradient leaves grads as the same [C, 1] column, summed over K
inside the kernel (``chunk_tiles.finish_grads``). The [C, 1] block is legal
for Mosaic (last dim the full array dim, C a multiple of 8), as are the
document columns beside it.

Matmuls run as ``tiles.precision_for(q.dtype)`` says (full float32 for float32
inputs; bf16 / f16 operands with float32 accumulation otherwise, which is what
the MXU's default pass did with float32 operands anyway); gate sums always in
float32. Head shapes up to K 256 x V 512: whole [V, K] float32 states per
program (512 KiB at that shape, a few MiB of VMEM with double buffering).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lsm.ops.common import segments, tiles
from lsm.ops.gla import chunk_tiles, pallas_vjp
from lsm.ops.common import kernel_shapes

# What the kernels take (lsm.ops._dispatch reads it for impl= and "auto"):
# every gate kind (its default ``gates``): per-channel [B, T, H, K] gates, one
# gate per head [B, T, H] read as it is ([C, 1] gate columns), and no gate
# (the api passes [B, T, H] zeros).
ACCEPTS = kernel_shapes.TPU

_F32 = jnp.float32
SUB = chunk_tiles.SUB


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


_SEQUENTIAL = _params("parallel", "parallel", "arbitrary")
_PARALLEL = _params("parallel", "parallel", "parallel")


def _heads_first(x):
  return jnp.swapaxes(x, 1, 2)  # [B, T, H, D] <-> [B, H, T, D]


def _chunk_spec(C, D, *, reverse_of=None):
  """[C, D] tile of a [B, H, T, D] array at chunk n (or N - 1 - n)."""
  if reverse_of is None:
    return pl.BlockSpec((None, None, C, D), lambda b, h, n: (b, h, n, 0))
  N = reverse_of
  return pl.BlockSpec((None, None, C, D), lambda b, h, n: (b, h, N - 1 - n, 0))


def _state_spec(Vp, Kp):
  """One [V, K] state per (b, h), resident across the chunk axis."""
  return pl.BlockSpec((None, None, Vp, Kp), lambda b, h, n: (b, h, 0, 0))


def _per_chunk_state_spec(Vp, Kp, *, reverse_of=None):
  if reverse_of is None:
    return pl.BlockSpec((None, None, None, Vp, Kp), lambda b, h, n: (b, h, n, 0, 0))
  N = reverse_of
  return pl.BlockSpec((None, None, None, Vp, Kp),
                      lambda b, h, n: (b, h, N - 1 - n, 0, 0))


def _doc_specs(C, N, docs, *, reverse=False, rows=True):
  """BlockSpecs of ``segments.kernel_docs`` (cols [B, Tp, 1], rows
  [B, N, 1, C]) at chunk n (or N - 1 - n) of a (B, H, N) grid; [] without
  documents."""
  if docs is None:
    return []
  at = (lambda n: N - 1 - n) if reverse else (lambda n: n)  # noqa: E731
  specs = [pl.BlockSpec((None, C, 1), lambda b, h, n: (b, at(n), 0))]
  if rows:
    specs.append(pl.BlockSpec((None, None, 1, C), lambda b, h, n: (b, at(n), 0, 0)))
  return specs


def _doc_args(docs, rows=True):
  return [] if docs is None else list(docs if rows else docs[:1])


def _doc_tiles(refs, n_docs, C):
  return segments.doc_tiles(refs, n_docs, chunk=C, sub=SUB)


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, *refs, C, scale, prec,
                    n_docs):
  docs, (o_ref, ht_ref, st_ref) = _doc_tiles(refs, n_docs, C)
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    st_ref[...] = h0_ref[...]

  n_sub = C // SUB
  ks = chunk_tiles.load_sub_blocks(k_ref, n_sub)  # [16, K] each
  vs = chunk_tiles.load_sub_blocks(v_ref, n_sub)  # [16, V] each
  gs = chunk_tiles.load_sub_blocks(g_ref, n_sub)
  st = st_ref[...]  # [V, K]
  (outs,) = chunk_tiles.chunk_output(chunk_tiles.load_sub_blocks(q_ref, n_sub),
                                     ks, gs, [(vs, st)], prec, docs)
  for i, o in enumerate(outs):
    o_ref[pl.ds(i * SUB, SUB), :] = (scale * o).astype(o_ref.dtype)
  st = chunk_tiles.state_update(k_ref[...].astype(_F32), v_ref[...].astype(_F32),
                                g_ref[...], st, prec, docs)
  st_ref[...] = st

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    ht_ref[...] = st


def forward(q, k, v, g, h0t, *, docs, scale, chunk_size, interpret):
  q, k, v, g = (_heads_first(x) for x in (q, k, v, g))
  B, H, Tp, Kp = q.shape
  Vp = v.shape[-1]
  C = chunk_size
  o, h_tt = pl.pallas_call(
      functools.partial(_forward_kernel, C=C, scale=scale,
                        prec=tiles.precision_for(q.dtype),
                        n_docs=len(_doc_args(docs))),
      grid=(B, H, Tp // C),
      in_specs=[_chunk_spec(C, Kp), _chunk_spec(C, Kp), _chunk_spec(C, Vp),
                _chunk_spec(C, g.shape[-1]), _state_spec(Vp, Kp),
                *_doc_specs(C, Tp // C, docs)],
      out_specs=[_chunk_spec(C, Vp), _state_spec(Vp, Kp)],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, Vp), q.dtype),
                 jax.ShapeDtypeStruct((B, H, Vp, Kp), _F32)],
      scratch_shapes=[pltpu.VMEM((Vp, Kp), _F32)],
      compiler_params=_SEQUENTIAL, interpret=interpret, name="gla_forward_tpu",
  )(q, k, v, g, h0t, *_doc_args(docs))
  return _heads_first(o), h_tt


def _states_kernel(k_ref, v_ref, g_ref, h0_ref, *refs, C, prec, n_docs):
  docs, (hin_ref, st_ref) = _doc_tiles(refs, n_docs, C)

  @pl.when(pl.program_id(2) == 0)
  def _():
    st_ref[...] = h0_ref[...]

  st = st_ref[...]  # [V, K]
  hin_ref[...] = st
  st_ref[...] = chunk_tiles.state_update(k_ref[...].astype(_F32),
                                         v_ref[...].astype(_F32), g_ref[...], st,
                                         prec, docs)


def states(k, v, g, h0t, *, docs, scale, chunk_size, interpret):
  del scale
  k, v, g = (_heads_first(x) for x in (k, v, g))
  B, H, Tp, Kp = k.shape
  Vp = v.shape[-1]
  C, N = chunk_size, Tp // chunk_size
  return pl.pallas_call(
      functools.partial(_states_kernel, C=C, prec=tiles.precision_for(k.dtype),
                        n_docs=len(_doc_args(docs, rows=False))),
      grid=(B, H, N),
      in_specs=[_chunk_spec(C, Kp), _chunk_spec(C, Vp),
                _chunk_spec(C, g.shape[-1]), _state_spec(Vp, Kp),
                *_doc_specs(C, N, docs, rows=False)],
      out_specs=_per_chunk_state_spec(Vp, Kp),
      out_shape=jax.ShapeDtypeStruct((B, H, N, Vp, Kp), _F32),
      scratch_shapes=[pltpu.VMEM((Vp, Kp), _F32)],
      compiler_params=_SEQUENTIAL, interpret=interpret, name="gla_states_tpu",
  )(k, v, g, h0t, *_doc_args(docs, rows=False))


def _dstates_kernel(q_ref, do_ref, g_ref, dht_ref, *refs, C, scale, prec,
                    n_docs):
  docs, (dout_ref, dh0_ref, dst_ref) = _doc_tiles(refs, n_docs, C)

  @pl.when(pl.program_id(2) == 0)
  def _():
    dst_ref[...] = dht_ref[...]

  dst = dst_ref[...]  # [V, K]
  dout_ref[...] = dst
  dst = chunk_tiles.state_grad_update(q_ref[...].astype(_F32),
                                      scale * do_ref[...].astype(_F32), g_ref[...],
                                      dst, prec, docs)
  dst_ref[...] = dst

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = dst


def dstates(q, do, g, dh_tt, *, docs, scale, chunk_size, interpret):
  q, do, g = (_heads_first(x) for x in (q, do, g))
  B, H, Tp, Kp = q.shape
  Vp = do.shape[-1]
  C, N = chunk_size, Tp // chunk_size
  return pl.pallas_call(
      functools.partial(_dstates_kernel, C=C, scale=scale,
                        prec=tiles.precision_for(q.dtype),
                        n_docs=len(_doc_args(docs, rows=False))),
      grid=(B, H, N),
      in_specs=[_chunk_spec(C, Kp, reverse_of=N), _chunk_spec(C, Vp, reverse_of=N),
                _chunk_spec(C, g.shape[-1], reverse_of=N), _state_spec(Vp, Kp),
                *_doc_specs(C, N, docs, reverse=True, rows=False)],
      out_specs=[_per_chunk_state_spec(Vp, Kp, reverse_of=N), _state_spec(Vp, Kp)],
      out_shape=[jax.ShapeDtypeStruct((B, H, N, Vp, Kp), _F32),
                 jax.ShapeDtypeStruct((B, H, Vp, Kp), _F32)],
      scratch_shapes=[pltpu.VMEM((Vp, Kp), _F32)],
      compiler_params=_SEQUENTIAL, interpret=interpret, name="gla_dstates_tpu",
  )(q, do, g, dh_tt, *_doc_args(docs, rows=False))


def _grads_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, hin_ref, dout_ref, *refs,
                  C, scale, prec, n_docs):
  docs, (dq_ref, dk_ref, dv_ref, dg_ref) = _doc_tiles(refs, n_docs, C)
  n_sub = C // SUB
  load = functools.partial(chunk_tiles.load_sub_blocks, n_sub=n_sub)
  dos = [scale * d for d in load(do_ref)]
  # One block of value columns: VMEM holds a whole [V, K] state pair easily.
  dq, dk, dg, (dv,) = chunk_tiles.chunk_grads(
      load(q_ref), load(k_ref), load(g_ref),
      [(load(v_ref), dos, hin_ref[...], dout_ref[...])], prec, docs)
  for i in range(n_sub):
    rows = pl.ds(i * SUB, SUB)
    dq_ref[rows, :] = dq[i].astype(dq_ref.dtype)  # [16, K]
    dk_ref[rows, :] = dk[i].astype(dk_ref.dtype)
    dv_ref[rows, :] = dv[i].astype(dv_ref.dtype)  # [16, V]
    dg_ref[rows, :] = dg[i]  # [16, K], or [16, 1] (head gates, summed over K)


def grads(q, k, v, g, do, h_in, dh_out, *, docs, scale, chunk_size, interpret):
  q, k, v, g, do = (_heads_first(x) for x in (q, k, v, g, do))
  B, H, Tp, Kp = q.shape
  Vp = v.shape[-1]
  C = chunk_size
  kspec, vspec = _chunk_spec(C, Kp), _chunk_spec(C, Vp)
  gspec = _chunk_spec(C, g.shape[-1])  # [C, K], or [C, 1] (head gates)
  sspec = _per_chunk_state_spec(Vp, Kp)
  out = pl.pallas_call(
      functools.partial(_grads_kernel, C=C, scale=scale,
                        prec=tiles.precision_for(q.dtype),
                        n_docs=len(_doc_args(docs))),
      grid=(B, H, Tp // C),
      in_specs=[kspec, kspec, vspec, gspec, vspec, sspec, sspec,
                *_doc_specs(C, Tp // C, docs)],
      out_specs=[kspec, kspec, vspec, gspec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(g.shape, _F32)],
      compiler_params=_PARALLEL, interpret=interpret, name="gla_grads_tpu",
  )(q, k, v, g, do, h_in, dh_out, *_doc_args(docs))
  return tuple(_heads_first(x) for x in out)


gla = pallas_vjp.make_gla(forward=forward, states=states, dstates=dstates,
                          grads=grads)
