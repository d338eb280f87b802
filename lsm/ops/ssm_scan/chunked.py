r"""Diagonal SSM scan, fast and portable, pure JAX. The recurrence is defined in
``reference.py``; this computes the same function.

The impl fills the op contract's portable slot (what ``impl="auto"`` picks where
no kernel applies). It has two forms of the same scan, chosen per platform at
lowering time by ``jax.lax.platform_dependent``:

- "sequential" (CPU): a ``lax.fori_loop`` over time that reads token t of a and
  b in place (``dynamic_index_in_dim`` on axis 1) and writes the state into an
  output buffer updated in place. On a CPU the scan is memory-bound, and this
  form touches each array once, with no [B, T] <-> [T, B] transposes (the
  reference's ``lax.scan`` pays one per input and output) and none of the
  associative scan's strided slices. Measured in BENCHMARKS.md ("Chunked ops on
  CPU").
- "associative" (GPU, TPU): ``jax.lax.associative_scan`` over time, O(log T)
  depth, since a loop of T tiny steps is T kernel launches there. Each token is
  the affine map h -> a_t h + b_t; composing (a1, b1), then (a2, b2) gives

      (a1, b1) o (a2, b2) = (a1 * a2, a2 * b1 + b2)

  and the b-part of the inclusive scan is h_t once h0 is folded into the first
  token, b_0 <- b_0 + a_0 * h0.

Both use only products and sums: no logs and no divisions, which would break for
a = 0 or a < 0 (the log-space cumsum trick of positive-decay scans does not
apply here).

Backward (``jax.custom_vjp``, same in both forms). The adjoint of a linear
recurrence is the same recurrence run backwards in time. With dy_t the output
cotangent and dh_T the final-state cotangent,

    lam_t = dy_t + a_{t+1} lam_{t+1},   lam_{T-1} = dy_{T-1} + dh_T
    db_t  = lam_t,   da_t = lam_t * h_{t-1} (h_{-1} = h0),   dh0 = a_0 * lam_0

and lam comes from the form's scan run in reverse. Residuals are a, the float32
states h and h0; autodiff would instead keep the loop's or every scan level's
intermediates.

All arithmetic is float32; y comes back in b's dtype, cotangents in the input
dtypes.
"""

import jax
import jax.numpy as jnp

from lsm.ops.common import segments
from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

FORMS = ("sequential", "associative")


def _combine(x1, x2):
  """Composes the affine maps x1 = (a1, b1), then x2 = (a2, b2)."""
  a1, b1 = x1
  a2, b2 = x2
  return a1 * a2, a2 * b1 + b2


def _scan_associative(a, b, h_start, reverse):
  """h_t = a_t * h_{t-1} + b_t over axis 1 starting from h_start (from t = T-1
  down to 0 when ``reverse``, with h_{t+1} in place of h_{t-1}). float32."""
  first = -1 if reverse else 0
  b = b.at[:, first].add(a[:, first] * h_start)
  return jax.lax.associative_scan(_combine, (a, b), reverse=reverse, axis=1)[1]


def _scan_sequential(a, b, h_start, reverse):
  """``_scan_associative``'s result, one token per loop iteration. float32."""
  T = a.shape[1]
  take = lambda x, t: jax.lax.dynamic_index_in_dim(x, t, 1, keepdims=False)

  def body(i, carry):
    h, out = carry
    t = T - 1 - i if reverse else i
    h = take(a, t) * h + take(b, t)
    return h, jax.lax.dynamic_update_index_in_dim(out, h, t, 1)

  return jax.lax.fori_loop(0, T, body, (h_start, jnp.zeros_like(b)))[1]


_SCANS = {"sequential": _scan_sequential, "associative": _scan_associative}


def _linear_scan(a, b, h_start, reverse, form):
  if form is not None:
    return _SCANS[form](a, b, h_start, reverse)
  return jax.lax.platform_dependent(
      a, b, h_start, cpu=lambda *x: _scan_sequential(*x, reverse),
      default=lambda *x: _scan_associative(*x, reverse))


def _states(a, b, h0, form):
  """All float32 states h_t, [B, T, ...]."""
  f32 = jnp.float32
  return _linear_scan(a.astype(f32), b.astype(f32), h0, False, form)


def _scan_fwd(a, b, h0, form):
  h = _states(a, b, h0, form)
  return (h.astype(b.dtype), h[:, -1]), (a, h, h0)


def _scan_bwd(form, res, cts):
  a, h, h0 = res
  dy, dh_t = cts  # dy in b's dtype (y's), dh_t float32
  f32 = jnp.float32
  a32 = a.astype(f32)
  # lam_t = a_{t+1} lam_{t+1} + dy_t with lam_T = dh_T (a_T = 1), so a shifted
  # by one token and a reverse scan that starts from dh_T.
  a_next = jnp.concatenate([a32[:, 1:], jnp.ones_like(a32[:, :1])], axis=1)
  lam = _linear_scan(a_next, dy.astype(f32), dh_t, True, form)  # [B, T, ...]
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  da = (lam * h_prev).astype(a.dtype)
  db = lam.astype(dy.dtype)
  dh0 = a32[:, 0] * lam[:, 0]
  return da, db, dh0


_scan = jax.custom_vjp(lambda a, b, h0, form: _scan_fwd(a, b, h0, form)[0],
                       nondiff_argnums=(3,))
_scan.defvjp(_scan_fwd, _scan_bwd)


def ssm_scan(a, b, *, h0, resets=None, form=None):
  """Diagonal SSM scan. Arguments as in ``lsm.ops.ssm_scan.ssm_scan``, with
  ``h0`` a float32 array and ``resets`` None or ``segments.resets(segment_ids)``.
  ``form`` ("sequential" | "associative") forces one form on any platform (for
  tests); None picks by platform as described above.

  A reset is a_t = 0 at a document's first token (h_t = b_t): exact, and a's
  gradient there is 0, as the output does not depend on it.
  """
  if form is not None and form not in FORMS:
    raise ValueError(f"ssm_scan: form={form!r}; expected one of {FORMS} or None")
  if resets is not None:
    a = segments.zero_at_resets(a, resets)
  return _scan(a, b, h0, form)
