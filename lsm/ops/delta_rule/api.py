"""Public delta-rule op: input checks, dispatch on ``impl=``."""

import jax.numpy as jnp

from lsm.ops import _dispatch
from lsm.ops.common import checks, segments
from lsm.ops.delta_rule import (chunked, pallas_mosaic_gpu, pallas_triton,
                                pallas_tpu, reference)

_MODULES = {"reference": reference, "chunked": chunked,
            "pallas_mosaic_gpu": pallas_mosaic_gpu,
            "pallas_triton": pallas_triton, "pallas_tpu": pallas_tpu}
_IMPLS = {name: m.delta_rule for name, m in _MODULES.items()}
# What each impl takes, as it states beside its kernels.
_ACCEPTS = {name: m.ACCEPTS for name, m in _MODULES.items()}
_OP = "delta_rule"


def _per_head(op, name, x, shape, letters, *, default=None):
  """Checks a per-head scalar sequence ([B, T, H] or [B, H]) -> float32."""
  if x is None:
    return jnp.full(shape, default, jnp.float32)
  checks.check_floating(op, name, x)
  checks.check_shape(op, name, x, shape, letters)
  return x.astype(jnp.float32)


def delta_rule(q, k, v, beta, *, log_g=None, h0=None, scale=None, chunk_size=64,
               impl="auto", interpret=False, segment_ids=None):
  """DeltaNet, or Gated DeltaNet with ``log_g``. Matches ``reference.delta_rule``;
  the math is there.

  Args:
    q: [B, T, H, K] queries (float32, bfloat16 or float16).
    k: [B, T, H, K] keys, q's dtype, expected L2-normalised over K.
    v: [B, T, H, V] values, q's dtype.
    beta: [B, T, H] write strengths in [0, 2] (beyond 1: negative eigenvalues).
      Any float dtype.
    log_g: optional [B, T, H] log decays <= 0 (Gated DeltaNet); None for none.
    h0: optional [B, H, K, V] float32 initial state; zeros when None.
    scale: query scale; K ** -0.5 when None.
    chunk_size: chunk length C: for "chunked" at most 16 or a multiple of 16,
      for "pallas_triton" and "pallas_tpu" 16, 32, 64 or 128, for
      "pallas_mosaic_gpu" 64. T need not be a multiple of it.
    impl: "auto" | "reference" | "chunked" | "pallas_mosaic_gpu" (Hopper and
      newer; bfloat16 / float16 inputs, K and V up to 128) |
      "pallas_triton" | "pallas_tpu" (K up to 256, V up to 512).
    interpret: Pallas impls only: run the kernels in interpret mode (any
      platform, slow; for tests). True is each backend's own interpreter
      (``_dispatch.interpret_mode``: ``plgpu.InterpretGPUParams()`` for
      "pallas_mosaic_gpu", ``pltpu.InterpretParams()`` for "pallas_tpu",
      Pallas' generic one for "pallas_triton"); a params object of the
      backend may be passed instead.
    segment_ids: optional int [B, T] document ids of packed rows (a token
      starts a document where its id differs from the previous token's): the
      state entering each document is zero, h0 applies to the first document of
      each row. Every impl takes them (the Pallas kernels cut their tiles
      with the same masks as "chunked").

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32 final state.
  """
  B, T, H, K, V = checks.check_qkv(_OP, q, k, v)
  if beta is None:
    raise ValueError(f"{_OP}: beta is None; expected a [B, T, H] = {(B, T, H)} array")
  beta = _per_head(_OP, "beta", beta, (B, T, H), "BTH")
  log_g = _per_head(_OP, "log_g", log_g, (B, T, H), "BTH", default=0.0)
  if h0 is None:
    h0 = jnp.zeros((B, H, K, V), jnp.float32)
  checks.check_state(_OP, "h0", h0, (B, H, K, V), "BHKV")
  checks.check_scale(_OP, scale)
  checks.check_chunk_size(_OP, chunk_size)
  call = _dispatch.Call.of(q.dtype, K, V, chunk_size, "head",
                           segment_ids is not None)
  name, kwargs = segments.resolve(_OP, impl, _ACCEPTS, call, segment_ids, B, T)
  scale = K ** -0.5 if scale is None else float(scale)
  kwargs |= _dispatch.pallas_kwargs(_OP, name, interpret)
  return _IMPLS[name](q, k, v, beta, log_g, h0=h0, scale=scale,
                      chunk_size=chunk_size, **kwargs)


def delta_rule_step(q_t, k_t, v_t, beta_t, h, *, log_g_t=None, scale=None):
  """One decoding step of the (gated) delta rule, O(1) memory in T.

  Args:
    q_t: [B, H, K] query; k_t: [B, H, K] key; v_t: [B, H, V] value.
    beta_t: [B, H] write strength.
    h: [B, H, K, V] float32 state before the token.
    log_g_t: optional [B, H] log decay.
    scale: query scale; K ** -0.5 when None.

  Returns:
    o_t: [B, H, V] in q_t.dtype; h: [B, H, K, V] float32 state after the token.
  """
  op = "delta_rule_step"
  B, H, K, _ = checks.check_qkv(op, q_t, k_t, v_t, step=True)
  checks.check_state(op, "h", h, (B, H, K, v_t.shape[-1]), "BHKV")
  checks.check_scale(op, scale)
  if beta_t is None:
    raise ValueError(f"{op}: beta_t is None; expected a [B, H] = {(B, H)} array")
  beta_t = _per_head(op, "beta_t", beta_t, (B, H), "BH")
  log_g_t = _per_head(op, "log_g_t", log_g_t, (B, H), "BH", default=0.0)
  scale = K ** -0.5 if scale is None else float(scale)
  return reference.delta_rule_step(q_t, k_t, v_t, beta_t, log_g_t, h, scale=scale)
