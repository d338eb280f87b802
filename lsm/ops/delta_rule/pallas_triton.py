r"""The (gated) delta rule as Pallas kernels for GPUs (Triton lowering).

The recurrence is defined in ``reference.py``, the chunkwise UT / WY form in
``chunked.py``; the per-chunk tile math is ``chunk_tiles.py`` (shared with
``pallas_tpu.py``) and the padding, layout and custom VJP are
``pallas_vjp.py``. The organisation follows flash-linear-attention: a sequential
pass produces the state entering every chunk, then chunk-parallel passes use it.

Kernels (BH = batch x heads, N chunks of C tokens, value dim split into NV
blocks of BV columns, which are independent in every kernel but _prepare):

  _prepare       grid (BH, N), all parallel: the chunk's T = (I + L)^{-1}
                 [C, C] float32, stored as t [BH, N C, C].
  _states        grid (BH, NV); a ``fori_loop`` over the N chunks carries the
                 [Kp, BV] float32 state in registers, stores the state entering
                 each chunk (h_in [BH, N Kp, Vp]) and the final state.
  _output        grid (BH, N, NV), all parallel: o of one chunk from h_in.
  _state_grads   grid (BH, NV); the reverse loop: stores the cotangent of the
                 state leaving each chunk (dh_out) and returns dh0.
  _input_grads   grid (BH, N, NV), all parallel: dq, dk, dv, dbeta, d log_g of
                 one chunk from h_in and dh_out (``jax.vjp`` of the tile math
                 inside the kernel, the closed-form VJP of the inverse on the
                 loaded T). dq, dk, dbeta, dg are per-V-block shares, summed
                 over the NV blocks in XLA.

Recompute vs store: T is computed once per chunk by _prepare and loaded by the
other four kernels ([C, C] float32, 16 KiB per chunk at C = 64) instead of
being recomputed in each of them for each of the NV value blocks. One inverse
(15 substitution steps and 4 merge matmuls of [C, C] x [C, C], about 10 MFLOP
at C = 64) costs more than all the rest of a program's matmuls on a chunk in
_states, _output and _state_grads (about 4, 5 and 6 MFLOP at K = 128,
BV = 64), and the read of a [C, C] float32 tile is small next to the chunk's
q, k, v loads. Matmul MFLOP per chunk at C = 64, K = V = 128, bf16, NV = 2:
forward 62 -> 29, forward + backward 181 -> 95. W_k and the decay factors are
still recomputed where used (one [C, C] x [C, K] matmul and elementwise work).
The backward recomputes T and h_in (see ``pallas_vjp``).

Numerics: all tiles are float32 after loading; matmuls on inputs run at
``tiles.precision_for(q.dtype)`` (IEEE float32 for float32 inputs, TF32 for
bf16/f16), the inverse always at IEEE float32. Every exponent of a decay is
<= 0.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lsm.ops.common import tiles
from lsm.ops.delta_rule import chunk_tiles, pallas_vjp

_F32 = jnp.float32
BV = 64  # value columns per program: the state block [Kp, BV] f32 stays on chip
NUM_WARPS = 4
NUM_STAGES = 1  # the sequential loops load one chunk at a time


def _params():
  return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _rows(ref, rows):
  """Rows ``rows`` (a ``pl.ds``) of a 2-D ref, as float32."""
  return ref[rows, :].astype(_F32)


# ---------------------------------------------------------------- kernels ---


def _prepare_kernel(k_ref, beta_ref, g_ref, t_ref, *, precision):
  t_ref[...] = chunk_tiles.chunk_inverse(
      k_ref[...].astype(_F32),  # [C, Kp]
      beta_ref[...], g_ref[...],  # [C, 1]
      precision=precision)


def _states_kernel(k_ref, v_ref, beta_ref, g_ref, t_ref, h0_ref, h_in_ref,
                   ht_ref, *, C, N, precision):
  Kp = k_ref.shape[-1]

  def body(n, b_s):
    rows = pl.ds(n * C, C)
    b_k = _rows(k_ref, rows)  # [C, Kp]
    b_v = _rows(v_ref, rows)  # [C, BV]
    b_beta = _rows(beta_ref, rows)  # [C, 1]
    b_g = _rows(g_ref, rows)  # [C, 1]
    b_t = t_ref[rows, :]  # [C, C]
    h_in_ref[pl.ds(n * Kp, Kp), :] = b_s
    return chunk_tiles.next_state(b_t, b_s, b_k, b_v, b_beta, b_g,
                                  precision=precision)

  ht_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...].astype(_F32))


def _output_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, h_ref, o_ref, *,
                   scale, precision):
  b_o, _ = chunk_tiles.chunk_apply(
      t_ref[...],  # [C, C]
      h_ref[...],  # [Kp, BV]
      q_ref[...].astype(_F32),  # [C, Kp]
      k_ref[...].astype(_F32),  # [C, Kp]
      v_ref[...].astype(_F32),  # [C, BV]
      beta_ref[...], g_ref[...],  # [C, 1]
      scale=scale, precision=precision)
  o_ref[...] = b_o.astype(o_ref.dtype)


def _state_grads_kernel(q_ref, k_ref, beta_ref, g_ref, t_ref, do_ref, dht_ref,
                        dh_out_ref, dh0_ref, *, C, N, scale, precision):
  Kp = k_ref.shape[-1]

  def body(i, b_ds):
    n = N - 1 - i
    rows = pl.ds(n * C, C)
    dh_out_ref[pl.ds(n * Kp, Kp), :] = b_ds
    return chunk_tiles.state_grad(
        t_ref[rows, :],  # [C, C]
        b_ds, _rows(q_ref, rows), _rows(k_ref, rows),  # [C, Kp]
        _rows(beta_ref, rows), _rows(g_ref, rows),  # [C, 1]
        _rows(do_ref, rows),  # [C, BV]
        scale=scale, precision=precision)

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dht_ref[...])


def _input_grads_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, t_ref, do_ref,
                        h_ref, dh_ref, dq_ref, dk_ref, dv_ref, dbeta_ref,
                        dg_ref, *, scale, precision):
  grads = chunk_tiles.chunk_grads(
      t_ref[...],  # [C, C]
      h_ref[...],  # [Kp, BV]
      q_ref[...].astype(_F32), k_ref[...].astype(_F32),  # [C, Kp]
      v_ref[...].astype(_F32),  # [C, BV]
      beta_ref[...], g_ref[...],  # [C, 1]
      do_ref[...].astype(_F32),  # [C, BV]
      dh_ref[...],  # [Kp, BV]
      scale=scale, precision=precision)
  for ref, d in zip((dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref), grads):
    ref[...] = d


# ---------------------------------------------------------------- calls ---


def _dims(q_or_k, v, chunk):
  BH, Tp, Kp = q_or_k.shape
  Vp = v.shape[-1]
  bv = min(BV, Vp)
  return BH, Tp, Kp, Vp, bv, Tp // chunk, Vp // bv


def _prepare(k, beta, g, *, chunk, interpret):
  BH, Tp, Kp = k.shape
  N = Tp // chunk
  keys = pl.BlockSpec((None, chunk, Kp), lambda b, n: (b, n, 0))
  col = pl.BlockSpec((None, chunk, 1), lambda b, n: (b, n, 0))
  kernel = functools.partial(_prepare_kernel,
                             precision=tiles.precision_for(k.dtype))
  return pl.pallas_call(
      kernel, grid=(BH, N),
      in_specs=[keys, col, col],
      out_specs=pl.BlockSpec((None, chunk, chunk), lambda b, n: (b, n, 0)),
      out_shape=jax.ShapeDtypeStruct((BH, Tp, chunk), _F32),
      compiler_params=_params(), interpret=interpret,
      name="delta_rule_prepare")(k, beta, g)


def _states(k, v, beta, g, t, h0, *, chunk, interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(k, v, chunk)
  whole = lambda d: pl.BlockSpec((None, Tp, d), lambda b, j: (b, 0, 0))
  kernel = functools.partial(_states_kernel, C=chunk, N=N,
                             precision=tiles.precision_for(k.dtype))
  return pl.pallas_call(
      kernel, grid=(BH, NV),
      in_specs=[whole(Kp), pl.BlockSpec((None, Tp, bv), lambda b, j: (b, 0, j)),
                whole(1), whole(1), whole(chunk),
                pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      out_specs=[pl.BlockSpec((None, N * Kp, bv), lambda b, j: (b, 0, j)),
                 pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((BH, N * Kp, Vp), _F32),
                 jax.ShapeDtypeStruct((BH, Kp, Vp), _F32)],
      compiler_params=_params(), interpret=interpret,
      name="delta_rule_states")(k, v, beta, g, t, h0)


def _chunk_specs(Kp, bv, chunk):
  """Block specs of one chunk for a grid (BH, N, NV): keys, values, per-token
  scalars, the chunk's inverse T and its [Kp, bv] state block."""
  keys = pl.BlockSpec((None, chunk, Kp), lambda b, n, j: (b, n, 0))
  vals = pl.BlockSpec((None, chunk, bv), lambda b, n, j: (b, n, j))
  col = pl.BlockSpec((None, chunk, 1), lambda b, n, j: (b, n, 0))
  inv = pl.BlockSpec((None, chunk, chunk), lambda b, n, j: (b, n, 0))
  state = pl.BlockSpec((None, Kp, bv), lambda b, n, j: (b, n, j))
  return keys, vals, col, inv, state


