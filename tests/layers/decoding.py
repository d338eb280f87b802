"""Shared by the layer tests: prefill + token-by-token decoding of a mixer."""

import jax
import jax.numpy as jnp


def prefill_then_decode(m, x, prefix: int):
  """Runs ``m`` over x[:, :prefix] from an empty cache, then ``step`` over the
  rest (a lax.scan). Returns (outputs [B, T, D], cache after decoding, cache
  after one prefill over all of x)."""
  y_pre, cache = m(x[:, :prefix], m.init_cache(x.shape[0], x.shape[1]))

  def body(cache, x_t):
    y_t, cache = m.step(x_t, cache)
    return cache, y_t

  cache, y_dec = jax.lax.scan(body, cache, jnp.moveaxis(x[:, prefix:], 1, 0))
  y_dec = jnp.concatenate([y_pre, jnp.moveaxis(y_dec, 0, 1)], axis=1)
  _, cache_all = m(x, m.init_cache(x.shape[0], x.shape[1]))
  return y_dec, cache, cache_all
