r"""GLA as Pallas kernels lowered through Triton (GPUs). The recurrence is defined
in ``reference.py``; the per-chunk math is in ``chunk_tiles.py`` and the custom
VJP in ``pallas_vjp.py`` (which also says why the backward recomputes states).

Kernels, on [B, T, H, D] arrays as the op receives them (no transposes; a block
squeezes B and H and keeps [C, D] tiles with stride H * D along T):

  states   grid (B, H, V / BV, K / BK), a loop over the N chunks inside: writes
           the (transposed) state entering every chunk, h_in [B, H, N, V, K]
           float32, and h_T. Sequential in T, so its parallelism is
           B * H * (V / BV) * (K / BK) programs; 64-wide state blocks keep that
           at 4x B * H for head dims of 128.
  output   grid (B, H, N), chunks in parallel: o = q h_in + intra-chunk, the
           intra-chunk weights formed once and applied to value columns in
           blocks of BV.
  dstates  grid (B, H, V / BV, K / BK), the reverse loop: the gradient for the
           state leaving every chunk, and dh0.
  grads    grid (B, H, N): dq, dk, dv and d log_g of one chunk; full K
           tiles, value columns in blocks of BV (see chunk_tiles.chunk_grads).

Matmuls run at ``tiles.precision_for(q.dtype)``: IEEE float32 for float32 inputs
(TF32 would miss the float32 tolerance), TF32 on float32 operands otherwise.
Gate sums are always IEEE float32.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lsm.ops.common import tiles
from lsm.ops.gla import chunk_tiles, pallas_vjp

_F32 = jnp.float32
SUB = chunk_tiles.SUB
STATE_BLOCK = 64  # BK = BV of the sequential state kernels
NUM_WARPS = 4
NUM_STAGES = 2


def _params():
  return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _whole_time_spec(Tp, width, which):
  """All of T for one (b, h), column block from grid axis ``which`` (2 or 3)."""
  if which == 2:
    return pl.BlockSpec((None, Tp, None, width), lambda b, h, x, y: (b, 0, h, x))
  return pl.BlockSpec((None, Tp, None, width), lambda b, h, x, y: (b, 0, h, y))


def _states_kernel(k_ref, v_ref, g_ref, h0_ref, hin_ref, ht_ref, *, C, N, prec):
  def body(n, st):
    hin_ref[n] = st  # [BV, BK]
    t0 = pl.multiple_of(n * C, C)
    b_k = k_ref[pl.ds(t0, C), :].astype(_F32)  # [C, BK]
    b_v = v_ref[pl.ds(t0, C), :].astype(_F32)  # [C, BV]
    b_g = g_ref[pl.ds(t0, C), :]  # [C, BK]
    return chunk_tiles.state_update(b_k, b_v, b_g, st, prec)

  ht_ref[...] = jax.lax.fori_loop(0, N, body, h0_ref[...])


def _state_pass(kernel, a, b, g, h_last, *, chunk_size, interpret, name):
  """Shared launch of the two sequential kernels: inputs a [.., K], b [.., V],
  g [.., K]; h_last [B, H, V, K]. Returns per-chunk states [B, H, N, V, K] and
  the state after the loop."""
  B, Tp, H, Kp = a.shape
  Vp = b.shape[-1]
  N = Tp // chunk_size
  BK, BV = min(Kp, STATE_BLOCK), min(Vp, STATE_BLOCK)
  state_spec = pl.BlockSpec((None, None, BV, BK), lambda b_, h, iv, ik: (b_, h, iv, ik))
  return pl.pallas_call(
      functools.partial(kernel, C=chunk_size, N=N,
                        prec=tiles.precision_for(a.dtype)),
      grid=(B, H, Vp // BV, Kp // BK),
      in_specs=[_whole_time_spec(Tp, BK, 3), _whole_time_spec(Tp, BV, 2),
                _whole_time_spec(Tp, BK, 3), state_spec],
      out_specs=[pl.BlockSpec((None, None, N, BV, BK),
                              lambda b_, h, iv, ik: (b_, h, 0, iv, ik)),
                 state_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, N, Vp, Kp), _F32),
                 jax.ShapeDtypeStruct((B, H, Vp, Kp), _F32)],
      compiler_params=_params(), interpret=interpret, name=name,
  )(a, b, g, h_last)


def _value_blocks(v_ref, BV):
  """Column slices of width BV over a [C, V] ref."""
  return [pl.ds(iv * BV, BV) for iv in range(v_ref.shape[-1] // BV)]


def _output_kernel(q_ref, k_ref, v_ref, g_ref, hin_ref, o_ref, *, C, BV, scale,
                   prec):
  load = functools.partial(chunk_tiles.load_sub_blocks, n_sub=C // SUB)
  cols = _value_blocks(v_ref, BV)
  outs = chunk_tiles.chunk_output(
      load(q_ref), load(k_ref), load(g_ref),
      [(load(v_ref, cols=c), hin_ref[c, :]) for c in cols], prec)  # [BV, K]
  for c, rows in zip(cols, outs):
    for i, o in enumerate(rows):
      o_ref[pl.ds(i * SUB, SUB), c] = (scale * o).astype(o_ref.dtype)  # [16, BV]


def forward(q, k, v, g, h0t, *, scale, chunk_size, interpret):
  h_in, h_tt = _state_pass(_states_kernel, k, v, g, h0t, chunk_size=chunk_size,
                           interpret=interpret, name="gla_states")
  B, Tp, H, Kp = q.shape
  Vp = v.shape[-1]
  C = chunk_size
  kspec = pl.BlockSpec((None, C, None, Kp), lambda b, h, n: (b, n, h, 0))
  vspec = pl.BlockSpec((None, C, None, Vp), lambda b, h, n: (b, n, h, 0))
  o = pl.pallas_call(
      functools.partial(_output_kernel, C=C, BV=min(Vp, STATE_BLOCK), scale=scale,
                        prec=tiles.precision_for(q.dtype)),
      grid=(B, H, Tp // C),
      in_specs=[kspec, kspec, vspec, kspec,
                pl.BlockSpec((None, None, None, Vp, Kp), lambda b, h, n: (b, h, n, 0, 0))],
      out_specs=vspec,
      out_shape=jax.ShapeDtypeStruct((B, Tp, H, Vp), q.dtype),
      compiler_params=_params(), interpret=interpret, name="gla_output",
  )(q, k, v, g, h_in)
  return o, h_tt


def states(k, v, g, h0t, *, scale, chunk_size, interpret):
  del scale
  return _state_pass(_states_kernel, k, v, g, h0t, chunk_size=chunk_size,
                     interpret=interpret, name="gla_states")[0]


def _dstates_kernel(q_ref, do_ref, g_ref, dht_ref, dout_ref, dh0_ref, *, C, N,
                    prec, scale):
  def body(i, dst):
    n = N - 1 - i
    dout_ref[n] = dst  # [BV, BK]
    t0 = pl.multiple_of(n * C, C)
    b_q = q_ref[pl.ds(t0, C), :].astype(_F32)  # [C, BK]
    b_do = scale * do_ref[pl.ds(t0, C), :].astype(_F32)  # [C, BV]
    b_g = g_ref[pl.ds(t0, C), :]  # [C, BK]
    return chunk_tiles.state_grad_update(b_q, b_do, b_g, dst, prec)

  dh0_ref[...] = jax.lax.fori_loop(0, N, body, dht_ref[...])


def dstates(q, do, g, dh_tt, *, scale, chunk_size, interpret):
  return _state_pass(functools.partial(_dstates_kernel, scale=scale), q, do, g,
                     dh_tt, chunk_size=chunk_size, interpret=interpret,
                     name="gla_dstates")


def _grads_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, hin_ref, dout_ref,
                  dq_ref, dk_ref, dv_ref, dg_ref, *, C, BV, scale, prec):
  n_sub = C // SUB
  load = functools.partial(chunk_tiles.load_sub_blocks, n_sub=n_sub)
  cols = _value_blocks(v_ref, BV)
  v_blocks = [(load(v_ref, cols=c), [scale * d for d in load(do_ref, cols=c)],
               hin_ref[c, :], dout_ref[c, :]) for c in cols]  # [16, BV], [BV, K]
  dq, dk, dg, dv = chunk_tiles.chunk_grads(load(q_ref), load(k_ref), load(g_ref),
                                           v_blocks, prec)
  for i in range(n_sub):
    rows = pl.ds(i * SUB, SUB)
    dq_ref[rows, :] = dq[i].astype(dq_ref.dtype)  # [16, K]
    dk_ref[rows, :] = dk[i].astype(dk_ref.dtype)
    dg_ref[rows, :] = dg[i]
    for c, dv_block in zip(cols, dv):
      dv_ref[rows, c] = dv_block[i].astype(dv_ref.dtype)


def grads(q, k, v, g, do, h_in, dh_out, *, scale, chunk_size, interpret):
  B, Tp, H, Kp = q.shape
  Vp = v.shape[-1]
  C = chunk_size
  kspec = pl.BlockSpec((None, C, None, Kp), lambda b, h, n: (b, n, h, 0))
  vspec = pl.BlockSpec((None, C, None, Vp), lambda b, h, n: (b, n, h, 0))
  sspec = pl.BlockSpec((None, None, None, Vp, Kp), lambda b, h, n: (b, h, n, 0, 0))
  return pl.pallas_call(
      functools.partial(_grads_kernel, C=C, BV=min(Vp, STATE_BLOCK), scale=scale,
                        prec=tiles.precision_for(q.dtype)),
      grid=(B, H, Tp // C),
      in_specs=[kspec, kspec, vspec, kspec, vspec, sspec, sspec],
      out_specs=[kspec, kspec, vspec, kspec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(q.shape, _F32)],
      compiler_params=_params(), interpret=interpret, name="gla_grads",
  )(q, k, v, g, do, h_in, dh_out)


gla = pallas_vjp.make_gla(forward=forward, states=states, dstates=dstates,
                          grads=grads)
