r"""The (gated) delta rule as Pallas kernels for TPUs (Mosaic).

The recurrence is defined in ``reference.py``, the chunkwise UT / WY form in
``chunked.py``; the per-chunk tile math is ``chunk_tiles.py`` (shared with
``pallas_triton.py``) and the padding, layout and custom VJP are
``pallas_vjp.py``. Inputs arrive as [BH, T, D] (batch and heads merged, time
padded to whole chunks), so every block's last two dims are (chunk, D) or
(K, V); per-token scalars are (chunk, 1) blocks.

Kernels (BH = batch x heads, N chunks; the whole value dim per program, since a
[256, 512] float32 state, 512 KiB, fits VMEM easily):

  _prepare       grid (BH, N), all "parallel": the chunk's T = (I + L)^{-1}
                 [C, C] float32, stored as t [BH, N C, C].
  _states        grid (BH, N), N "arbitrary" (sequential): the state is carried
                 across chunks in a [Kp, Vp] float32 VMEM scratch; each step
                 stores the state entering its chunk (h_in) and the last step
                 the final state.
  _output        grid (BH, N), all "parallel": o of one chunk from h_in.
  _state_grads   grid (BH, N), N "arbitrary", chunks visited last to first (the
                 index maps read chunk N - 1 - n): stores the cotangent of the
                 state leaving each chunk (dh_out) and returns dh0.
  _input_grads   grid (BH, N), all "parallel": dq, dk, dv, dbeta, d log_g of one
                 chunk (``jax.vjp`` of the tile math inside the kernel, the
                 closed-form VJP of the inverse on the loaded T).

Recompute vs store: T is computed once per chunk by _prepare and loaded by the
other four kernels ([C, C] float32 per chunk, a small DMA next to the chunk's
q, k, v tiles) rather than recomputed in each: the inverse is 19 dependent
[C, C] x [C, C] matmuls at HIGHEST (six MXU passes each), for bf16 inputs more
MXU passes than all the rest of a chunk's work in any one kernel, and in the
sequential kernels it sat on the critical path of the chunk loop. The backward
recomputes T and h_in (see ``pallas_vjp``).

Numerics: matmuls on data run as ``tiles.precision_for(q.dtype)`` says (six
bf16 passes for float32 inputs; bf16/f16 operands, one pass, for bf16/f16
inputs), the inverse always at HIGHEST. Every exponent of a decay is
<= 0. The scratch is written at the first chunk before any read (checked with
``pltpu.InterpretParams()``, which fills uninitialised memory with NaN).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lsm.ops.common import segments, tiles
from lsm.ops.delta_rule import chunk_tiles, pallas_vjp
from lsm.ops.common import kernel_shapes

# What the kernels take (lsm.ops._dispatch reads it for impl= and "auto").
ACCEPTS = kernel_shapes.TPU

_F32 = jnp.float32
_PARALLEL = ("parallel", "parallel")
_SEQUENTIAL = ("parallel", "arbitrary")


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _load(ref):
  return ref[...].astype(_F32)


def _col(docs):
  """The column of ``kernel_docs`` (the TPU kernels take no row), or None."""
  return None if docs is None else docs[:1]


def _masks(doc_ref):
  """The chunk's document masks (``chunk_tiles.gates``), or None."""
  if doc_ref is None:
    return None
  return segments.DocTiles(doc_ref, chunk=doc_ref.shape[0],
                           sub=chunk_tiles.SUB).chunk_masks()


# ---------------------------------------------------------------- kernels ---


def _prepare_kernel(k_ref, beta_ref, g_ref, t_ref, *, precision, doc_ref):
  t_ref[...] = chunk_tiles.chunk_inverse(
      _load(k_ref),  # [C, Kp]
      beta_ref[...], g_ref[...],  # [C, 1]
      precision=precision, masks=_masks(doc_ref))


def _states_kernel(k_ref, v_ref, beta_ref, g_ref, t_ref, h0_ref, h_in_ref,
                   ht_ref, s_ref, *, precision, doc_ref):
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _():
    s_ref[...] = h0_ref[...]

  b_s = s_ref[...]  # [Kp, Vp]
  h_in_ref[...] = b_s
  b_s = chunk_tiles.next_state(
      t_ref[...],  # [C, C]
      b_s, _load(k_ref),  # [C, Kp]
      _load(v_ref),  # [C, Vp]
      beta_ref[...], g_ref[...],  # [C, 1]
      precision=precision, masks=_masks(doc_ref))
  s_ref[...] = b_s

  @pl.when(n == pl.num_programs(1) - 1)
  def _():
    ht_ref[...] = b_s


