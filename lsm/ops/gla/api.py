"""Public GLA op: input checks, gate forms, dispatch on ``impl=``."""

import jax.numpy as jnp

from lsm.ops import _dispatch
from lsm.ops.common import checks, segments
from lsm.ops.gla import (chunked, pallas_mosaic_gpu, pallas_triton, pallas_tpu,
                         reference)

_MODULES = {"reference": reference, "chunked": chunked,
            "pallas_mosaic_gpu": pallas_mosaic_gpu,
            "pallas_triton": pallas_triton, "pallas_tpu": pallas_tpu}
_IMPLS = {name: m.gla for name, m in _MODULES.items()}
# What each impl takes, as it states beside its kernels.
_ACCEPTS = {name: m.ACCEPTS for name, m in _MODULES.items()}
_OP = "gla"
# Impls with a no-decay form for log_g=None (skipping the gate factors, and
# the constant all-zero gate that XLA would otherwise fold: 3.8x the time on
# CPU at Based's K = 273); the others get zeros.
_UNGATED = ("chunked",)
# Impls that read one gate per head, [B, T, H], as it is (chunked: its
# scalar-decay form, lsm/ops/gla/chunked_scalar.py; pallas_triton and
# pallas_tpu: kernels that load a [C] gate column per chunk, see
# lsm/ops/gla/chunk_tiles.py; pallas_mosaic_gpu: kernels that load a [C] row
# of gate sums per chunk, see lsm/ops/gla/pallas_mosaic_gpu.py). That is every
# impl: no gate is ever broadcast over K.
_HEAD_GATES = ("reference", "chunked", "pallas_triton", "pallas_tpu",
               "pallas_mosaic_gpu")
# Key groups (q, k with G heads for v's H, G < H: Mamba-2's B and C, shared by
# all heads as in the paper) reach "chunked" with per-head gates as they are:
# its scalar-decay form forms one [C, C] q k^T per group and applies each
# head's gates to [C, C] and [C, V] terms, so no [B, T, H, K] copy of q or k
# exists. Every other impl and gate form gets q and k repeated to H heads
# (``_expand_groups``).


def _expand_groups(name: str, gate, q, k, H: int):
  """q, k as impl ``name`` reads them for ``gate`` ("head", "channel", None)."""
  G = q.shape[-2]
  if G == H or (name == "chunked" and gate == "head"):
    return q, k
  return jnp.repeat(q, H // G, axis=-2), jnp.repeat(k, H // G, axis=-2)


def _gate(log_g, shape, op: str, name: str):
  """None, [*lead] or [*lead, K] log gates -> float32 of the same shape (one
  gate per head stays one gate per head), or None for None (each impl then has
  no decay; see ``gla``)."""
  *lead, K = shape
  if log_g is None:
    return None
  checks.check_floating(op, name, log_g)
  letters = "BTH" if len(lead) == 3 else "BH"  # sequence or one decoding step
  if jnp.ndim(log_g) == len(lead):
    checks.check_shape(op, name, log_g, lead, letters)
  else:
    checks.check_shape(op, name, log_g, shape, letters + "K")
  return log_g.astype(jnp.float32)


def gla(q, k, v, log_g=None, *, h0=None, scale=None, chunk_size=64, impl="auto",
        interpret=False, segment_ids=None):
  """Gated linear attention. Matches ``reference.gla``; the math is there.

  Args:
    q: [B, T, H, K] queries (float32, bfloat16 or float16), or [B, T, G, K]
      with G a divisor of H: key groups, heads g * H / G to (g + 1) * H / G - 1
      sharing head g's q and k (Mamba-2's B and C; "chunked" with per-head
      gates reads them as they are, every other impl and gate form gets them
      repeated to H heads).
    k: keys, q's shape and dtype.
    v: [B, T, H, V] values, q's dtype.
    log_g: log forget gates, <= 0: [B, T, H, K] per channel, [B, T, H] one per
      head (used as it is by every impl: each has a scalar-decay form), or
      None for no decay. Any float dtype; used in float32.
    h0: optional [B, H, K, V] float32 initial state; zeros when None.
    scale: query scale; K ** -0.5 when None.
    chunk_size: chunk length C: for "chunked" at most 16 or a multiple of 16,
      for "pallas_triton" and "pallas_tpu" 16, 32, 64 or 128, for
      "pallas_mosaic_gpu" 64. T need not be a multiple of it.
    impl: "auto" | "reference" | "chunked" | "pallas_mosaic_gpu" (Hopper and
      newer; bfloat16 / float16 inputs, K up to 128, V up to 512) |
      "pallas_triton" | "pallas_tpu" (K up to 256, V up to 512). Each impl's
      ``ACCEPTS`` states what it takes: "auto" takes the first in the
      platform's order that accepts the call (``_dispatch.resolve``), an
      explicit impl raises naming the limit the call hits.
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
  B, T, H, K, V = checks.check_qkv(_OP, q, k, v, grouped=True)
  gate = None if log_g is None else (
      "head" if jnp.ndim(log_g) == 3 else "channel")
  log_g = _gate(log_g, (B, T, H, K), _OP, "log_g")
  if h0 is None:
    h0 = jnp.zeros((B, H, K, V), jnp.float32)
  checks.check_state(_OP, "h0", h0, (B, H, K, V), "BHKV")
  checks.check_scale(_OP, scale)
  checks.check_chunk_size(_OP, chunk_size)
  call = _dispatch.Call.of(q.dtype, K, V, chunk_size, gate,
                           segment_ids is not None)
  name, kwargs = segments.resolve(_OP, impl, _ACCEPTS, call, segment_ids, B, T)
  scale = K ** -0.5 if scale is None else float(scale)
  kwargs |= _dispatch.pallas_kwargs(_OP, name, interpret)
  if log_g is None and name not in _UNGATED:
    log_g = jnp.zeros((B, T, H), jnp.float32)
  form = None if log_g is None else ("head" if log_g.ndim == 3 else "channel")
  q, k = _expand_groups(name, form, q, k, H)
  return _IMPLS[name](q, k, v, log_g, h0=h0, scale=scale,
                      chunk_size=chunk_size, **kwargs)


def gla_step(q_t, k_t, v_t, log_g_t, h, *, scale=None):
  """One decoding step of GLA, O(1) memory in T.

  Args:
    q_t: [B, H, K] query (or [B, G, K], key groups as in ``gla``); k_t: key,
      q_t's shape; v_t: [B, H, V] value.
    log_g_t: [B, H, K], [B, H] or None, as ``log_g`` in ``gla``.
    h: [B, H, K, V] float32 state before the token.
    scale: query scale; K ** -0.5 when None.

  Returns:
    o_t: [B, H, V] in q_t.dtype; h: [B, H, K, V] float32 state after the token.
  """
  op = "gla_step"
  B, H, K, _ = checks.check_qkv(op, q_t, k_t, v_t, step=True, grouped=True)
  q_t, k_t = _expand_groups("reference", None, q_t, k_t, H)
  checks.check_state(op, "h", h, (B, H, K, v_t.shape[-1]), "BHKV")
  checks.check_scale(op, scale)
  log_g_t = _gate(log_g_t, (B, H, K), op, "log_g_t")
  scale = K ** -0.5 if scale is None else float(scale)
  return reference.gla_step(q_t, k_t, v_t, log_g_t, h, scale=scale)
