"""Every mixer in lsm.layers.MIXERS keeps the protocol's dtype contract: bf16
activations in, bf16 out, from both the parallel path and ``step``."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lsm import layers


@pytest.mark.parametrize("name", sorted(layers.MIXERS))
def test_output_dtype_follows_the_input(name):
  layer = layers.MIXERS[name](32, n_heads=4, impl="chunked", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 32)).astype(jnp.bfloat16)
  y, _ = layer(x)
  y_t, _ = layer.step(x[:, 0], layer.init_cache(2, 8))
  assert y.dtype == jnp.bfloat16 and y_t.dtype == jnp.bfloat16, (y.dtype, y_t.dtype)
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
