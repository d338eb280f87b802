r"""The (gated) delta rule as Mosaic GPU Pallas kernels (Hopper and newer).

The recurrence is defined in ``reference.py`` and the chunkwise UT / WY form
in ``chunked.py``; the padding, layout and custom VJP are ``pallas_vjp.py``'s
(this module supplies its five launchers). For a chunk n of C = 64 tokens
(one wgmma M tile) with gamma_t = sum_{u <= t} g_u, T = (I + L)^{-1} and the
state S_n entering the chunk, the chunk form is written through six per-chunk
factors that do not depend on the state:

    w_k = T diag(beta exp(gamma)) K     [C, K]    w_v = T diag(beta) V  [C, V]
    k_out = exp(gamma_C - gamma) o K    [C, K]    d_out = exp(gamma_C)  scalar
    q_s = scale exp(gamma) o Q          [C, K]
    A = scale (M o Q K^T), M[t, s] = exp(gamma_t - gamma_s) for s <= t  [C, C]

so that the state-dependent part is bilinear and nothing else:

    U_n     = w_v - w_k S_n
    S_{n+1} = d_out S_n + k_out^T U_n
    O_n     = q_s S_n + A U_n

and its backward, with G_n the cotangent of S_{n+1} (G_{N-1} = dh_T):

    dU_n  = A^T dO_n + k_out G_n
    G_{n-1} = dS_n = d_out G_n + q_s^T dO_n - w_k^T dU_n     (dh0 = dS_0)
    d q_s = dO S^T,  d w_k = -dU S^T,  d k_out = U G^T,  d A = dO U^T,
    d w_v = dU,  d d_out = sum(S o G).

What runs where. The sequential passes and every product with a state, a
pseudo-value or their cotangents are Mosaic GPU kernels (wgmma, TMA):

  delta_rule_states_mgpu       grid (BH, Vp / 64): the forward loop over the
                               chunks (W_k S, U^T K_out), storing the state
                               entering every chunk and U.
  delta_rule_output_mgpu       grid (BH, N, Vp / BVC): O = q_s S + A U.
  delta_rule_state_grads_mgpu  grid (BH, Vp / 64): the reverse loop (A^T dO,
                               K_out G, dO^T q_s, dU^T W_k), storing G and dU.
  delta_rule_input_grads_mgpu  grid (BH, N): dO S^T, dU S^T, U G^T, dO U^T,
                               summed over the V blocks.

V blocks (V up to 512, issue 28): the sequential passes work on 64-row
blocks of V in their grid already. The chunk kernels take V in blocks of BVC
= ``mosaic_gpu.v_block(Vp)`` columns (all of V up to 128, else 128): the
output kernel as a grid axis (its A and q_s are inputs, so a block costs only
their refetch), the input-gradient kernel as a static loop in the program
whose four V contractions are summed in float32 SMEM. K stays at most 128:
every kernel holds [C, K] tiles and [BV, K] state blocks whole.

The per-chunk factors above, the inverse T = (I + L)^{-1}
(``common.triangular.unit_lower_inverse``: exact forward substitution, no
series, so beta in [0, 2] needs no special case), and the gradient from the
factors' cotangents back to q, k, v, beta and log_g (``jax.vjp`` of the factor
functions, and the closed-form inverse VJP dL = -T^T dT T^T on the strict
lower triangle) run in XLA, batched over [BH, N, C, *] tiles, in float32 with
HIGHEST-precision matmuls. That keeps every gate exponent, the cumulative sums
(Mosaic GPU has none) and the inverse exact, at the cost of XLA's batched
[C, C] x [C, D] products (T K, T V, Q K^T and their VJPs) going through memory
and being recomputed by the launchers that need them (the factor functions
are cheap next to the passes but not free; moving T's products and A into
the chunk kernels is the next step for speed).

Layout. The kernels carry the state transposed, st = S^T [V, K], as the GLA
kernels do: every state product then has M = 64 rows (a 64-column block of V
in the sequential passes, the 64 tokens of a chunk in the chunk kernels), the
one-warpgroup wgmma tile. Per-chunk states, G, U and dU go through memory in
the input dtype (they are wgmma operands); h_T and dh0 in float32.

Numerics. wgmma operands are 16-bit (bf16 or f16) with float32 accumulation:
w_k, k_out, q_s, A, the state, U, dO and dU are rounded to the input dtype
before their products (as flash-linear-attention does), w_v stays float32 (U
= w_v - W_k S is formed in float32 registers). The carried state and its
cotangent stay float32 in registers across chunks; their per-chunk copies
(and d d_out = sum(S o G), formed in XLA from them) are in the input dtype.
In the interpreter this gives about 3e-3 relative RMS error on o, h_T and
every gradient against the float32 reference (bf16, beta up to 2, log_g down
to -50), against the 1e-2 bf16 tolerance. With float16 inputs the per-chunk
states are float16, so an entry past 65504 would overflow where bf16 would
not. float32 inputs are refused: wgmma's float32 path is TF32, which misses
the float32 tolerance of 1e-4.

Recompute: as ``pallas_vjp`` arranges, the backward reruns ``prepare`` (T)
and the forward state pass; the per-chunk states and U are not kept between
forward and backward.

Mosaic GPU facts relied on (jax 0.11.2, Warpgroup lowering semantics;
see also ``lsm.ops.gla.pallas_mosaic_gpu``, whose SMEM helpers are reused):
- wgmma accumulators are zeroed by ``pl.run_scoped(..., plgpu.ACC)`` and
  never negated (``-acc * x`` gave zeros on 0.11.2): minus signs are
  differences of two accumulators, and d w_k leaves the kernel as +dU S^T
  and is negated in XLA.
- ``plgpu.commit_smem()`` before any TMA or wgmma that reads a tile just
  written from registers, and before a prefetch that overwrites a tile read in
  the previous loop step; ``wait_smem_to_gmem(0, wait_read_only=True)`` before
  a stored tile is rewritten.
- One warpgroup per kernel and no early exits (an early-exiting warpgroup
  raised CUDA_ERROR_ILLEGAL_INSTRUCTION on 0.11.2).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lsm.ops.common import kernel_shapes, mosaic_gpu, segments
from lsm.ops.common.triangular import unit_lower_inverse
from lsm.ops.delta_rule import pallas_vjp

# What the kernels take (lsm.ops._dispatch reads it for impl= and "auto").
ACCEPTS = mosaic_gpu.ACCEPTS

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
C = mosaic_gpu.CHUNK  # chunk length: one wgmma M tile
BV = 64  # value columns per program of the sequential passes (wgmma M)
MAX_HEAD_DIM, DTYPES = mosaic_gpu.MAX_HEAD_DIM, mosaic_gpu.DTYPES
_OP = "delta_rule: impl='pallas_mosaic_gpu'"

# SMEM tiles, register transfers, wgmma, TMA and compiler params shared with
# the GLA kernels (lsm/ops/common/mosaic_gpu.py).
_swizzled, _plain, _load, _load_row, _mm = (
    mosaic_gpu.swizzled, mosaic_gpu.plain, mosaic_gpu.load, mosaic_gpu.load_row,
    mosaic_gpu.mm)
_PARAMS = mosaic_gpu.PARAMS
_padded, _interpret_params = mosaic_gpu.padded, mosaic_gpu.interpret_params
_v_block = mosaic_gpu.v_block  # value columns per block of the chunk kernels
_fetch_all = mosaic_gpu.fetch_all  # TMA each (GMEM, SMEM) pair, then wait


def _einsum(spec, *xs):
  return jnp.einsum(spec, *xs, precision=_HIGHEST)


# ------------------------------------------------ per-chunk factors (XLA) ---
# All on the chunked kernel layout: [BH, Tp, D] -> [BH, N, C, D], per-token
# scalars [BH, Tp, 1] -> [BH, N, C], float32.


def _chunks(x):
  BH, Tp, D = x.shape
  x = x.astype(_F32).reshape(BH, Tp // C, C, D)
  return x[..., 0] if D == 1 else x


def _flat(x):
  """[BH, N, C, D] -> [BH, N C, D]."""
  BH, N, _, D = x.shape
  return x.reshape(BH, N * C, D)


def _masks():
  idx = jnp.arange(C)
  return idx[:, None] > idx[None, :], idx[:, None] >= idx[None, :]


def _gates(g):
  """From the log gates g [BH, N, C]: (gamma [BH, N, C] inclusive prefix
  sums, M [BH, N, C, C] = exp(gamma_t - gamma_s) for s <= t else 0, gamma_C -
  gamma_t [BH, N, C], gamma_C [BH, N]). Masked exponents are zeroed before
  ``exp`` and the diagonal's is 0, not gamma_t - gamma_t (as ``chunked``); the
  sums to the chunk's end are shifted reverse cumsums, not differences."""
  strict, causal = _masks()
  gamma = jnp.cumsum(g, axis=-1)
  diff = jnp.where(strict, gamma[..., :, None] - gamma[..., None, :], 0.0)
  m = jnp.where(causal, jnp.exp(diff), 0.0)
  rev = jnp.cumsum(g[..., ::-1], axis=-1)[..., ::-1]  # sum_{u >= t} g_u
  to_end = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], -1)
  return gamma, m, to_end, rev[..., 0]


