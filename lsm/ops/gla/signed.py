"""Signed gates for GLA: decays in [-1, 1] on the unchanged op.

GLA takes log-gates, so its decays are positive. A decay of either sign,
a_t = sigma_t |a_t| with sigma_t in {-1, +1}, needs no new kernel: with the
running parity s_t = sigma_1 ... sigma_t (s_0 = 1), the product of decays
between tokens j < i is

  a_{j+1} ... a_i = s_i s_j |a_{j+1}| ... |a_i|        (s_j^2 = 1),

so the signed recurrence H_t = a_t H_{t-1} + k_t v_t^T, o_t = scale q_t H_t is
the positive one on (s q, s k, |a|): with H'_t = s_t H_t,

  H'_t = |a_t| H'_{t-1} + (s_t k_t) v_t^T,   o_t = scale (s_t q_t) H'_t,
  H'_0 = H_0 = h0,                           H_T = s_T H'_T.

The identity is exact (s is piecewise constant, so its derivative is zero
almost everywhere and every gradient is the true one), holds per channel as
well as per head, and survives document resets (s_i s_j is still the sign of
the decays between j and i when both lie in one document). ``parity`` is a
cumulative sum over the sequence, so under LASP-2 it must be taken on the whole
row before the op splits it, as the mixers do.

The signed decay of Mamba-style SSMs is a = 2 exp(x) - 1 for x = dt A <= 0;
``signed_log_decay`` gives its log-magnitude without forming a near 1, where
log(a) in float32 would lose the small x.
"""

import jax.numpy as jnp

# log|a| for |a| below e^LOG_FLOOR: such a decay (only a = 0 exactly, at
# x = -log 2, reaches it in float32) is applied as e^LOG_FLOOR, a relative
# change of the carried state below 1e-34, and keeps log-gates and their
# gradients finite.
LOG_FLOOR = -80.0


def signed_log_decay(log_a):
  """x = log_a <= 0 -> (log |2 exp(x) - 1| float32, (2 exp(x) - 1 < 0) bool).

  2 exp(x) - 1 = 1 + 2 expm1(x); near 1 the log is log1p(2 expm1(x)), exact
  to float32 rounding for small |x|; the magnitude is floored at
  exp(LOG_FLOOR).
  """
  m = 2.0 * jnp.expm1(log_a.astype(jnp.float32))  # a - 1, in [-2, 0]
  a = 1.0 + m
  near_one = a > 0.5
  # where-guarded arguments, so the branch not taken has finite gradients too
  log_mag = jnp.where(
      near_one, jnp.log1p(jnp.where(near_one, m, 0.0)),
      jnp.log(jnp.maximum(jnp.abs(a), jnp.exp(LOG_FLOOR))))
  negative = a < 0.0
  return log_mag, negative


def parity(negative, axis: int = 1):
  """bool decay signs [B, T, ...] -> float32 s_t = prod_{u <= t} sign(a_u),
  +-1, along ``axis`` (the sequence)."""
  count = jnp.cumsum(negative.astype(jnp.int32), axis=axis)
  return 1.0 - 2.0 * (count % 2).astype(jnp.float32)
