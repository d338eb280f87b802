r"""DeltaProduct and Gated DeltaProduct (Siems et al. 2025, "DeltaProduct:
Improving State-Tracking in Linear RNNs via Householder Products").

Each token takes n_h generalised Householder steps of the delta rule, each with
its own key, value and step size, so the token's transition is a product of n_h
(I - beta k k^T) factors (rank n_h, not 1), optionally after a per-head decay:

    S <- exp(g_t) S                                  (gated only)
    S <- (I - beta_tj k_tj k_tj^T) S + beta_tj k_tj v_tj^T,   j = 1 .. n_h
    o_t = K^{-1/2} S^T q_t

The recurrence runs on lsm.ops.dplr as a time expansion of T n_h micro-steps
(lsm.ops.dplr.delta_product), through ``sequence.dplr``. With beta_scale 2,
beta in [0, 2] and each factor has eigenvalue 1 - beta in [-1, 1] (Grazzi et
al. 2024): the product can then express reflections and rotations, which is
what the paper uses for state tracking (permutation groups).

Simplified relative to the paper / flash-linear-attention's GatedDeltaProduct:
no grouped value heads (num_v_heads = num_heads); the short convolutions have a
bias (lsm's ShortConv); every projection uses lsm's LeCun-normal init instead
of xavier(gain 2^-2.5); A_log starts log-uniform in [1, 16] as lsm's Gated
DeltaNet (flash-linear-attention: [0, 16]).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers import conv
from lsm.layers.conv import ShortConv
from lsm.layers.delta_net import _l2norm
from lsm.layers.norm import RMSNorm
from lsm.layers.sharding import linear as sharded_linear, param
from lsm.ops.dplr import delta_product as expansion
from lsm.ops.dplr import dplr_step
from lsm.parallel import axes, sequence


class DeltaProduct(nnx.Module):
  """DeltaProduct mixer: [B, T, D] -> [B, T, D] (protocol in
  lsm/layers/__init__.py).

  q: D -> key width; k: D -> n_h key widths; v: D -> n_h value widths, each
  through a short causal conv with silu; q and every k L2-normalised per head;
  beta_tj = beta_scale * sigmoid(x W_beta), n_h per head. Gated: log_g = -exp(A_log)
  * softplus(x W_a + dt_bias), one per head, applied before the token's first
  Householder step. Output: per-head RMSNorm times silu(x W_g), then the output
  projection (flash-linear-attention's layer).

  Args:
    d_model: width D.
    n_heads: heads H; the key and value widths must divide by H.
    n_householder: Householder steps per token, n_h in {1, 2, 3, 4}.
    expand_k, expand_v: key and value widths relative to D.
    beta_scale: 1 (eigenvalues in [0, 1]) or up to 2 (eigenvalues in [-1, 1]).
    gated: add the per-head decay (Gated DeltaProduct).
    conv_width: short-convolution width (0 disables it).
    chunk_size: chunk length for the chunked op (over the T n_h micro-steps).
    impl: op implementation ("auto", "chunked", "reference").
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): Gated DeltaNet's, which the paper (and
    flash-linear-attention's GatedDeltaProduct defaults: 6 heads of K = 256,
    V = 512) builds on; K = D/4 and V = D/2 below d_model 1024."""
    k = min(256, d_model // 4)
    return dict(n_heads=6, expand_k=6 * k / d_model, expand_v=12 * k / d_model)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): the delta rule's 18 H K V per
    Householder step."""
    return 18.0 * self.n_householder * self.key_dim * self.value_dim / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, n_householder: int = 2,
               expand_k: float = 1.0, expand_v: float = 1.0,
               beta_scale: float = 1.0, gated: bool = True, conv_width: int = 4,
               chunk_size: int = 64, impl: str = "auto", rngs: nnx.Rngs):
    name = type(self).__name__
    key_dim, value_dim = round(d_model * expand_k), round(d_model * expand_v)
    if n_heads < 1 or key_dim % n_heads or value_dim % n_heads:
      raise ValueError(f"{name}: n_heads={n_heads!r}; expected a positive divisor "
                       f"of key width {key_dim} and value width {value_dim}")
    if n_householder not in (1, 2, 3, 4):
      raise ValueError(f"{name}: n_householder={n_householder!r}; expected 1, 2, "
                       "3 or 4")
    if not 0.0 < beta_scale <= 2.0:
      raise ValueError(f"{name}: beta_scale={beta_scale!r}; expected a value in "
                       "(0, 2] (2 gives transition eigenvalues in [-1, 1])")
    if conv_width < 0:
      raise ValueError(f"{name}: conv_width={conv_width!r}; expected >= 0")
    n = n_householder
    self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
    self.n_householder, self.beta_scale, self.gated = n, float(beta_scale), gated
    self.chunk_size, self.impl = chunk_size, impl

    def linear(i, o, ax_in=axes.EMBED, ax_out=axes.HEADS):
      return sharded_linear(i, o, ax_in, ax_out, rngs=rngs)

    self.q_proj = linear(d_model, key_dim)
    self.k_proj = linear(d_model, n * key_dim)
    self.v_proj = linear(d_model, n * value_dim)
    self.b_proj = linear(d_model, n * n_heads)
    self.convs = nnx.List([ShortConv(w, width=conv_width, rngs=rngs)
                           for w in (key_dim, n * key_dim, n * value_dim)]
                          ) if conv_width else None
    self.g_proj = linear(d_model, value_dim)
    if gated:
      self.a_proj = linear(d_model, n_heads)
      a = jax.random.uniform(rngs.params(), (n_heads,), jnp.float32, 1.0, 16.0)
      self.A_log = param(jnp.log(a), axes.HEADS, float32=True)
      # dt = softplus(. + dt_bias) starts log-uniform in [1e-3, 1e-1] (Mamba2).
      dt = jnp.exp(jax.random.uniform(rngs.params(), (n_heads,), jnp.float32,
                                      math.log(1e-3), math.log(1e-1)))
      self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), axes.HEADS,
                           float32=True)
    self.norm = RMSNorm(value_dim // n_heads, axis_name=axes.STATE_V)
    self.o_proj = linear(value_dim, d_model, axes.HEADS, axes.EMBED)

  def _inputs(self, x, conv_cache, step: bool, segment_ids=None):
    """x [B, T, D] (or [B, D] with ``step``, as T = 1) -> the ``dplr``
    arguments of the time expansion and the new conv cache."""
    xs = x[:, None] if step else x
    H, n = self.n_heads, self.n_householder
    qkv = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
    new_cache = None
    if self.convs is not None:
      qkv, new_cache = conv.apply_each(self.convs, qkv, conv_cache, step=step,
                                       segment_ids=segment_ids)
    else:
      qkv = [jax.nn.silu(y) for y in qkv]
    # float32 kernels promote bf16 activations; the op takes the activation dtype.
    q, k, v = (y.astype(x.dtype).reshape(*xs.shape[:2], -1) for y in qkv)
    lead = xs.shape[:2]
    q = _l2norm(q.reshape(*lead, H, -1))
    k = _l2norm(k.reshape(*lead, n, H, -1))  # [B, T, n_h, H, K]: step-major
    v = v.reshape(*lead, n, H, -1)
    beta = self.beta_scale * jax.nn.sigmoid(
        self.b_proj(xs).astype(jnp.float32)).reshape(*lead, n, H)
    log_g = None
    if self.gated:
      a = self.a_proj(xs).astype(jnp.float32) + self.dt_bias[...]
      log_g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)  # [B, T, H]
    args = expansion.expand(q, k, v, beta, log_g, segment_ids)
    return args, new_cache

  def _output(self, o, x):
    gate = self.g_proj(x)
    o = self.norm(o, gate.reshape(*gate.shape[:-1], self.n_heads, -1))
    return self.o_proj(o.reshape(*o.shape[:-2], self.value_dim)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length
    H = self.n_heads
    cache = {"h": jnp.zeros((batch, H, self.key_dim // H, self.value_dim // H),
                            jnp.float32)}
    if self.convs is not None:
      cache["conv"] = [c.init_cache(batch) for c in self.convs]
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
    args, conv_cache = self._inputs(x, conv_cache, step=False,
                                    segment_ids=segment_ids)
    h0 = None if cache is None else cache["h"]
    o, h_t = sequence.dplr(args["q"], args["a"], args["b"], args["u"], args["v"],
                           args["log_g"], h0=h0, chunk_size=self.chunk_size,
                           impl=self.impl, segment_ids=args["segment_ids"])
    y = self._output(expansion.token_outputs(o, self.n_householder), x)
    if cache is None:
      return y, None
    new = {"h": h_t}
    if self.convs is not None:
      new["conv"] = conv_cache
    return y, new

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache): n_h ``dplr_step`` calls."""
    args, conv_cache = self._inputs(x_t, cache.get("conv"), step=True)
    h = cache["h"]
    for j in range(self.n_householder):
      g = None if args["log_g"] is None else args["log_g"][:, j]
      o, h = dplr_step(*(args[n][:, j] for n in ("q", "a", "b", "u", "v")), g, h)
    new = {"h": h}
    if self.convs is not None:
      new["conv"] = conv_cache
    return self._output(o, x_t), new
