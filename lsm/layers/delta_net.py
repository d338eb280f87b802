"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length") and, with ``gated=True``, Gated DeltaNet (Yang et al.
2024, "Gated Delta Networks"). The recurrence is lsm.ops.delta_rule.

Negative eigenvalues: beta = beta_scale * sigmoid(x W_beta). With the default
beta_scale=1 each transition I - beta k k^T has eigenvalues in [0, 1]; with
beta_scale=2 they span [-1, 1] (Grazzi et al. 2024), which is what lets a linear
RNN track state such as parity.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers import conv
from lsm.layers.conv import ShortConv
from lsm.layers.norm import RMSNorm
from lsm.layers.sharding import linear as sharded_linear, param, sharded
from lsm.ops.delta_rule import delta_rule_step
from lsm.parallel import axes, sequence


def _l2norm(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)
          ).astype(x.dtype)


def decay_params(n_heads: int, rngs: nnx.Rngs):
  """Gated DeltaNet's decay parameters per head (Mamba-2's): A_log with
  A uniform in [1, 16], and dt_bias such that dt = softplus(0 + dt_bias)
  starts log-uniform in [1e-3, 1e-1]; float32, never decayed."""
  a = jax.random.uniform(rngs.params(), (n_heads,), jnp.float32, 1.0, 16.0)
  dt = jnp.exp(jax.random.uniform(rngs.params(), (n_heads,), jnp.float32,
                                  math.log(1e-3), math.log(1e-1)))
  return (param(jnp.log(a), axes.HEADS, float32=True),
          param(dt + jnp.log(-jnp.expm1(-dt)), axes.HEADS, float32=True))


def log_decay(a, A_log, dt_bias):
  """log g = -exp(A_log) softplus(a + dt_bias), per head: a [..., H] from the
  input's projection; float32."""
  return -jnp.exp(A_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias)


