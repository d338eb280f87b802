r"""Selective (input-dependent) diagonal SSM scan of Mamba (Gu & Dao 2023): the
definition.

Per batch element, with E channels, N state entries per channel, G groups of
P = E / G channels sharing one B_t and C_t (G = 1: every channel shares them,
as in Mamba), and a float32 state h_t [E, N]:

    a_t[e, n] = exp(dt_t[e] A[e, n])                 eigenvalue_range="positive"
              = 2 exp(dt_t[e] A[e, n]) - 1           eigenvalue_range="signed"
    h_t[e, n] = a_t[e, n] h_{t-1}[e, n] + (dt_t[e] x_t[e]) B_t[g(e), n]
    y_t[e]    = sum_n h_t[e, n] C_t[g(e), n] + D[e] x_t[e]

for t = 0 .. T-1, h_{-1} = h0 (zeros when absent), g(e) = e // P, and D = 0 when
absent. b_t = dt_t B_t x_t is Mamba's simplified zero-order hold (Euler for B),
exactly what ``lsm.layers.mamba`` computed before this op existed, in the same
order of operations. A is normally negative (A = -exp(A_log)) and dt positive
(a softplus), so "positive" decays lie in [0, 1] and "signed" ones in [-1, 1]
(Grazzi et al. 2024: the op, not the layer, owns the negative-eigenvalue map).
Nothing here takes a log of a_t or divides by it: zero and negative decays are
exact in every impl.

Packed documents (``segment_ids``, see ``lsm.ops.common.segments``): where token
t starts a document (t > 0), h_{t-1} is replaced by 0 (equivalently a_t = 0);
h0 enters the row's first document only.

This module is a token-by-token ``lax.scan`` in float32 with ``precision=
"highest"`` readouts. It is the ground truth the fast impls are tested against,
not a fast path: its autodiff keeps every state, [B, T, E, N].
"""

import jax
import jax.numpy as jnp

from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

EIGENVALUE_RANGES = ("positive", "signed")
_HIGHEST = jax.lax.Precision.HIGHEST


def decay(dt, A, eigenvalue_range: str):
  """a = exp(dt A), or 2 exp(dt A) - 1 for "signed".

  Args:
    dt: [..., G, P] float32 step sizes.
    A: [G, P, N] float32.
    eigenvalue_range: "positive" | "signed".

  Returns:
    [..., G, P, N] float32 decays.
  """
  a = jnp.exp(dt[..., None] * A)
  return 2 * a - 1 if eigenvalue_range == "signed" else a


def grouped(x, dt, A, B, C, D, h0):
  """float32 views of the op's arguments with E split into G groups of P.

  Args:
    x, dt: [B, T, E] (or [B, E] for one token); A: [E, N]; B, C: [B, T, G, N]
      (or [B, G, N]); D: [E] or None; h0: [B, E, N] float32.

  Returns:
    x, dt: [..., G, P]; A: [G, P, N]; B, C: as given, float32; D: [G, P] (zeros
    when None); h0: [B, G, P, N].
  """
  f32 = jnp.float32
  G, (E, N) = B.shape[-2], A.shape
  P = E // G
  split = lambda v: v.astype(f32).reshape(*v.shape[:-1], G, P)  # noqa: E731
  D = jnp.zeros((E,), f32) if D is None else D
  return (split(x), split(dt), A.astype(f32).reshape(G, P, N), B.astype(f32),
          C.astype(f32), split(D), h0.reshape(h0.shape[0], G, P, N))


def step_grouped(x_t, dt_t, A, B_t, C_t, D, h, eigenvalue_range):
  """One token on grouped float32 arrays: x_t, dt_t [B, G, P]; A [G, P, N];
  B_t, C_t [B, G, N]; D [G, P]; h [B, G, P, N]. Returns (y_t [B, G, P], h)."""
  a = decay(dt_t, A, eigenvalue_range)
  h = a * h + (dt_t * x_t)[..., None] * B_t[..., None, :]
  y = jnp.einsum("bgpn,bgn->bgp", h, C_t, precision=_HIGHEST) + D * x_t
  return y, h


def selective_scan_step(x_t, dt_t, A, B_t, C_t, h, *, D=None,
                        eigenvalue_range="positive"):
  """One decoding token. Arguments as in ``lsm.ops.selective_scan.
  selective_scan_step`` (B_t, C_t already [B, G, N]).

  Returns:
    y_t: [B, E] in x_t.dtype; h: [B, E, N] float32 state after the token.
  """
  xg, dtg, Ag, Bg, Cg, Dg, hg = grouped(x_t, dt_t, A, B_t, C_t, D, h)
  y, hg = step_grouped(xg, dtg, Ag, Bg, Cg, Dg, hg, eigenvalue_range)
  return y.reshape(x_t.shape).astype(x_t.dtype), hg.reshape(h.shape)


def selective_scan(x, dt, A, B, C, *, D, h0, chunk_size=None,
                   eigenvalue_range="positive", resets=None):
  """Selective scan over a sequence, token by token. Arguments as in
  ``lsm.ops.selective_scan.selective_scan`` (B, C already [B, T, G, N]; h0 a
  float32 array); ``chunk_size`` is ignored. ``resets`` (bool [B, T],
  ``segments.resets(segment_ids)``) zeroes the state entering each document's
  first token."""
  del chunk_size
  xg, dtg, Ag, Bg, Cg, Dg, hg = grouped(x, dt, A, B, C, D, h0)
  if resets is None:
    resets = jnp.zeros(x.shape[:2], bool)
  xs = tuple(jnp.moveaxis(v, 1, 0) for v in (xg, dtg, Bg, Cg, resets))

  def body(h, inp):
    x_t, dt_t, B_t, C_t, reset = inp
    h = jnp.where(reset[:, None, None, None], 0.0, h)
    y_t, h = step_grouped(x_t, dt_t, Ag, B_t, C_t, Dg, h, eigenvalue_range)
    return h, y_t

  h_t, y = jax.lax.scan(body, hg, xs)
  y = jnp.moveaxis(y, 0, 1).reshape(x.shape)
  return y.astype(x.dtype), h_t.reshape(h0.shape)