def _doc_masks(docs):
  """Packed documents as the chunk form's cuts (see ``chunk_tiles.gates``):
  (same [BH, N, C, C], carry, tail [BH, N, C], carry_out [BH, N]) bool, from
  the ``kernel_docs`` column of ``docs`` ([BH, Tp, 1] chunk-local document
  index); None without documents. Every factor below carries one of the four
  decays they cut (M, exp(gamma), exp(gamma_C - gamma), exp(gamma_C)), and the
  kernels only combine factors, so the masks never enter a kernel."""
  if docs is None:
    return None
  same, carry, tail = segments.doc_masks(_chunks(docs[0]))  # doc [BH, N, C]
  return same, carry, tail, carry[..., -1]


def _cut(mask, x):
  return x if mask is None else jnp.where(mask, x, 0.0)


def _intra(k, beta, g, masks=None):
  """L [BH, N, C, C]: beta_t exp(gamma_t - gamma_s) k_t . k_s for s < t (0
  across documents)."""
  k, beta, g = _chunks(k), _chunks(beta), _chunks(g)
  strict, _ = _masks()
  _, m, _, _ = _gates(g)
  m = _cut(None if masks is None else masks[0], m)
  kk = _einsum("...tk,...sk->...ts", k, k)
  return jnp.where(strict, beta[..., :, None] * m * kk, 0.0)