class DeltaNet(nnx.Module):
  """DeltaNet mixer: [B, T, D] -> [B, T, D] (protocol in lsm/layers/__init__.py).

  q, k, v: D -> D * expand_{k,v}, each through a short causal conv with silu;
  q and k L2-normalised per head; beta = beta_scale * sigmoid(x W_beta), one per
  head. Gated (Mamba2-style decay per head): log_g = -exp(A_log) *
  softplus(x W_a + dt_bias). Output: per-head RMSNorm, times silu(x W_g) when
  ``output_gate``, then the output projection.

  Args:
    d_model: width D.
    n_heads: heads H; the key and value widths must divide by H.
    expand_k, expand_v: key and value widths relative to D.
    beta_scale: 1 (eigenvalues in [0, 1]) or up to 2 (eigenvalues in [-1, 1]).
    gated: add the per-head decay (Gated DeltaNet).
    conv_width: short-convolution width (0 disables it).
    output_gate: multiply the normalised output by silu(x W_g).
    chunk_size: chunk length for the chunked op.
    impl: op implementation.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): heads of K = V = 128 (d_model 2048: 16 heads), one head
    of width D below 128."""
    return dict(n_heads=max(1, d_model // 128), expand_k=1.0, expand_v=1.0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): 18 H K V (the delta rule reads S k
    before it writes)."""
    return 18.0 * self.key_dim * self.value_dim / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, expand_k: float = 1.0,
               expand_v: float = 1.0, beta_scale: float = 1.0, gated: bool = False,
               conv_width: int = 4, output_gate: bool = True, chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs):
    name = type(self).__name__
    key_dim, value_dim = round(d_model * expand_k), round(d_model * expand_v)
    if n_heads < 1 or key_dim % n_heads or value_dim % n_heads:
      raise ValueError(f"{name}: n_heads={n_heads!r}; expected a positive divisor "
                       f"of key width {key_dim} and value width {value_dim}")
    if not 0.0 < beta_scale <= 2.0:
      raise ValueError(f"{name}: beta_scale={beta_scale!r}; expected a value in "
                       "(0, 2] (2 gives transition eigenvalues in [-1, 1])")
    if conv_width < 0:
      raise ValueError(f"{name}: conv_width={conv_width!r}; expected >= 0")
    self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
    self.beta_scale, self.gated = float(beta_scale), gated
    self.chunk_size, self.impl = chunk_size, impl
    init = nnx.initializers.lecun_normal()

    def linear(i, o, ax_out):
      return sharded_linear(i, o, axes.EMBED, ax_out, rngs=rngs)

    self.q_proj = linear(d_model, key_dim, axes.HEADS)
    self.k_proj = linear(d_model, key_dim, axes.HEADS)
    self.v_proj = linear(d_model, value_dim, axes.HEADS)
    self.b_proj = linear(d_model, n_heads, axes.HEADS)
    self.convs = nnx.List([ShortConv(w, width=conv_width, rngs=rngs)
                           for w in (key_dim, key_dim, value_dim)]
                          ) if conv_width else None
    self.g_proj = linear(d_model, value_dim, axes.HEADS) if output_gate else None
    if gated:
      self.a_proj = linear(d_model, n_heads, axes.HEADS)
      self.A_log, self.dt_bias = decay_params(n_heads, rngs)
    self.norm = RMSNorm(value_dim // n_heads, axis_name=axes.STATE_V)
    self.o_proj = nnx.Linear(value_dim, d_model, use_bias=False, rngs=rngs,
                             kernel_init=sharded(init, axes.HEADS, axes.EMBED))

  def _split(self, y):
    return y.reshape(*y.shape[:-1], self.n_heads, y.shape[-1] // self.n_heads)

  def _qkv(self, x, conv_cache, step: bool, segment_ids=None):
    """Projections, short convs (sequence or one step), activations, heads."""
    qkv = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
    new_cache = None
    if self.convs is not None:
      qkv, new_cache = conv.apply_each(self.convs, qkv, conv_cache, step=step,
                                       segment_ids=segment_ids)
    else:
      qkv = [jax.nn.silu(y) for y in qkv]
    # float32 kernels promote bf16 activations; the op takes the activation dtype.
    q, k, v = (self._split(y.astype(x.dtype)) for y in qkv)
    return _l2norm(q), _l2norm(k), v, new_cache

  def _gates(self, x):
    beta = self.beta_scale * jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    if not self.gated:
      return beta, None
    return beta, log_decay(self.a_proj(x), self.A_log[...], self.dt_bias[...])

  def decays(self, x):
    """Per-token transition data for inspection: beta [..., H] and log_g
    [..., H] (None when not gated). Eigenvalues of I - beta k k^T are 1 and
    1 - beta."""
    return self._gates(x)

  def _output(self, o, x):
    gate = None if self.g_proj is None else self._split(self.g_proj(x))
    o = self.norm(o, gate)
    return self.o_proj(o.reshape(*o.shape[:-2], self.value_dim)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length
    H = self.n_heads
    cache = {"h": jnp.zeros((batch, H, self.key_dim // H, self.value_dim // H),
                            jnp.float32)}
    if self.convs is not None:
      cache["conv"] = [conv.init_cache(batch) for conv in self.convs]
    return cache

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). ``segment_ids``: optional
    int [B, T] document ids of packed rows: the state and the short
    convolutions restart at every document (``positions`` is accepted for the
    mixer protocol and unused)."""
    del positions
    conv_cache = None if cache is None else cache.get("conv")
    if cache is not None and self.convs is not None and conv_cache is None:
      raise ValueError(f"{type(self).__name__}: cache has no 'conv' entry")
    q, k, v, conv_cache = self._qkv(x, conv_cache, step=False,
                                    segment_ids=segment_ids)
    beta, log_g = self._gates(x)
    h0 = None if cache is None else cache["h"]
    # sequence.delta_rule is the op, split over the mesh's seq axis if it has one.
    o, h_t = sequence.delta_rule(q, k, v, beta, log_g=log_g, h0=h0,
                                 chunk_size=self.chunk_size, impl=self.impl,
                                 segment_ids=segment_ids)
    y = self._output(o, x)
    if cache is None:
      return y, None
    new = {"h": h_t}
    if self.convs is not None:
      new["conv"] = conv_cache
    return y, new

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    q, k, v, conv_cache = self._qkv(x_t, cache.get("conv"), step=True)
    beta, log_g = self._gates(x_t)
    o, h = delta_rule_step(q, k, v, beta, cache["h"], log_g_t=log_g)
    new = {"h": h}
    if self.convs is not None:
      new["conv"] = conv_cache
    return self._output(o, x_t), new


class GatedDeltaNet(DeltaNet):
  """Gated DeltaNet: DeltaNet with a per-head Mamba2-style decay (gated=True)."""

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets; flash-linear-attention's configs at 340M and 1.3B): 6
    heads of K = 256, V = 512 from d_model 1024 up, K = D/4 and V = D/2 below."""
    k = min(256, d_model // 4)
    return dict(n_heads=6, expand_k=6 * k / d_model, expand_v=12 * k / d_model)

  def __init__(self, d_model: int, *, n_heads: int, chunk_size: int = 64,
               impl: str = "auto", gated: bool = True, **kwargs):
    if not gated:
      raise ValueError("GatedDeltaNet: gated=False; use DeltaNet instead")
    super().__init__(d_model, n_heads=n_heads, chunk_size=chunk_size, impl=impl,
                     gated=True, **kwargs)
