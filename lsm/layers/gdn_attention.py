"""A Gated DeltaNet layer initialised from a pretrained attention layer
(mmMamba-style, Liao et al. 2025, "Multimodal Mamba": the recurrent layer
inherits the attention's projections and learns only what attention lacks).

With the teacher's projections (no RoPE: the recurrence orders tokens
itself), per query head h and its kv head:

  q_t = l2norm(x W_q),  k_t = l2norm(x W_k),  v_t = x W_v
  beta_t = sigmoid(x W_beta),   log g_t = -exp(A_log) softplus(x W_a + dt_bias)
  S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
  o_t = S_t^T q_t / sqrt(K),    out = o W_o

on the ``delta_rule`` op (Gated DeltaNet; lsm.layers.delta_net has the
from-scratch layer). New parameters: W_beta, W_a [D, H], A_log and dt_bias
[H] (Gated DeltaNet's initialisation). mmMamba maps attention onto Mamba-2
(W_C <- W_q, W_B <- W_k, W_x <- W_v); the gated delta rule is the same mapping
onto a transition that can also erase, which the issue's recipe allows for
either. The teacher's grouped keys and values are repeated to its query heads
(the op has no key groups).

Simplified against a from-scratch Gated DeltaNet: no short convolutions and
no output norm or gate, so that at initialisation the layer reads the
teacher's own q, k, v and writes through its W_o. The layer subclasses
``Attention`` (the teacher's options and parameter names; ``teacher(x)`` is
that softmax attention).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.attention import Attention
from lsm.layers.delta_net import _l2norm, decay_params, log_decay
from lsm.layers.sharding import linear as sharded_linear
from lsm.ops.delta_rule import delta_rule_step
from lsm.parallel import axes, sequence


class GDNAttention(Attention):
  """Gated DeltaNet over a teacher attention's projections.

  Args:
    d_model, n_heads and the ``Attention`` options: the teacher's.
    chunk_size, impl: as lsm.ops.delta_rule.delta_rule.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    return dict(n_heads=max(1, d_model // 64))

  def flops_per_token(self, seq_len: int) -> float:
    del seq_len
    return 18.0 * self.n_heads * self.head_dim * self.head_dim

  def __init__(self, d_model: int, *, n_heads: int, chunk_size: int = 64,
               rngs: nnx.Rngs, **attention):
    super().__init__(d_model, n_heads=n_heads, rngs=rngs, **attention)
    self.chunk_size = chunk_size
    self.b_proj = sharded_linear(d_model, n_heads, axes.EMBED, axes.HEADS,
                                 rngs=rngs)
    self.a_proj = sharded_linear(d_model, n_heads, axes.EMBED, axes.HEADS,
                                 rngs=rngs)
    self.A_log, self.dt_bias = decay_params(n_heads, rngs)

  def teacher(self, x, *, segment_ids=None, positions=None):
    """The softmax attention this layer replaces (same weights): [B, T, D]."""
    return Attention.__call__(self, x, segment_ids=segment_ids,
                              positions=positions)[0]

  def _inputs(self, x):
    shape = x.shape[:-1]
    G = self.n_heads // self.n_kv_heads
    q = self.q_proj(x).reshape(*shape, self.n_heads, self.head_dim)
    k = self.k_proj(x).reshape(*shape, self.n_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(*shape, self.n_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    k, v = jnp.repeat(k, G, axis=-2), jnp.repeat(v, G, axis=-2)
    beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    log_g = log_decay(self.a_proj(x), self.A_log[...], self.dt_bias[...])
    dtype = x.dtype
    return (_l2norm(q).astype(dtype), _l2norm(k).astype(dtype), v.astype(dtype),
            beta, log_g)

  def _out(self, o, x):
    o = o.astype(x.dtype).reshape(*o.shape[:-2], self.n_heads * self.head_dim)
    return self.o_proj(o).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32):
    """The [K, V] state per head, float32: O(1) in the context length."""
    del max_len, dtype
    return {"h": jnp.zeros((batch, self.n_heads, self.head_dim, self.head_dim),
                           jnp.float32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). ``segment_ids`` restart
    the state at every packed document (``positions`` unused: no RoPE)."""
    del positions
    q, k, v, beta, log_g = self._inputs(x)
    o, h_t = sequence.delta_rule(q, k, v, beta, log_g=log_g,
                                 h0=None if cache is None else cache["h"],
                                 chunk_size=self.chunk_size, impl=self.impl,
                                 segment_ids=segment_ids)
    return self._out(o, x), (None if cache is None else {"h": h_t})

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    q, k, v, beta, log_g = self._inputs(x_t)
    o, h = delta_rule_step(q, k, v, beta, cache["h"], log_g_t=log_g)
    return self._out(o, x_t), {"h": h}
