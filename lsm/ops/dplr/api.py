"""Public DPLR op (diagonal-plus-low-rank transitions): input checks, dispatch
on ``impl=``.

One op for DeltaNet, Gated DeltaNet, KDA, RWKV-7, DeltaProduct and
flash-linear-attention's gdn2: the recurrence and the mapping of each model
onto it are in ``reference.py``'s docstring.

Impls: "reference" (float32 token loop, the definition) and "chunked"
(pure-JAX chunkwise form). "auto" resolves to "chunked" on every platform:
there are no Pallas kernels yet. A kernel would need, per chunk, the four pair
matrices (q and the shifted a against b and u; per-channel gates as 16 x 16
log-space diagonal blocks plus pivoted off-diagonal blocks, see
``chunked.py``), the unit-lower-triangular inverse of I - M_ab (the delta
rule's ``chunk_tiles.unit_lower_inverse`` applies unchanged), and a state pass
R = W_v + W_s S, S' = exp(G_C) S + B~^T R + U~^T V: the delta rule's kernel
structure with two extra [C, K] operands (b, u apart from a) and a [K]
decay instead of a scalar. Once one exists it declares its ``ACCEPTS`` and
joins ``_MODULES``; "auto" then walks ``_dispatch``'s preference as the other
ops do.
"""

import jax.numpy as jnp

from lsm.ops import _dispatch
from lsm.ops.common import checks, segments
from lsm.ops.dplr import chunked, reference

_MODULES = {"reference": reference, "chunked": chunked}
_IMPLS = {name: m.dplr for name, m in _MODULES.items()}
# What each impl takes, as it states beside its code.
_ACCEPTS = {name: m.ACCEPTS for name, m in _MODULES.items()}
_OP = "dplr"


def _check_inputs(op, q, a, b, u, v, *, step: bool):
  """q, a, b, u [*lead, K] and v [*lead, V], one floating dtype; returns
  (*lead, K, V)."""
  suffix, lead = ("_t", "BH") if step else ("", "BTH")
  names = [n + suffix for n in ("q", "a", "b", "u", "v")]
  checks.check_shape(op, names[0], q, (None,) * (len(lead) + 1), lead + "K")
  checks.check_floating(op, names[0], q)
  *dims, K = jnp.shape(q)
  for name, x in zip(names[1:4], (a, b, u)):
    checks.check_shape(op, name, x, (*dims, K), lead + "K")
    checks.check_same_dtype(op, name, x, names[0], q)
  checks.check_shape(op, names[4], v, (*dims, None), lead + "V")
  checks.check_same_dtype(op, names[4], v, names[0], q)
  return (*dims, K, jnp.shape(v)[-1])


def _gate(op, name, log_g, lead, K):
  """None, per head [*lead] or per channel [*lead, K] log decays -> float32 of
  the same shape (a per-head gate stays one number per head)."""
  if log_g is None:
    return None
  checks.check_floating(op, name, log_g)
  letters = "BTH" if len(lead) == 3 else "BH"
  if jnp.ndim(log_g) == len(lead):
    checks.check_shape(op, name, log_g, lead, letters)
  else:
    checks.check_shape(op, name, log_g, (*lead, K), letters + "K")
  return log_g.astype(jnp.float32)


def dplr(q, a, b, u, v, log_g=None, *, h0=None, scale=None, chunk_size=64,
         impl="auto", segment_ids=None):
  """Diagonal-plus-low-rank recurrence S_t = (diag(exp g_t) + b_t a_t^T)
  S_{t-1} + u_t v_t^T, o_t = scale * S_t^T q_t. Matches ``reference.dplr``;
  the math is there.

  Args:
    q: [B, T, H, K] queries (float32, bfloat16 or float16).
    a: [B, T, H, K] read vectors of the rank-one term (a_t^T S_{t-1}), q's dtype.
    b: [B, T, H, K] write vectors of the rank-one term, q's dtype.
    u: [B, T, H, K] keys of the rank-one input u_t v_t^T, q's dtype.
    v: [B, T, H, V] values, q's dtype.
    log_g: log decays <= 0: [B, T, H, K] per key channel, [B, T, H] one per
      head, or None (no decay). Any float dtype.
    h0: optional [B, H, K, V] float32 initial state; zeros when None.
    scale: the query scale, multiplying every output (o_t = scale * S_t^T q_t;
      the state does not see it); K ** -0.5 when None, as in ``gla`` and
      ``delta_rule``, so the models that map onto this op keep their scale.
    chunk_size: chunk length C for "chunked": at most 16 or a multiple of 16.
      T need not be a multiple of it.
    impl: "auto" (= "chunked" everywhere; no Pallas kernels yet) |
      "reference" | "chunked".
    segment_ids: optional int [B, T] document ids of packed rows (a token
      starts a document where its id differs from the previous token's): the
      state entering each document is zero, h0 applies to the first document
      of each row.

  Returns:
    o: [B, T, H, V] in q.dtype; h_T: [B, H, K, V] float32 final state.
  """
  B, T, H, K, V = _check_inputs(_OP, q, a, b, u, v, step=False)
  gate = None if log_g is None else ("head" if jnp.ndim(log_g) == 3 else "channel")
  log_g = _gate(_OP, "log_g", log_g, (B, T, H), K)
  if h0 is None:
    h0 = jnp.zeros((B, H, K, V), jnp.float32)
  checks.check_state(_OP, "h0", h0, (B, H, K, V), "BHKV")
  checks.check_scale(_OP, scale)
  checks.check_chunk_size(_OP, chunk_size)
  call = _dispatch.Call.of(q.dtype, K, V, chunk_size, gate,
                           segment_ids is not None)
  name, kwargs = segments.resolve(_OP, impl, _ACCEPTS, call, segment_ids, B, T)
  scale = K ** -0.5 if scale is None else float(scale)
  return _IMPLS[name](q, a, b, u, v, log_g, h0=h0, scale=scale,
                      chunk_size=chunk_size, **kwargs)


def dplr_step(q_t, a_t, b_t, u_t, v_t, log_g_t, h, *, scale=None):
  """One decoding step of ``dplr``, O(1) memory in T.

  Args:
    q_t, a_t, b_t, u_t: [B, H, K] (one floating dtype).
    v_t: [B, H, V], q_t's dtype.
    log_g_t: [B, H, K] per channel, [B, H] per head, or None.
    h: [B, H, K, V] float32 state before the token.
    scale: query scale; K ** -0.5 when None.

  Returns:
    o_t: [B, H, V] in q_t.dtype; h: [B, H, K, V] float32 state after the token.
  """
  op = "dplr_step"
  B, H, K, V = _check_inputs(op, q_t, a_t, b_t, u_t, v_t, step=True)
  log_g_t = _gate(op, "log_g_t", log_g_t, (B, H), K)
  checks.check_state(op, "h", h, (B, H, K, V), "BHKV")
  checks.check_scale(op, scale)
  scale = K ** -0.5 if scale is None else float(scale)
  return reference.dplr_step(q_t, a_t, b_t, u_t, v_t, log_g_t, h, scale=scale)
