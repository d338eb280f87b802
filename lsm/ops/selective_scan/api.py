"""Public selective scan op: input checks, dispatch on ``impl=``."""

import jax.numpy as jnp
import numpy as np

from lsm.ops import _dispatch
from lsm.ops.common import checks, segments
from lsm.ops.selective_scan import chunked, reference

_IMPLS = {"reference": reference.selective_scan, "chunked": chunked.selective_scan}
_ACCEPTS = {"reference": reference.ACCEPTS, "chunked": chunked.ACCEPTS}
_OP = "selective_scan"
EIGENVALUE_RANGES = reference.EIGENVALUE_RANGES


def _check_range(op: str, eigenvalue_range) -> None:
  if eigenvalue_range not in EIGENVALUE_RANGES:
    raise ValueError(f"{op}: eigenvalue_range={eigenvalue_range!r}; expected one "
                     f"of {EIGENVALUE_RANGES}")


def _check_bc(op: str, names, arrays, lead, lead_letters, E: int, N: int):
  """B and C: [*lead, N] (one group) or [*lead, G, N] with G dividing E.
  Returns both as [*lead, G, N]."""
  out = []
  for name, v in zip(names, arrays):
    checks.check_floating(op, name, v)
    if np.ndim(v) == len(lead) + 1:
      checks.check_shape(op, name, v, (*lead, N), (*lead_letters, "N"))
      v = v[..., None, :]
    else:
      checks.check_shape(op, name, v, (*lead, None, N), (*lead_letters, "G", "N"))
      G = np.shape(v)[-2]
      if G < 1 or E % G:
        raise ValueError(f"{op}: {name} has {G} groups (shape {np.shape(v)}); "
                         f"expected a number of groups G that divides E={E}")
    out.append(v)
  if out[0].shape[-2] != out[1].shape[-2]:
    raise ValueError(f"{op}: {names[0]} has {out[0].shape[-2]} groups and "
                     f"{names[1]} {out[1].shape[-2]}; expected the same G")
  return out


def _check_common(op, names, x, dt, A, D, letters):
  """x and dt (named ``names``) of shape [*letters] with E last; A [E, N]; D
  None or [E]. Returns (x's shape, E, N)."""
  x_name, dt_name = names
  checks.check_floating(op, x_name, x)
  checks.check_shape(op, x_name, x, (None,) * len(letters), letters)
  shape = tuple(np.shape(x))
  checks.check_floating(op, dt_name, dt)
  checks.check_shape(op, dt_name, dt, shape, letters)
  E = shape[-1]
  checks.check_floating(op, "A", A)
  checks.check_shape(op, "A", A, (E, None), "EN")
  if D is not None:
    checks.check_floating(op, "D", D)
    checks.check_shape(op, "D", D, (E,), "E")
  return shape, E, np.shape(A)[1]


def selective_scan(x, dt, A, B, C, *, D=None, h0=None, chunk_size=64,
                   impl="auto", eigenvalue_range="positive", segment_ids=None):
  """Selective SSM scan (Mamba). Matches ``reference.selective_scan``; the
  math is there.

  Computes y_t = C_t . h_t + D x_t with h_t = a_t * h_{t-1} + dt_t x_t B_t and
  a_t = exp(dt_t A) ("positive") or 2 exp(dt_t A) - 1 ("signed"), without
  materialising the [B, T, E, N] states in the chunked impl.

  Args:
    x: [B, T, E] inputs; float32, bfloat16 or float16.
    dt: [B, T, E] step sizes (Mamba: a softplus, > 0); any float dtype.
    A: [E, N] continuous-time diagonal (Mamba: -exp(A_log) < 0); any float.
    B: [B, T, N] input vectors shared by all channels, or [B, T, G, N] with
      one per group of E / G consecutive channels (G dividing E).
    C: readout vectors, B's shape.
    D: optional [E] skip; none when None.
    h0: optional [B, E, N] float32 initial state; zeros when None.
    chunk_size: tokens per chunk of the chunked impl (any positive int; T need
      not divide it). The chunked impl keeps one state per chunk boundary and
      one chunk's states at a time.
    impl: "auto" | "reference" | "chunked".
    eigenvalue_range: "positive" (a_t in [0, 1] for dt A <= 0) or "signed"
      (a_t in [-1, 1]).
    segment_ids: optional int [B, T] document ids of packed rows: the state
      entering each document is zero, h0 applies to the first document of each
      row.

  Returns:
    y: [B, T, E] in x.dtype; h_T: [B, E, N] float32 final state.
  """
  (Bsz, T, E), _, N = _check_common(_OP, ("x", "dt"), x, dt, A, D, "BTE")
  B, C = _check_bc(_OP, ("B", "C"), (B, C), (Bsz, T), "BT", E, N)
  if h0 is None:
    h0 = jnp.zeros((Bsz, E, N), jnp.float32)
  checks.check_state(_OP, "h0", h0, (Bsz, E, N), "BEN")
  if (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
      or chunk_size < 1):
    raise ValueError(f"{_OP}: chunk_size={chunk_size!r}; expected a positive int")
  _check_range(_OP, eigenvalue_range)
  call = _dispatch.Call.of(x.dtype, N, E, chunk_size, "channel",
                           segment_ids is not None)
  name, kwargs = segments.resolve(_OP, impl, _ACCEPTS, call, segment_ids, Bsz,
                                  T)
  return _IMPLS[name](x, dt, A, B, C, D=D, h0=h0, chunk_size=int(chunk_size),
                      eigenvalue_range=eigenvalue_range, **kwargs)


def selective_scan_step(x_t, dt_t, A, B_t, C_t, h, *, D=None,
                        eigenvalue_range="positive"):
  """One decoding step of the selective scan, O(1) memory in T.

  Args:
    x_t: [B, E] input; float32, bfloat16 or float16.
    dt_t: [B, E] step sizes.
    A: [E, N].
    B_t, C_t: [B, N] or [B, G, N] (G dividing E).
    h: [B, E, N] float32 state before the token.
    D: optional [E] skip.
    eigenvalue_range: "positive" | "signed".

  Returns:
    y_t: [B, E] in x_t.dtype; h: [B, E, N] float32 state after the token.
  """
  op = "selective_scan_step"
  (Bsz, E), _, N = _check_common(op, ("x_t", "dt_t"), x_t, dt_t, A, D, "BE")
  B_t, C_t = _check_bc(op, ("B_t", "C_t"), (B_t, C_t), (Bsz,), "B", E, N)
  checks.check_state(op, "h", h, (Bsz, E, N), "BEN")
  _check_range(op, eigenvalue_range)
  return reference.selective_scan_step(x_t, dt_t, A, B_t, C_t, h, D=D,
                                       eigenvalue_range=eigenvalue_range)
