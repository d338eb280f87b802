"""Gated linear attention layer (Yang et al. 2023, "Gated Linear Attention
Transformers with Hardware-Efficient Training"). The recurrence is
lsm.ops.gla; this module only projects, gates and normalises."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.norm import RMSNorm
from lsm.layers.sharding import linear as sharded_linear
from lsm.ops.gla import gla_step
from lsm.parallel import axes, sequence


def _check(name, value, ok, expected):
  if not ok:
    raise ValueError(f"GLA: {name}={value!r}; expected {expected}")


class GLA(nnx.Module):
  """GLA mixer: [B, T, D] -> [B, T, D] (protocol in lsm/layers/__init__.py).

  q, k: D -> D * expand_k; v and the output gate: D -> D * expand_v, split into
  n_heads heads. The forget gate is low rank, D -> gate_rank -> D * expand_k, and
  log_g = log_sigmoid(gate) / gate_normalizer (the paper's temperature, 16), so
  decays sit close to 1. Per-head RMSNorm of the op's output, times silu(output
  gate), then the output projection.

  Args:
    d_model: width D.
    n_heads: heads H; D * expand_k and D * expand_v must divide by H.
    expand_k, expand_v: key and value widths relative to D (paper: 0.5, 1).
    gate_rank: rank of the forget-gate projection (paper: 16).
    gate_normalizer: temperature dividing log_sigmoid (paper: 16).
    chunk_size: chunk length for the chunked op.
    impl: op implementation ("auto", "chunked", "reference", ...).
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): 4 heads, key width D/2, value width D, so K = D/8 and
    V = D/4 per head (d_model 2048: K 256, V 512)."""
    return dict(n_heads=4, expand_k=0.5, expand_v=1.0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): 12 H K V."""
    return 12.0 * self.key_dim * self.value_dim / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, expand_k: float = 0.5,
               expand_v: float = 1.0, gate_rank: int = 16,
               gate_normalizer: float = 16.0, chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs):
    key_dim, value_dim = round(d_model * expand_k), round(d_model * expand_v)
    _check("n_heads", n_heads, n_heads >= 1 and key_dim % n_heads == 0
           and value_dim % n_heads == 0,
           f"a positive divisor of key width {key_dim} and value width {value_dim}")
    _check("gate_rank", gate_rank, gate_rank >= 1, "a positive int")
    _check("gate_normalizer", gate_normalizer, gate_normalizer > 0, "> 0")
    self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
    self.gate_normalizer = float(gate_normalizer)
    self.chunk_size, self.impl = chunk_size, impl

    linear = functools.partial(sharded_linear, rngs=rngs)

    self.q_proj = linear(d_model, key_dim, axes.EMBED, axes.HEADS)
    self.k_proj = linear(d_model, key_dim, axes.EMBED, axes.HEADS)
    self.v_proj = linear(d_model, value_dim, axes.EMBED, axes.HEADS)
    self.g_proj = linear(d_model, value_dim, axes.EMBED, axes.HEADS)
    self.gk_down = linear(d_model, gate_rank, axes.EMBED, None)
    self.gk_up = linear(gate_rank, key_dim, None, axes.HEADS, bias=True)
    self.norm = RMSNorm(value_dim // n_heads, axis_name=axes.STATE_V)
    self.o_proj = linear(value_dim, d_model, axes.HEADS, axes.EMBED)

  def _project(self, x):
    """x: [..., D] -> q, k [..., H, K], v, gate [..., H, V], log_g [..., H, K]."""
    H = self.n_heads
    # float32 kernels promote bf16 activations; the op takes the activation dtype.
    split = lambda y: y.reshape(*y.shape[:-1], H, y.shape[-1] // H).astype(x.dtype)
    log_g = jax.nn.log_sigmoid(self.gk_up(self.gk_down(x)).astype(jnp.float32))
    log_g = log_g / self.gate_normalizer
    return (split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
            split(self.g_proj(x)), log_g.reshape(*log_g.shape[:-1], H, -1))

  def _output(self, o, gate):
    o = self.norm(o, gate)
    return self.o_proj(o.reshape(*o.shape[:-2], self.value_dim)).astype(o.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length
    H = self.n_heads
    return {"h": jnp.zeros((batch, H, self.key_dim // H, self.value_dim // H),
                           jnp.float32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). ``segment_ids``: optional
    int [B, T] document ids of packed rows: the state restarts at every
    document (``positions`` is accepted for the mixer protocol and unused)."""
    del positions
    q, k, v, gate, log_g = self._project(x)
    h0 = None if cache is None else cache["h"]
    # sequence.gla is the op, split over the mesh's seq axis when it has one.
    o, h_t = sequence.gla(q, k, v, log_g, h0=h0, chunk_size=self.chunk_size,
                          impl=self.impl, segment_ids=segment_ids)
    y = self._output(o, gate)
    return y, (None if cache is None else {"h": h_t})

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    q, k, v, gate, log_g = self._project(x_t)
    o, h = gla_step(q, k, v, log_g, cache["h"])
    return self._output(o, gate), {"h": h}