def _key_factors(t, k, beta, g, masks=None):
  """(w_k, k_out [BH, N, C, K], d_out [BH, N]) in float32 (cut by the
  document ``masks``: carry, tail, carry_out)."""
  k, beta, g = _chunks(k), _chunks(beta), _chunks(g)
  gamma, _, to_end, total = _gates(g)
  _, carry, tail, carry_out = (None,) * 4 if masks is None else masks
  decay_in = _cut(carry, jnp.exp(gamma))
  w_k = _einsum("...ts,...sk->...tk", t, (beta * decay_in)[..., None] * k)
  return (w_k, _cut(tail, jnp.exp(to_end))[..., None] * k,
          _cut(carry_out, jnp.exp(total)))


def _value_factor(t, v, beta):
  """w_v [BH, N, C, V] float32."""
  return _einsum("...ts,...sv->...tv", t, _chunks(beta)[..., None] * _chunks(v))


def _query_factors(q, k, g, scale, masks=None):
  """(q_s [BH, N, C, K], A [BH, N, C, C]) in float32 (cut by the document
  ``masks``: carry, same)."""
  q, k, g = _chunks(q), _chunks(k), _chunks(g)
  gamma, m, _, _ = _gates(g)
  same, carry, _, _ = (None,) * 4 if masks is None else masks
  a = scale * _cut(same, m) * _einsum("...tk,...sk->...ts", q, k)
  return scale * _cut(carry, jnp.exp(gamma))[..., None] * q, a


def _decay_rows(d_out, K):
  """d_out [BH, N] as [BH, N, K] float32 rows (one TMA box per chunk)."""
  return jnp.broadcast_to(d_out[..., None], (*d_out.shape, K))


# --------------------------------------------------------- state passes ---


