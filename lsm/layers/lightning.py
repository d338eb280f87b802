"""Lightning attention, the token mixer of TransNormerLLM (Qin et al. 2023,
"TransNormerLLM: A Faster and Better Large Language Model with Improved
TransNormer"; Qin et al. 2024, "Lightning Attention-2"). The recurrence is
lsm.ops.gla with one fixed gate per head; this module only projects and gates.
(Lightning Attention-2 is a tiling of the same recurrence, which is what the
op's chunked and Pallas forms are.)

TransNormerLLM's equations (its "gated linear attention" token mixer, and the
exponential decay of LRPE-d with the released head-wise schedule):

  q = phi(x W_q), k = phi(x W_k), v = x W_v, u = x W_u,   phi = swish,
  o_t = SRMSNorm(sum_{s<=t} lambda_h^{t-s} q_t k_s^T v_s) (.) act(u_t),
  y_t = o_t W_o,
  SRMSNorm(z) = z / (||z||_2 / sqrt(d)),
  lambda_h = exp(-r_h (1 - l / (L - 1) + 1e-5)),  r_h = 2^{-8 (h + 1) / H},

the head-wise rates r_h of ALiBi (a geometric sequence from 2^{-8/H} down to
2^{-8}; used for any H, not only powers of two) scaled down with the layer index
l of L, so the first layer decays fastest and the last hardly at all, as in the
TransNormerLLM release. There is no softmax and no 1/sqrt(K) scale (the norm
after the attention removes any scale). The output gate is Swish-activated, as the
paper describes its gated linear attention (``gate_act="none"`` gives the
activation-free gate of its SGLU channel mixer instead). SRMSNorm normalises over the whole value width, all heads together, as
the paper's NormAttention does, and has no parameters.

Simplified: no LRPE rotation (the relative positional encoding's
cos/sin part; the decay above is the positional signal), and no layer-specific
block-diagonal attention in early layers (dropped by TransNormerLLM too).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.sharding import linear as sharded_linear
from lsm.ops.gla import gla_step
from lsm.parallel import axes, sequence


def lightning_log_decays(n_heads: int, layer_index: int = 0,
                         n_layers: int = 1):
  """log lambda_h for h = 0..H-1: float32 [H] (module docstring)."""
  rates = 2.0 ** (-8.0 * (jnp.arange(n_heads, dtype=jnp.float32) + 1) / n_heads)
  depth = 1.0 - layer_index / max(n_layers - 1, 1) + 1e-5
  return -rates * depth


class Lightning(nnx.Module):
  """Lightning attention mixer: [B, T, D] -> [B, T, D] (protocol in
  lsm/layers/__init__.py).

  Args:
    d_model: width D.
    n_heads: heads H, dividing D.
    layer_index, n_layers: where the layer sits in its stack (the decay
      schedule); the language model passes them.
    gate_act: "swish" or "none", the output gate's activation.
    eps: SRMSNorm epsilon.
    chunk_size, impl: as lsm.ops.gla.gla.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets; TransNormerLLM): heads of dim 128, one head of width D
    below 128."""
    return dict(n_heads=max(1, d_model // 128))

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): 12 H K V with K = V = D / H."""
    return 12.0 * self.d_model * self.d_model / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, layer_index: int = 0,
               n_layers: int = 1, gate_act: str = "swish", eps: float = 1e-6,
               chunk_size: int = 64, impl: str = "auto", rngs: nnx.Rngs):
    if n_heads < 1 or d_model % n_heads:
      raise ValueError(f"Lightning: n_heads={n_heads!r}; expected a positive "
                       f"divisor of d_model={d_model}")
    if n_layers < 1 or not 0 <= layer_index < n_layers:
      raise ValueError(f"Lightning: layer_index={layer_index!r}, n_layers="
                       f"{n_layers!r}; expected 0 <= layer_index < n_layers")
    if gate_act not in ("swish", "none"):
      raise ValueError(f"Lightning: gate_act={gate_act!r}; expected 'swish' or "
                       "'none'")
    self.n_heads, self.d_model, self.eps = n_heads, d_model, float(eps)
    self.gate_act = gate_act
    self.layer_index, self.n_layers = layer_index, n_layers
    self.chunk_size, self.impl = chunk_size, impl

    def linear(ax_in, ax_out):
      return sharded_linear(d_model, d_model, ax_in, ax_out, rngs=rngs)

    self.q_proj = linear(axes.EMBED, axes.HEADS)
    self.k_proj = linear(axes.EMBED, axes.HEADS)
    self.v_proj = linear(axes.EMBED, axes.HEADS)
    self.u_proj = linear(axes.EMBED, axes.HEADS)
    self.o_proj = linear(axes.HEADS, axes.EMBED)

  def log_decays(self):
    """log lambda_h, float32 [H]."""
    return lightning_log_decays(self.n_heads, self.layer_index, self.n_layers)

  def _project(self, x):
    """x: [..., D] -> q, k, v [..., H, D / H] (x's dtype), log_g [..., H]."""
    H = self.n_heads

    def split(y):
      return y.reshape(*y.shape[:-1], H, self.d_model // H).astype(x.dtype)

    q = split(jax.nn.silu(self.q_proj(x)))
    k = split(jax.nn.silu(self.k_proj(x)))
    log_g = jnp.broadcast_to(self.log_decays(), (*x.shape[:-1], H))
    return q, k, split(self.v_proj(x)), log_g

  def _output(self, o, x):
    o = o.reshape(*o.shape[:-2], self.d_model).astype(jnp.float32)
    o = o * jax.lax.rsqrt(jnp.mean(o * o, -1, keepdims=True) + self.eps)  # SRMSNorm
    u = self.u_proj(x).astype(jnp.float32)
    o = o * (jax.nn.silu(u) if self.gate_act == "swish" else u)
    return self.o_proj(o.astype(x.dtype)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length
    K = self.d_model // self.n_heads
    return {"h": jnp.zeros((batch, self.n_heads, K, K), jnp.float32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). ``segment_ids``: optional int
    [B, T] document ids of packed rows: the state restarts at every document
    (``positions`` is accepted for the mixer protocol and unused)."""
    del positions
    q, k, v, log_g = self._project(x)
    h0 = None if cache is None else cache["h"]
    o, h_t = sequence.gla(q, k, v, log_g, h0=h0, scale=1.0,
                          chunk_size=self.chunk_size, impl=self.impl,
                          segment_ids=segment_ids)
    return self._output(o, x), (None if cache is None else {"h": h_t})

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    q, k, v, log_g = self._project(x_t)
    o, h = gla_step(q, k, v, log_g, cache["h"], scale=1.0)
    return self._output(o, x_t), {"h": h}
