r"""Kimi Delta Attention (KDA; Kimi Team 2025, "Kimi Linear: An Expressive,
Efficient Attention Architecture").

Gated DeltaNet with a decay per key channel instead of per head:

    S_t = (I - beta_t k_t k_t^T) diag(exp g_t) S_{t-1} + beta_t k_t v_t^T
    o_t = K^{-1/2} S_t^T q_t

with q_t, k_t L2-normalised per head, beta_t = beta_scale * sigmoid(x_t W_beta)
one per head, and g_t = -exp(A_log) * softplus(x_t W_f_down W_f_up + dt_bias)
in R^K per head (a low-rank gate, rank = the value head width; A_log one per
head, dt_bias one per key channel). On lsm.ops.dplr (through
``sequence.dplr``): a = exp(g) o k, b = -beta k, u = beta k, per-channel g.
Output: per-head RMSNorm of o times sigmoid(x W_g_down W_g_up + bias) (a
low-rank output gate), then the output projection.

Simplified relative to Kimi Linear / flash-linear-attention's
KimiDeltaAttention: no grouped value heads (num_v_heads = num_heads); the short
convolutions have a bias (lsm's ShortConv); lsm's LeCun-normal init for the
projections. The sequence-mixing recurrence, gates and output path are the
paper's. beta_scale 2 gives eigenvalues exp(g) (1 - beta) down to -1
(flash-linear-attention's ``allow_neg_eigval``).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers import conv
from lsm.layers.conv import ShortConv
from lsm.layers.delta_net import _l2norm
from lsm.layers.norm import RMSNorm
from lsm.layers.sharding import linear as sharded_linear, param
from lsm.ops.dplr import dplr_step
from lsm.parallel import axes, sequence


class KDA(nnx.Module):
  """KDA mixer: [B, T, D] -> [B, T, D] (protocol in lsm/layers/__init__.py;
  equations in the module docstring).

  Args:
    d_model: width D.
    n_heads: heads H; the key and value widths must divide by H.
    expand_k, expand_v: key and value widths relative to D.
    gate_rank: rank of the decay and output-gate projections; None for the
      value head width (the paper's).
    beta_scale: 1 (eigenvalues in [0, 1]) or up to 2 (down to -1).
    conv_width: short-convolution width (0 disables it).
    chunk_size: chunk length for the chunked op.
    impl: op implementation ("auto", "chunked", "reference").
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): heads of K = V = 128 (Kimi Linear), one head of width
    D below 128."""
    return dict(n_heads=max(1, d_model // 128), expand_k=1.0, expand_v=1.0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): the delta rule's 18 H K V."""
    return 18.0 * self.key_dim * self.value_dim / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, expand_k: float = 1.0,
               expand_v: float = 1.0, gate_rank: int | None = None,
               beta_scale: float = 1.0, conv_width: int = 4,
               chunk_size: int = 64, impl: str = "auto", rngs: nnx.Rngs):
    name = type(self).__name__
    key_dim, value_dim = round(d_model * expand_k), round(d_model * expand_v)
    if n_heads < 1 or key_dim % n_heads or value_dim % n_heads:
      raise ValueError(f"{name}: n_heads={n_heads!r}; expected a positive divisor "
                       f"of key width {key_dim} and value width {value_dim}")
    if not 0.0 < beta_scale <= 2.0:
      raise ValueError(f"{name}: beta_scale={beta_scale!r}; expected a value in "
                       "(0, 2] (2 gives transition eigenvalues down to -1)")
    if gate_rank is not None and gate_rank < 1:
      raise ValueError(f"{name}: gate_rank={gate_rank!r}; expected None or a "
                       "positive int")
    if conv_width < 0:
      raise ValueError(f"{name}: conv_width={conv_width!r}; expected >= 0")
    rank = value_dim // n_heads if gate_rank is None else gate_rank
    self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
    self.beta_scale = float(beta_scale)
    self.chunk_size, self.impl = chunk_size, impl
    linear = functools.partial(sharded_linear, rngs=rngs)

    self.q_proj = linear(d_model, key_dim, axes.EMBED, axes.HEADS)
    self.k_proj = linear(d_model, key_dim, axes.EMBED, axes.HEADS)
    self.v_proj = linear(d_model, value_dim, axes.EMBED, axes.HEADS)
    self.convs = nnx.List([ShortConv(w, width=conv_width, rngs=rngs)
                           for w in (key_dim, key_dim, value_dim)]
                          ) if conv_width else None
    self.f_down = linear(d_model, rank, axes.EMBED, None)
    self.f_up = linear(rank, key_dim, None, axes.HEADS)
    self._gate_projections(d_model, linear)
    a = jax.random.uniform(rngs.params(), (n_heads,), jnp.float32, 1.0, 16.0)
    self.A_log = param(jnp.log(a), axes.HEADS, float32=True)
    self.dt_bias = param(self._dt_bias_init(rngs), axes.HEADS, float32=True)
    self.g_down = linear(d_model, rank, axes.EMBED, None)
    self.g_up = linear(rank, value_dim, None, axes.HEADS, bias=True)
    self.norm = RMSNorm(value_dim // n_heads, axis_name=axes.STATE_V)
    self.o_proj = linear(value_dim, d_model, axes.HEADS, axes.EMBED)

  # -- what GDN-2 (lsm/layers/gdn2.py) changes --------------------------------

  def _gate_projections(self, d_model, linear):
    """beta: one per head."""
    self.b_proj = linear(d_model, self.n_heads, axes.EMBED, axes.HEADS)

  def _dt_bias_init(self, rngs):
    """Zeros, one per key channel (flash-linear-attention's KDA)."""
    del rngs
    return jnp.zeros((self.key_dim,), jnp.float32)

  def _rank_one(self, x, k, v, decay):
    """(a, b, u, v) of ``dplr`` from [..., H, K] keys, [..., H, V] values and
    float32 [..., H, K] decays exp(g): a = exp(g) o k, b = -beta k, u = beta k."""
    beta = self.beta_scale * jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    bk = beta[..., None] * k.astype(jnp.float32)
    a = decay * k.astype(jnp.float32)
    return a.astype(k.dtype), (-bk).astype(k.dtype), bk.astype(k.dtype), v

  # ---------------------------------------------------------------------------

  def _split(self, y):
    return y.reshape(*y.shape[:-1], self.n_heads, y.shape[-1] // self.n_heads)

  def _inputs(self, x, conv_cache, step: bool, segment_ids=None):
    """x [B, T, D] (or [B, D] with ``step``) -> ``dplr``'s (q, a, b, u, v,
    log_g) and the new conv cache."""
    qkv = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
    new_cache = None
    if self.convs is not None:
      qkv, new_cache = conv.apply_each(self.convs, qkv, conv_cache, step=step,
                                       segment_ids=segment_ids)
    else:
      qkv = [jax.nn.silu(y) for y in qkv]
    # float32 kernels promote bf16 activations; the op takes the activation dtype.
    q, k, v = (self._split(y.astype(x.dtype)) for y in qkv)
    q, k = _l2norm(q), _l2norm(k)
    f = self.f_up(self.f_down(x)).astype(jnp.float32) + self.dt_bias[...]
    log_g = -jnp.exp(self.A_log[...])[:, None] * self._split(jax.nn.softplus(f))
    a, b, u, v = self._rank_one(x, k, v, jnp.exp(log_g))
    return (q, a, b, u, v, log_g), new_cache

  def _output(self, o, x):
    gate = self._split(self.g_up(self.g_down(x)).astype(jnp.float32))
    o = (self.norm(o).astype(jnp.float32) * jax.nn.sigmoid(gate)).astype(o.dtype)
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
    # sequence.dplr is the op, split over the mesh's seq axis if it has one.
    o, h_t = sequence.dplr(*args, h0=h0, chunk_size=self.chunk_size,
                           impl=self.impl, segment_ids=segment_ids)
    y = self._output(o, x)
    if cache is None:
      return y, None
    new = {"h": h_t}
    if self.convs is not None:
      new["conv"] = conv_cache
    return y, new

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    args, conv_cache = self._inputs(x_t, cache.get("conv"), step=True)
    o, h = dplr_step(*args, cache["h"])
    new = {"h": h}
    if self.convs is not None:
      new["conv"] = conv_cache
    return self._output(o, x_t), new