def _states_kernel(wk_ref, wv_ref, ko_ref, dec_ref, h_ref,
                   hs_ref, u_ref, hlast_ref,
                   wk_s, wv_s, ko_s, dec_s, st_s, u_s, h_s, bars):
  ib, iv = lax.axis_index("b"), lax.axis_index("v")
  N = hs_ref.shape[1]
  K = wk_ref.shape[-1]
  vcols = pl.ds(iv * BV, BV)

  def fetch(n, slot):
    rows = pl.ds(n * C, C)
    for j, (src, dst) in enumerate([
        (wk_ref.at[ib, rows], wk_s.at[slot]),
        (wv_ref.at[ib, rows, vcols], wv_s.at[slot]),
        (ko_ref.at[ib, rows], ko_s.at[slot]),
        (dec_ref.at[ib, pl.ds(n, 1)], dec_s.at[slot])]):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[4 * slot + j])

  plgpu.copy_gmem_to_smem(h_ref.at[ib, vcols], h_s, bars.at[8])
  fetch(0, 0)
  plgpu.barrier_wait(bars.at[8])

  def body(n, st):  # st [BV, K] float32: S^T entering chunk n
    slot = lax.rem(n, 2)

    @pl.when(n + 1 < N)
    def _():
      plgpu.commit_smem()  # the last step's reads of that buffer come first
      fetch(n + 1, 1 - slot)

    st_s[...] = st.astype(st_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(st_s, hs_ref.at[ib, n, vcols])
    for j in range(4):
      plgpu.barrier_wait(bars.at[4 * slot + j])
    # U = w_v - W_k S: [C, K] x [K, BV]
    u = _load(wv_s.at[slot]) - _mm(wk_s.at[slot], st_s.T, (C, BV))
    u_s[...] = u.astype(u_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(u_s, u_ref.at[ib, pl.ds(n * C, C), vcols])
    upd = _mm(u_s.T, ko_s.at[slot], (BV, K))  # U^T K_out: [BV, C] x [C, K]
    decay = _load_row(dec_s.at[slot], 0, (BV, K))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # st_s, u_s: next step
    return st * decay + upd

  h_s[...] = lax.fori_loop(0, N, body, h_s[...])
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(h_s, hlast_ref.at[ib, vcols])
  plgpu.wait_smem_to_gmem(0)


def _states_scratch(K, V, dtype):
  """Two buffers of w_k [C, K], w_v [C, BV] (float32, plain), k_out [C, K]
  and the decay row [1, K] (float32, plain); the carry's input-dtype copy
  [BV, K], U [C, BV], the float32 carry in and out [BV, K]."""
  del V
  return [_swizzled((2, C, K), dtype), _plain((2, C, BV), _F32),
          _swizzled((2, C, K), dtype), _plain((2, 1, K), _F32),
          _swizzled((BV, K), dtype), _swizzled((C, BV), dtype),
          _swizzled((BV, K), _F32)]


def _states_call(wk, wv, ko, dec, h0t, *, interpret):
  """The forward pass over the chunks.

  Grid (BH, Vp / BV), BV = 64: each program carries a float32 [BV, K] block
  of S^T through the N chunks in registers; the next chunk's w_k, w_v, k_out
  and decay come in by TMA while this one is worked on (two buffers). Per
  chunk: U = w_v - W_k S (one [C, K] x [K, BV] wgmma), S'^T = d_out S^T +
  U^T K_out (one [BV, C] x [C, K] wgmma).

  SMEM (``_states_scratch``, any V up to 512): 156,744 B at K = 128, 99,400 B at
  K = 64 (both dtypes). Registers: the carry and the update [BV, K] (2 x 64
  at K = 128), U [C, BV] (32).

  Returns the per-chunk entering states st [BH, N, Vp, Kp] and U [BH, Tp, Vp]
  in the input dtype, and the float32 carry after the last chunk [BH, Vp, Kp].
  """
  BH, Tp, K = wk.shape
  V = wv.shape[-1]
  N = Tp // C
  name = "delta_rule_states_mgpu"
  return plgpu.kernel(
      _states_kernel,
      out_type=(jax.ShapeDtypeStruct((BH, N, V, K), wk.dtype),
                jax.ShapeDtypeStruct((BH, Tp, V), wk.dtype),
                jax.ShapeDtypeStruct((BH, V, K), _F32)),
      scratch_types=[*_states_scratch(K, V, wk.dtype),
                     plgpu.Barrier(num_barriers=KERNELS[name][1])],
      grid=(BH, V // BV), grid_names=("b", "v"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(wk, wv, ko, dec, h0t)


def _state_grads_kernel(ko_ref, qs_ref, wk_ref, a_ref, do_ref, dec_ref, h_ref,
                        gs_ref, du_ref, dh0_ref,
                        ko_s, qs_s, wk_s, a_s, do_s, dec_s, gt_s, du_s, h_s,
                        bars):
  ib, iv = lax.axis_index("b"), lax.axis_index("v")
  N = gs_ref.shape[1]
  K = ko_ref.shape[-1]
  vcols = pl.ds(iv * BV, BV)

  def fetch(n, slot):
    rows = pl.ds(n * C, C)
    for j, (src, dst) in enumerate([
        (ko_ref.at[ib, rows], ko_s.at[slot]),
        (qs_ref.at[ib, rows], qs_s.at[slot]),
        (wk_ref.at[ib, rows], wk_s.at[slot]),
        (a_ref.at[ib, rows], a_s.at[slot]),
        (do_ref.at[ib, rows, vcols], do_s.at[slot]),
        (dec_ref.at[ib, pl.ds(n, 1)], dec_s.at[slot])]):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[6 * slot + j])

  plgpu.copy_gmem_to_smem(h_ref.at[ib, vcols], h_s, bars.at[12])
  fetch(N - 1, 0)
  plgpu.barrier_wait(bars.at[12])

  def body(i, gt):  # gt [BV, K] float32: G^T, cotangent of S leaving chunk n
    slot = lax.rem(i, 2)
    n = N - 1 - i

    @pl.when(i + 1 < N)
    def _():
      plgpu.commit_smem()
      fetch(n - 1, 1 - slot)

    gt_s[...] = gt.astype(gt_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(gt_s, gs_ref.at[ib, n, vcols])
    for j in range(6):
      plgpu.barrier_wait(bars.at[6 * slot + j])

    def du_body(acc_ref):  # dU = A^T dO + K_out G: [C, BV]
      plgpu.wgmma(acc_ref, a_s.at[slot].T, do_s.at[slot])
      plgpu.wgmma(acc_ref, ko_s.at[slot], gt_s.T)
      return acc_ref[...]

    du_s[...] = pl.run_scoped(du_body, plgpu.ACC((C, BV), _F32)).astype(
        du_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(du_s, du_ref.at[ib, pl.ds(n * C, C), vcols])
    decay = _load_row(dec_s.at[slot], 0, (BV, K))
    # dS^T = d_out G^T + dO^T q_s - dU^T W_k, each [BV, C] x [C, K]; the minus
    # is a difference of two accumulators, never a negated one.
    gt = gt * decay + _mm(do_s.at[slot].T, qs_s.at[slot], (BV, K))
    gt = gt - _mm(du_s.T, wk_s.at[slot], (BV, K))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    return gt

  h_s[...] = lax.fori_loop(0, N, body, h_s[...])
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(h_s, dh0_ref.at[ib, vcols])
  plgpu.wait_smem_to_gmem(0)


def _state_grads_scratch(K, V, dtype):
  """Two buffers of k_out, q_s, w_k [C, K], A [C, C], dO [C, BV] and the
  decay row [1, K] (float32, plain); G^T's input-dtype copy [BV, K], dU
  [C, BV], the float32 carry in and out [BV, K]."""
  del V
  return [_swizzled((2, C, K), dtype), _swizzled((2, C, K), dtype),
          _swizzled((2, C, K), dtype), _swizzled((2, C, C), dtype),
          _swizzled((2, C, BV), dtype), _plain((2, 1, K), _F32),
          _swizzled((BV, K), dtype), _swizzled((C, BV), dtype),
          _swizzled((BV, K), _F32)]


def _state_grads_call(ko, qs, wk, a, do, dec, dh_tt, *, interpret):
  """The reverse pass over the chunks, last chunk first.

  Grid (BH, Vp / BV), BV = 64: each program carries a float32 [BV, K] block
  of G^T (the cotangent of the state leaving the chunk, dh_T^T first). Per
  chunk: dU = A^T dO + K_out G (two wgmmas into one [C, BV] accumulator),
  then dS^T = d_out G^T + dO^T q_s - dU^T W_k (two [BV, C] x [C, K] wgmmas),
  which is the next (earlier) chunk's G^T. The five operand tiles and the
  decay of the next chunk come in by TMA while this one is worked on.

  SMEM (``_state_grads_scratch``, any V up to 512): 189,544 B at K = 128,
  115,816 B at K = 64.
  Registers: the carry and one product [BV, K] (2 x 64 at K = 128), dU (32).

  Returns G^T per chunk [BH, N, Vp, Kp] and dU [BH, Tp, Vp] in the input
  dtype, and dh0^T [BH, Vp, Kp] float32.
  """
  BH, Tp, K = ko.shape
  V = do.shape[-1]
  N = Tp // C
  name = "delta_rule_state_grads_mgpu"
  return plgpu.kernel(
      _state_grads_kernel,
      out_type=(jax.ShapeDtypeStruct((BH, N, V, K), ko.dtype),
                jax.ShapeDtypeStruct((BH, Tp, V), ko.dtype),
                jax.ShapeDtypeStruct((BH, V, K), _F32)),
      scratch_types=[*_state_grads_scratch(K, V, ko.dtype),
                     plgpu.Barrier(num_barriers=KERNELS[name][1])],
      grid=(BH, V // BV), grid_names=("b", "v"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(ko, qs, wk, a, do, dec, dh_tt)


# ------------------------------------------------------ chunk kernels ---


def _output_kernel(qs_ref, a_ref, u_ref, hs_ref, o_ref,
                   qs_s, a_s, u_s, st_s, o_s, bars):
  ib, n, iv = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("v")
  rows = pl.ds(n * C, C)
  cols = pl.ds(iv * u_s.shape[-1], u_s.shape[-1])  # this program's V block
  _fetch_all([(qs_ref.at[ib, rows], qs_s), (a_ref.at[ib, rows], a_s),
              (u_ref.at[ib, rows, cols], u_s), (hs_ref.at[ib, n, cols], st_s)],
             bars)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, qs_s, st_s.T)  # q_s S: [C, K] x [K, BVC]
    plgpu.wgmma(acc_ref, a_s, u_s)  # A U: [C, C] x [C, BVC]
    return acc_ref[...]

  o_s[...] = pl.run_scoped(body, plgpu.ACC(o_s.shape, _F32)).astype(o_s.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_s, o_ref.at[ib, rows, cols])
  plgpu.wait_smem_to_gmem(0)


def _output_scratch(K, V, dtype):
  """q_s [C, K], A [C, C], U [C, BVC], the V block of the chunk's S^T
  [BVC, K], O [C, BVC]; BVC = ``v_block(V)``."""
  bv = _v_block(V)
  return [_swizzled((C, K), dtype), _swizzled((C, C), dtype),
          _swizzled((C, bv), dtype), _swizzled((bv, K), dtype),
          _swizzled((C, bv), dtype)]


def _output_call(qs, a, u, hs, *, interpret):
  """O [BH, Tp, Vp] in the input dtype: grid (BH, N, Vp / BVC), one chunk
  and one V block of BVC = ``v_block(Vp)`` columns (V itself up to 128) per
  program, O = q_s S + A U by two wgmmas into one [C, BVC] accumulator (A
  and q_s are inputs, so a V grid axis only refetches those two tiles).
  SMEM (``_output_scratch``): 90,144 B at K = 128, V >= 128, 40,992 B at
  K = V = 64. Registers: the accumulator [C, BVC] (64 at BVC = 128)."""
  BH, Tp, K = qs.shape
  V = u.shape[-1]
  bv = _v_block(V)
  name = "delta_rule_output_mgpu"
  return plgpu.kernel(
      _output_kernel,
      out_type=jax.ShapeDtypeStruct((BH, Tp, V), qs.dtype),
      scratch_types=[*_output_scratch(K, V, qs.dtype),
                     plgpu.Barrier(num_barriers=KERNELS[name][1])],
      grid=(BH, Tp // C, V // bv), grid_names=("b", "n", "v"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(qs, a, u, hs)


def _input_grads_kernel(do_ref, u_ref, du_ref, hs_ref, gs_ref,
                        dqs_ref, dwk_ref, dko_ref, da_ref,
                        do_s, u_s, du_s, st_s, gt_s, out_s, da_s, bars):
  ib, n = lax.axis_index("b"), lax.axis_index("n")
  rows = pl.ds(n * C, C)
  K = st_s.shape[-1]
  BVC = do_s.shape[-1]  # value columns per V block
  nvb = do_ref.shape[-1] // BVC

  def fetch_block(j):  # V block j: dO, U, dU [C, BVC], S^T and G^T [BVC, K]
    cols = pl.ds(j * BVC, BVC)
    for i, (src, dst) in enumerate([
        (do_ref.at[ib, rows, cols], do_s), (u_ref.at[ib, rows, cols], u_s),
        (du_ref.at[ib, rows, cols], du_s), (hs_ref.at[ib, n, cols], st_s),
        (gs_ref.at[ib, n, cols], gt_s)]):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[i])

  # Every product contracts V: each is summed over the V blocks (static: at
  # most 4), in float32 SMEM (dA in da_s, the three [C, K] products in
  # out_s[0 .. 2]) when there are several blocks; with one (V <= 128) the
  # three [C, K] products go out through one float32 tile, each written only
  # after the previous one's TMA has read it.
  fetch_block(0)
  for j in range(nvb):
    last = j + 1 == nvb
    for i in range(5):
      plgpu.barrier_wait(bars.at[i])
    da = _mm(do_s, u_s.T, (C, C))  # dA = dO U^T: [C, BVC] x [BVC, C]
    da_s[...] = da + da_s[...] if j else da
    if last:
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(da_s, da_ref.at[ib, rows])
    for i, (x_s, y_s, dst_ref) in enumerate([
        (do_s, st_s, dqs_ref),  # d q_s = dO S^T
        (du_s, st_s, dwk_ref),  # -d w_k = dU S^T (negated in XLA)
        (u_s, gt_s, dko_ref)]):  # d k_out = U G^T
      slot = out_s.at[i if nvb > 1 else 0]
      x = _mm(x_s, y_s, (C, K))  # [C, BVC] x [BVC, K]
      if j:
        x = x + slot[...]
      elif i and nvb == 1:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      slot[...] = x
      if last:
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(slot, dst_ref.at[ib, rows])
    if not last:
      plgpu.commit_smem()  # this block's reads come before the next TMA
      fetch_block(j + 1)
  plgpu.wait_smem_to_gmem(0)


def _input_grads_scratch(K, V, dtype):
  """dO, U, dU [C, BVC]; the V block of the chunk's S^T and G^T [BVC, K]
  (BVC = ``v_block(V)``); float32 [C, K] result tiles, one (reused three
  times) at V <= 128, three (the V-block sums) above; dA [C, C] float32."""
  bv = _v_block(V)
  return [_swizzled((C, bv), dtype), _swizzled((C, bv), dtype),
          _swizzled((C, bv), dtype), _swizzled((bv, K), dtype),
          _swizzled((bv, K), dtype),
          _swizzled((1 if V <= bv else 3, C, K), _F32),
          _swizzled((C, C), _F32)]


def _input_grads_call(do, u, du, hs, gs, *, interpret):
  """The factors' cotangents, float32: d q_s, dU S^T (= -d w_k), d k_out
  [BH, Tp, Kp] and dA [BH, Tp, C]. Grid (BH, N), one chunk per program: four
  wgmmas (dO U^T, dO S^T, dU S^T, U G^T) per V block of BVC = ``v_block(Vp)``
  columns, the blocks' tiles fetched in turn (the next while this one's sums
  are stored) and the products summed over the blocks in float32 SMEM.
  SMEM (``_input_grads_scratch``): 163,880 B at K = V = 128, 73,768 B at
  K = V = 64; at V >= 256 (three float32 sum tiles) 229,416 B at K = 128,
  147,496 B at K = 64. Registers: one [C, K] product and its running sum at
  a time (2 x 64 at K = 128)."""
  BH, Tp, V = do.shape
  K = hs.shape[-1]
  name = "delta_rule_input_grads_mgpu"
  f32 = lambda d: jax.ShapeDtypeStruct((BH, Tp, d), _F32)  # noqa: E731
  return plgpu.kernel(
      _input_grads_kernel,
      out_type=(f32(K), f32(K), f32(K), f32(C)),
      scratch_types=[*_input_grads_scratch(K, V, do.dtype),
                     plgpu.Barrier(num_barriers=KERNELS[name][1])],
      grid=(BH, Tp // C), grid_names=("b", "n"),
      compiler_params=_PARAMS, interpret=interpret, kernel_name=name,
  )(do, u, du, hs, gs)


# ------------------------------------------------- pallas_vjp launchers ---
# ``pallas_vjp.Kernels`` on its layout (q, k [BH, Tp, Kp], v [BH, Tp, Vp],
# beta, g [BH, Tp, 1] float32, states [BH, Kp, Vp] float32). Here ``t`` is
# T [BH, N, C, C] float32, ``h_in`` the pair (S^T per chunk, U) of
# ``_states_call`` and ``dh_out`` the pair (G^T per chunk, dU) of
# ``_state_grads_call``: opaque to pallas_vjp, which only passes them on.


def prepare(k, beta, g, *, docs, chunk, interpret):
  """T = (I + L)^{-1} of every chunk, in XLA (see the module docstring)."""
  del chunk, interpret
  return unit_lower_inverse(_intra(k, beta, g, _doc_masks(docs)))


def states(k, v, beta, g, t, h0, *, docs, chunk, interpret):
  del chunk
  dtype = k.dtype
  w_k, k_out, d_out = _key_factors(t, k, beta, g, _doc_masks(docs))
  w_v = _value_factor(t, v, beta)
  hs, u, h_tt = _states_call(
      _flat(w_k).astype(dtype), _flat(w_v), _flat(k_out).astype(dtype),
      _decay_rows(d_out, k.shape[-1]), jnp.swapaxes(h0, 1, 2),
      interpret=interpret)
  return (hs, u), jnp.swapaxes(h_tt, 1, 2)


def output(q, k, v, beta, g, t, h_in, *, docs, scale, chunk, interpret):
  del v, beta, t, chunk
  hs, u = h_in
  q_s, a = _query_factors(q, k, g, scale, _doc_masks(docs))
  return _output_call(_flat(q_s).astype(q.dtype), _flat(a).astype(q.dtype), u,
                      hs, interpret=interpret)


def state_grads(q, k, beta, g, t, do, dh_t, *, docs, scale, chunk, interpret):
  del chunk
  dtype = q.dtype
  masks = _doc_masks(docs)
  w_k, k_out, d_out = _key_factors(t, k, beta, g, masks)
  q_s, a = _query_factors(q, k, g, scale, masks)
  gs, du, dh0t = _state_grads_call(
      *(_flat(x).astype(dtype) for x in (k_out, q_s, w_k, a)), do,
      _decay_rows(d_out, k.shape[-1]), jnp.swapaxes(dh_t, 1, 2),
      interpret=interpret)
  return (gs, du), jnp.swapaxes(dh0t, 1, 2)


def input_grads(q, k, v, beta, g, t, do, h_in, dh_out, *, docs, scale, chunk,
                interpret):
  """dq, dk, dv, dbeta, d log_g (float32, kernel layout): the factors'
  cotangents from ``_input_grads_call`` (and dU, d d_out), pulled back to the
  inputs through the factor functions in XLA; T's cotangent through the
  closed-form inverse VJP to L, and L's to k, beta, log_g."""
  del chunk
  masks = _doc_masks(docs)
  (hs, u), (gs, du) = h_in, dh_out
  d_qs, neg_dwk, d_kout, d_a = _input_grads_call(do, u, du, hs, gs,
                                                 interpret=interpret)
  # d d_out = sum(S o G) per chunk (the transposes of both: same sum).
  d_dout = jnp.sum(hs.astype(_F32) * gs.astype(_F32), axis=(2, 3))  # [BH, N]
  xs = tuple(x.astype(_F32) for x in (q, k, v))

  def factors(t, q, k, v, beta, g):
    return (*_key_factors(t, k, beta, g, masks), _value_factor(t, v, beta),
            *_query_factors(q, k, g, scale, masks))

  _, pullback = jax.vjp(factors, t, *xs, beta, g)
  cts = (-_chunks(neg_dwk), _chunks(d_kout), d_dout, _chunks(du), _chunks(d_qs),
         _chunks(d_a))
  dt, dq, dk, dv, dbeta, dg = pullback(cts)
  # T = (I + L)^{-1}: dL = -T^T dT T^T on the strict lower triangle.
  tt = jnp.swapaxes(t, -1, -2)
  strict, _ = _masks()
  dl = jnp.where(strict, -_einsum("...ij,...jk,...kl->...il", tt, dt, tt), 0.0)
  _, intra_pullback = jax.vjp(lambda k, beta, g: _intra(k, beta, g, masks),
                              xs[1], beta, g)
  dk2, dbeta2, dg2 = intra_pullback(dl)
  return dq, dk + dk2, dv, dbeta + dbeta2, dg + dg2


# ------------------------------------------------------------ SMEM sizes ---

# name -> (scratch shapes fn(K, V, dtype), barriers, has cross-warp reductions)
KERNELS = {
    "delta_rule_states_mgpu": (_states_scratch, 9, False),
    "delta_rule_output_mgpu": (_output_scratch, 4, False),
    "delta_rule_state_grads_mgpu": (_state_grads_scratch, 13, False),
    "delta_rule_input_grads_mgpu": (_input_grads_scratch, 5, False),
}


def smem_bytes(name: str, K: int, V: int, dtype) -> int:
  """Dynamic SMEM of kernel ``name`` at padded head dims K, V: its scratch
  tiles, each aligned to 1 KiB as Pallas allocates them, its barriers, and the
  reduction scratch for kernels that reduce across warps (none here)."""
  scratch, barriers, reduces = KERNELS[name]
  return mosaic_gpu.scratch_bytes(scratch(K, V, dtype), barriers, reduces)


# ------------------------------------------------------------------- op ---


def delta_rule(q, k, v, beta, log_g, *, h0, scale: float, chunk_size: int = 64,
               interpret=False, resets=None):
  """Mosaic GPU delta rule. Arguments as in ``chunked.delta_rule``.

  Args:
    q, k: [B, T, H, K], bfloat16 or float16 (k L2-normalised by the caller).
    v: [B, T, H, V], q's dtype.
    beta: float32 [B, T, H] write strengths in [0, 2].
    log_g: float32 [B, T, H] log decays (zeros for plain DeltaNet).
    h0: float32 [B, H, K, V] initial state.
    scale: query scale.
    chunk_size: must be 64 (one wgmma tile of tokens).
    interpret: False (compile for the GPU), True (the Mosaic GPU
      interpreter, ``plgpu.InterpretGPUParams()``) or a
      ``plgpu.InterpretGPUParams`` (any platform).
    resets: None, or ``segments.resets(segment_ids)`` (packed documents:
      cut into the per-chunk factors in XLA, ``_doc_masks``).

  Returns:
    o: [B, T, H, V] in q's dtype; h_T: [B, H, K, V] float32.

  Raises:
    ValueError: float32 inputs, chunk_size != 64, K over 128 or V over 512.
  """
  K, V = q.shape[-1], v.shape[-1]
  mosaic_gpu.check_inputs(_OP, q.dtype, chunk_size, K, V)
  # Head dims to 64, 128, 256 or 512 (whole 128-byte swizzled bf16 rows,
  # wgmma steps of 64, whole V blocks); pallas_vjp's own padding then leaves
  # them as they are.
  Kp, Vp = _padded(K), _padded(V)
  pad = functools.partial(kernel_shapes.pad_axis, axis=3)
  h0p = kernel_shapes.pad_axis(kernel_shapes.pad_axis(h0, 2, Kp), 3, Vp)
  kernels = pallas_vjp.bind(prepare, states, output, state_grads, input_grads,
                            scale=scale, chunk=C,
                            interpret=_interpret_params(interpret))
  o, h_t = pallas_vjp.delta_rule(kernels, pad(q, size=Kp), pad(k, size=Kp),
                                 pad(v, size=Vp), beta, log_g, h0=h0p,
                                 chunk_size=C, resets=resets)
  return o[..., :V], h_t[:, :, :K, :V]
