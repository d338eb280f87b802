r"""Diagonal SSM scan in parallel form, pure JAX. The recurrence is defined in
``reference.py``; this computes the same function.

The impl is named "chunked" to fill the op contract's portable slot (what
``impl="auto"`` picks off TPU/GPU kernels), but it is not chunked: it is a
parallel prefix scan, ``jax.lax.associative_scan`` over the time axis, O(log T)
depth. Each token is the affine map h -> a_t h + b_t, and composing two maps
(first (a1, b1), then (a2, b2)) is again affine:

    (a1, b1) o (a2, b2) = (a1 * a2, a2 * b1 + b2)

so the b-part of the inclusive scan is h_t once h0 is folded into the first
token, b_0 <- b_0 + a_0 * h0. Only products and sums appear: no logs and no
divisions, which would break for a = 0 or a < 0 (the log-space cumsum trick of
positive-decay scans does not apply here).

Backward (``jax.custom_vjp``). The adjoint of a linear recurrence is the same
recurrence run backwards in time. With dy_t the output cotangent and dh_T the
final-state cotangent,

    lam_t = dy_t + a_{t+1} lam_{t+1},   lam_{T-1} = dy_{T-1} + dh_T
    db_t  = lam_t,   da_t = lam_t * h_{t-1} (h_{-1} = h0),   dh0 = a_0 * lam_0

and lam is computed by the same associative scan with ``reverse=True``, so the
backward is also O(log T) depth. Residuals are a, the float32 states h (the scan
outputs) and h0; autodiff through ``associative_scan`` would instead keep every
level's partial products.

All arithmetic is float32; y comes back in b's dtype, cotangents in the input
dtypes.
"""

import jax
import jax.numpy as jnp


def _combine(x1, x2):
  """Composes the affine maps x1 = (a1, b1), then x2 = (a2, b2)."""
  a1, b1 = x1
  a2, b2 = x2
  return a1 * a2, a2 * b1 + b2


def _linear_scan(a, b, reverse: bool = False):
  """h_t = a_t * h_{t-1} + b_t over axis 1 from a zero state (from t = T-1 down
  to 0 when ``reverse``, with h_{t+1} in place of h_{t-1}). float32 in and out."""
  return jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=1)[1]


def _states(a, b, h0):
  """All float32 states h_t, [B, T, ...]."""
  f32 = jnp.float32
  a = a.astype(f32)
  b = b.astype(f32).at[:, 0].add(a[:, 0] * h0)
  return _linear_scan(a, b)


@jax.custom_vjp
def _scan(a, b, h0):
  h = _states(a, b, h0)
  return h.astype(b.dtype), h[:, -1]


def _scan_fwd(a, b, h0):
  h = _states(a, b, h0)
  return (h.astype(b.dtype), h[:, -1]), (a, h, h0)


def _scan_bwd(res, cts):
  a, h, h0 = res
  dy, dh_t = cts  # dy in b's dtype (y's), dh_t float32
  f32 = jnp.float32
  a32 = a.astype(f32)
  g = dy.astype(f32).at[:, -1].add(dh_t)
  # lam_t = a_{t+1} lam_{t+1} + g_t; nothing flows in after T-1, so the last
  # multiplier is irrelevant and set to 0.
  a_next = jnp.concatenate([a32[:, 1:], jnp.zeros_like(a32[:, :1])], axis=1)
  lam = _linear_scan(a_next, g, reverse=True)  # [B, T, ...]
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  da = (lam * h_prev).astype(a.dtype)
  db = lam.astype(dy.dtype)
  dh0 = a32[:, 0] * lam[:, 0]
  return da, db, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def ssm_scan(a, b, *, h0):
  """Parallel diagonal SSM scan. Arguments as in ``lsm.ops.ssm_scan.ssm_scan``,
  with ``h0`` a float32 array."""
  return _scan(a, b, h0)