def _output_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, h_ref, o_ref, *,
                   scale, precision, doc_ref):
  b_o, _ = chunk_tiles.chunk_apply(
      t_ref[...],  # [C, C]
      h_ref[...],  # [Kp, Vp]
      _load(q_ref), _load(k_ref),  # [C, Kp]
      _load(v_ref),  # [C, Vp]
      beta_ref[...], g_ref[...],  # [C, 1]
      scale=scale, precision=precision, masks=_masks(doc_ref))
  o_ref[...] = b_o.astype(o_ref.dtype)


def _state_grads_kernel(q_ref, k_ref, beta_ref, g_ref, t_ref, do_ref, dht_ref,
                        dh_out_ref, dh0_ref, ds_ref, *, scale, precision,
                        doc_ref):
  i = pl.program_id(1)  # chunk N - 1 - i

  @pl.when(i == 0)
  def _():
    ds_ref[...] = dht_ref[...]

  b_ds = ds_ref[...]  # [Kp, Vp]
  dh_out_ref[...] = b_ds
  b_ds = chunk_tiles.state_grad(
      t_ref[...],  # [C, C]
      b_ds, _load(q_ref), _load(k_ref),  # [C, Kp]
      beta_ref[...], g_ref[...],  # [C, 1]
      _load(do_ref),  # [C, Vp]
      scale=scale, precision=precision, masks=_masks(doc_ref))
  ds_ref[...] = b_ds

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    dh0_ref[...] = b_ds


def _input_grads_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, do_ref,
                        h_ref, dh_ref, dq_ref, dk_ref, dv_ref, dbeta_ref,
                        dg_ref, *, scale, precision, doc_ref):
  grads = chunk_tiles.chunk_grads(
      t_ref[...],  # [C, C]
      h_ref[...],  # [Kp, Vp]
      _load(q_ref), _load(k_ref),  # [C, Kp]
      _load(v_ref),  # [C, Vp]
      beta_ref[...], g_ref[...],  # [C, 1]
      _load(do_ref),  # [C, Vp]
      dh_ref[...],  # [Kp, Vp]
      scale=scale, precision=precision, masks=_masks(doc_ref))
  for ref, d in zip((dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref), grads):
    ref[...] = d


# ---------------------------------------------------------------- calls ---


def _specs(Kp, Vp, chunk, *, reverse_n=None):
  """Block specs for a grid (BH, N): one chunk of keys / values / per-token
  scalars, its [C, C] inverse T, its [Kp, Vp] state, and the head's [Kp, Vp]
  state. With ``reverse_n`` = N, grid step n visits chunk N - 1 - n."""
  if reverse_n is None:
    at = lambda n: n
  else:
    at = lambda n: reverse_n - 1 - n
  keys = pl.BlockSpec((None, chunk, Kp), lambda b, n: (b, at(n), 0))
  vals = pl.BlockSpec((None, chunk, Vp), lambda b, n: (b, at(n), 0))
  col = pl.BlockSpec((None, chunk, 1), lambda b, n: (b, at(n), 0))
  inv = pl.BlockSpec((None, chunk, chunk), lambda b, n: (b, at(n), 0))
  state = pl.BlockSpec((None, Kp, Vp), lambda b, n: (b, at(n), 0))
  head = pl.BlockSpec((None, Kp, Vp), lambda b, n: (b, 0, 0))
  return keys, vals, col, inv, state, head


def _dims(q_or_k, v, chunk):
  BH, Tp, Kp = q_or_k.shape
  return BH, Tp, Kp, v.shape[-1], Tp // chunk