def _output(q, k, v, beta, g, t, h_in, *, scale, chunk, interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(q, v, chunk)
  keys, vals, col, inv, state = _chunk_specs(Kp, bv, chunk)
  kernel = functools.partial(_output_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return pl.pallas_call(
      kernel, grid=(BH, N, NV),
      in_specs=[keys, keys, vals, col, col, inv, state],
      out_specs=vals,
      out_shape=jax.ShapeDtypeStruct((BH, Tp, Vp), q.dtype),
      compiler_params=_params(), interpret=interpret,
      name="delta_rule_output")(q, k, v, beta, g, t, h_in)


def _state_grads(q, k, beta, g, t, do, dh_t, *, scale, chunk, interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(q, do, chunk)
  whole = lambda d: pl.BlockSpec((None, Tp, d), lambda b, j: (b, 0, 0))
  kernel = functools.partial(_state_grads_kernel, C=chunk, N=N, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  return pl.pallas_call(
      kernel, grid=(BH, NV),
      in_specs=[whole(Kp), whole(Kp), whole(1), whole(1), whole(chunk),
                pl.BlockSpec((None, Tp, bv), lambda b, j: (b, 0, j)),
                pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      out_specs=[pl.BlockSpec((None, N * Kp, bv), lambda b, j: (b, 0, j)),
                 pl.BlockSpec((None, Kp, bv), lambda b, j: (b, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((BH, N * Kp, Vp), _F32),
                 jax.ShapeDtypeStruct((BH, Kp, Vp), _F32)],
      compiler_params=_params(), interpret=interpret,
      name="delta_rule_state_grads")(q, k, beta, g, t, do, dh_t)


def _input_grads(q, k, v, beta, g, t, do, h_in, dh_out, *, scale, chunk,
                 interpret):
  BH, Tp, Kp, Vp, bv, N, NV = _dims(q, v, chunk)
  keys, vals, col, inv, state = _chunk_specs(Kp, bv, chunk)
  # per-V-block shares of the key-side gradients: [NV, BH, Tp, *]
  keys_part = pl.BlockSpec((None, None, chunk, Kp), lambda b, n, j: (j, b, n, 0))
  col_part = pl.BlockSpec((None, None, chunk, 1), lambda b, n, j: (j, b, n, 0))
  kernel = functools.partial(_input_grads_kernel, scale=scale,
                             precision=tiles.precision_for(q.dtype))
  dq, dk, dv, dbeta, dg = pl.pallas_call(
      kernel, grid=(BH, N, NV),
      in_specs=[keys, keys, vals, col, col, inv, vals, state, state],
      out_specs=[keys_part, keys_part, vals, col_part, col_part],
      out_shape=[jax.ShapeDtypeStruct((NV, BH, Tp, Kp), _F32),
                 jax.ShapeDtypeStruct((NV, BH, Tp, Kp), _F32),
                 jax.ShapeDtypeStruct((BH, Tp, Vp), _F32),
                 jax.ShapeDtypeStruct((NV, BH, Tp, 1), _F32),
                 jax.ShapeDtypeStruct((NV, BH, Tp, 1), _F32)],
      compiler_params=_params(), interpret=interpret,
      name="delta_rule_input_grads")(q, k, v, beta, g, t, do, h_in, dh_out)
  return dq.sum(0), dk.sum(0), dv, dbeta.sum(0), dg.sum(0)


def delta_rule(q, k, v, beta, log_g, *, h0, scale: float, chunk_size: int = 64,
               interpret=False):
  """Pallas (Triton) delta rule. Arguments as in ``chunked.delta_rule`` (log_g
  and beta float32 [B, T, H], h0 float32 [B, H, K, V]), plus ``interpret`` for
  Pallas interpret mode. chunk_size in ``kernel_shapes.CHUNK_SIZES`` and head
  dims up to ``kernel_shapes.MAX_HEAD_DIM`` (checked in ``api.py``).

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32.
  """
  kernels = pallas_vjp.bind(_prepare, _states, _output, _state_grads,
                            _input_grads, scale=scale, chunk=chunk_size,
                            interpret=interpret)
  return pallas_vjp.delta_rule(kernels, q, k, v, beta, log_g, h0=h0,
                               chunk_size=chunk_size)
