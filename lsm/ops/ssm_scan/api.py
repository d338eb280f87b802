"""Public diagonal SSM scan op: input checks, dispatch on ``impl=``."""

import jax.numpy as jnp
import numpy as np

from lsm.ops import _dispatch
from lsm.ops.common import checks, segments
from lsm.ops.ssm_scan import chunked, reference

_IMPLS = {"reference": reference.ssm_scan, "chunked": chunked.ssm_scan}
_ACCEPTS = {"reference": reference.ACCEPTS, "chunked": chunked.ACCEPTS}
_OP = "ssm_scan"


def _letters(ndim: int, lead: str) -> tuple[str, ...]:
  """Shape letters for messages: lead ("BT" or "B") then D, or D1, D2, ..."""
  n = ndim - len(lead)
  return (*lead, *(("D",) if n == 1 else (f"D{i + 1}" for i in range(n))))


def ssm_scan(a, b, *, h0=None, impl="auto", segment_ids=None):
  """Diagonal SSM scan h_t = a_t * h_{t-1} + b_t. Matches ``reference.ssm_scan``;
  the math is there.

  The trailing dims are the layer's own (e.g. [B, T, D] for a linear RNN,
  [B, T, H, K, V] for a per-head SSM state); every element is an independent
  scalar recurrence. a must have b's full shape: broadcasting a over some dims
  is left to the caller (``jnp.broadcast_to``), which keeps one code path and
  one gradient shape.

  Args:
    a: [B, T, ...] decays, anywhere in [-1, 1] (zero and negative allowed); any
      float dtype.
    b: [B, T, ...] inputs, a's shape; float32, bfloat16 or float16. At least
      rank 2.
    h0: optional [B, ...] float32 initial state (b's shape without T); zeros
      when None.
    impl: "auto" | "reference" | "chunked" (a sequential in-place loop on
      CPU, a parallel prefix scan elsewhere; see ``chunked.py``).
    segment_ids: optional int [B, T] document ids of packed rows (a token
      starts a document where its id differs from the previous token's): the
      state entering each document is zero, h0 applies to the first document of
      each row.

  Returns:
    y: [B, T, ...] in b.dtype, all states h_0 .. h_{T-1}; h_T: [B, ...] float32
    final state.
  """
  checks.check_floating(_OP, "b", b)
  if np.ndim(b) < 2:
    checks.check_shape(_OP, "b", b, (None, None), "BT")
  shape = tuple(np.shape(b))
  checks.check_floating(_OP, "a", a)
  checks.check_shape(_OP, "a", a, shape, _letters(len(shape), "BT"))
  state_shape = (shape[0], *shape[2:])
  if h0 is None:
    h0 = jnp.zeros(state_shape, jnp.float32)
  checks.check_state(_OP, "h0", h0, state_shape, _letters(len(state_shape), "B"))
  # A diagonal scan has no head dims or chunks: the call is its dtype.
  call = _dispatch.Call.of(b.dtype, 1, 1, 1, "channel", segment_ids is not None)
  name, kwargs = segments.resolve(_OP, impl, _ACCEPTS, call, segment_ids,
                                  *shape[:2])
  return _IMPLS[name](a, b, h0=h0, **kwargs)


def ssm_scan_step(a_t, b_t, h):
  """One decoding step of the diagonal SSM scan, O(1) memory in T.

  Args:
    a_t: [B, ...] decay in [-1, 1], any float dtype.
    b_t: [B, ...] input, a_t's shape; float32, bfloat16 or float16. At least
      rank 1.
    h: [B, ...] float32 state before the token, b_t's shape.

  Returns:
    y_t: [B, ...] in b_t.dtype, the new state; h: [B, ...] float32 state after
    the token.
  """
  op = "ssm_scan_step"
  checks.check_floating(op, "b_t", b_t)
  if np.ndim(b_t) < 1:
    checks.check_shape(op, "b_t", b_t, (None,), "B")
  shape = tuple(np.shape(b_t))
  letters = _letters(len(shape), "B")
  checks.check_floating(op, "a_t", a_t)
  checks.check_shape(op, "a_t", a_t, shape, letters)
  checks.check_state(op, "h", h, shape, letters)
  return reference.ssm_scan_step(a_t, b_t, h)