def _prepare(k, beta, g, *, docs, chunk, interpret):
  BH, Tp, Kp = k.shape
  keys = pl.BlockSpec((None, chunk, Kp), lambda b, n: (b, n, 0))
  col = pl.BlockSpec((None, chunk, 1), lambda b, n: (b, n, 0))
  inv = pl.BlockSpec((None, chunk, chunk), lambda b, n: (b, n, 0))
  kernel = functools.partial(_prepare_kernel,
                             precision=tiles.precision_for(k.dtype))
  return segments.pallas_call(
      kernel, 3, _col(docs), [keys, col, col], (col,), (k, beta, g),
      grid=(BH, Tp // chunk), out_specs=inv,
      out_shape=jax.ShapeDtypeStruct((BH, Tp, chunk), _F32),
      compiler_params=_params(_PARALLEL), interpret=interpret,
      name="delta_rule_prepare")


def _states(k, v, beta, g, t, h0, *, docs, chunk, interpret):
  BH, _, Kp, Vp, N = _dims(k, v, chunk)
  keys, vals, col, inv, state, head = _specs(Kp, Vp, chunk)
  kernel = functools.partial(_states_kernel,
                             precision=tiles.precision_for(k.dtype))
  return segments.pallas_call(
      kernel, 6, _col(docs), [keys, vals, col, col, inv, head], (col,),
      (k, v, beta, g, t, h0), grid=(BH, N),
      out_specs=[state, head],
      out_shape=[jax.ShapeDtypeStruct((BH, N * Kp, Vp), _F32),
                 jax.ShapeDtypeStruct((BH, Kp, Vp), _F32)],
      scratch_shapes=[pltpu.VMEM((Kp, Vp), _F32)],
      compiler_params=_params(_SEQUENTIAL), interpret=interpret,
      name="delta_rule_states")


def _output(q, k, v, beta, g, t, h_in, *, docs, scale, chunk, interpret):
  BH, Tp, Kp, Vp, N = _dims(q, v, chunk)
  keys, vals, col, inv, state, _ = _specs(Kp, Vp, chunk)
  kernel = functools.partial(_output_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return segments.pallas_call(
      kernel, 7, _col(docs), [keys, keys, vals, col, col, inv, state], (col,),
      (q, k, v, beta, g, t, h_in), grid=(BH, N),
      out_specs=vals,
      out_shape=jax.ShapeDtypeStruct((BH, Tp, Vp), q.dtype),
      compiler_params=_params(_PARALLEL), interpret=interpret,
      name="delta_rule_output")


def _state_grads(q, k, beta, g, t, do, dh_t, *, docs, scale, chunk, interpret):
  BH, _, Kp, Vp, N = _dims(q, do, chunk)
  keys, vals, col, inv, state, head = _specs(Kp, Vp, chunk, reverse_n=N)
  kernel = functools.partial(_state_grads_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return segments.pallas_call(
      kernel, 7, _col(docs), [keys, keys, col, col, inv, vals, head], (col,),
      (q, k, beta, g, t, do, dh_t), grid=(BH, N),
      out_specs=[state, head],
      out_shape=[jax.ShapeDtypeStruct((BH, N * Kp, Vp), _F32),
                 jax.ShapeDtypeStruct((BH, Kp, Vp), _F32)],
      scratch_shapes=[pltpu.VMEM((Kp, Vp), _F32)],
      compiler_params=_params(_SEQUENTIAL), interpret=interpret,
      name="delta_rule_state_grads")


def _input_grads(q, k, v, beta, g, t, do, h_in, dh_out, *, docs, scale, chunk,
                 interpret):
  BH, Tp, Kp, Vp, N = _dims(q, v, chunk)
  keys, vals, col, inv, state, _ = _specs(Kp, Vp, chunk)
  kernel = functools.partial(_input_grads_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return segments.pallas_call(
      kernel, 9, _col(docs), [keys, keys, vals, col, col, inv, vals, state, state],
      (col,), (q, k, v, beta, g, t, do, h_in, dh_out), grid=(BH, N),
      out_specs=[keys, keys, vals, col, col],
      out_shape=[jax.ShapeDtypeStruct((BH, Tp, Kp), _F32),
                 jax.ShapeDtypeStruct((BH, Tp, Kp), _F32),
                 jax.ShapeDtypeStruct((BH, Tp, Vp), _F32),
                 jax.ShapeDtypeStruct((BH, Tp, 1), _F32),
                 jax.ShapeDtypeStruct((BH, Tp, 1), _F32)],
      compiler_params=_params(_PARALLEL), interpret=interpret,
      name="delta_rule_input_grads")


def delta_rule(q, k, v, beta, log_g, *, h0, scale: float, chunk_size: int = 64,
               interpret=False, resets=None):
  """Pallas (Mosaic TPU) delta rule. Arguments as in ``chunked.delta_rule``
  (log_g and beta float32 [B, T, H], h0 float32 [B, H, K, V]), plus
  ``interpret``: False, True or a ``pltpu.InterpretParams()``. chunk_size in
  ``kernel_shapes.CHUNK_SIZES``, K up to ``kernel_shapes.MAX_HEAD_DIM`` and V
  up to ``kernel_shapes.MAX_V`` (checked in ``api.py``).

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32.
  """
  kernels = pallas_vjp.bind(_prepare, _states, _output, _state_grads,
                            _input_grads, scale=scale, chunk=chunk_size,
                            interpret=interpret)
  return pallas_vjp.delta_rule(kernels, q, k, v, beta, log_g, h0=h0,
                               chunk_size=chunk_size, resets=resets)
