"""Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear
Attentions with Softmax Mimicry"): linear attention whose feature map is learned
to mimic softmax attention. The recurrence is lsm.ops.gla with no gate, in the
normalised (denominator) form of lsm.layers.based.

The paper's equations (the "spiky" feature map and the attention-distillation
loss):

  phi(x) = [softmax(x W + b), softmax(-x W - b)]     per head, W in R^{K x F},
  y_i = sum_{j<=i} phi(q_i) . phi(k_j) v_j / sum_{j<=i} phi(q_i) . phi(k_j),
  L = -sum_i sum_{j<=i} A_ij log A^_ij,             A = causal softmax(q k^T / sqrt K)
                                                     (the teacher), A^ the linear
                                                     layer's normalised weights.

The paper writes the map with exp(+-(xW + b)); its reference implementation
normalises each half with a softmax over its F features for numerical stability,
and so does this module. W starts at the identity (F = K) as in the paper, so the
map starts as [softmax(x), softmax(-x)]. q and k get separate maps.

``attention_distillation_loss`` is L as a pure function, and
``Hedgehog.distillation_loss(x)`` applies it to the layer's own q, k (the
conversion setting, where the linear layer inherits a softmax layer's W_q, W_k and
the teacher attends with them); pass ``teacher_q, teacher_k`` for another teacher.
A trainer or notebook can minimise it over the feature-map parameters.

Simplified: no attention-conversion pipeline (loading a pretrained softmax
model's weights); the map's MLP is the paper's single linear layer.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.based import (normalized_linear_attention,
                              normalized_linear_attention_step)
from lsm.layers.sharding import linear as sharded_linear, param
from lsm.parallel import axes


def hedgehog_feature_map(x, w, b):
  """phi(x) = [softmax(x W + b), softmax(-x W - b)] per head, float32.

  Args:
    x: [..., H, K] queries or keys.
    w: [H, K, F] map weights; b: [H, F] biases.

  Returns:
    [..., H, 2F] float32; each half sums to 1.
  """
  z = jnp.einsum("...hk,hkf->...hf", x.astype(jnp.float32), w.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) + b.astype(jnp.float32)
  return jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], axis=-1)


def attention_distillation_loss(q, k, phi_q, phi_k, *, scale=None, eps=1e-6):
  """Cross-entropy between causal softmax attention weights (the teacher) and
  the normalised linear-attention weights of the features phi_q, phi_k.

  A_ij = softmax_j(scale q_i . k_j) over j <= i; A^_ij = phi_q_i . phi_k_j /
  (sum_{j' <= i} phi_q_i . phi_k_j' + eps). The loss is -sum_j A_ij log A^_ij,
  averaged over batch, heads and query positions i. A is held constant
  (stop_gradient): gradients reach only phi_q and phi_k.

  Args:
    q, k: [B, T, H, K] the teacher's queries and keys.
    phi_q, phi_k: [B, T, H, F] non-negative student features.
    scale: teacher logit scale; K ** -0.5 when None.
    eps: added to the student's denominators.

  Returns:
    float32 scalar.
  """
  if q.shape != k.shape or q.ndim != 4:
    raise ValueError(f"attention_distillation_loss: q {q.shape}, k {k.shape}; "
                     "expected equal [B, T, H, K] shapes")
  if phi_q.shape != phi_k.shape or phi_q.shape[:3] != q.shape[:3]:
    raise ValueError(f"attention_distillation_loss: phi_q {phi_q.shape}, phi_k "
                     f"{phi_k.shape}; expected [B, T, H, F] with [B, T, H] = "
                     f"{q.shape[:3]}")
  T = q.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  hi = jax.lax.Precision.HIGHEST
  causal = jnp.tril(jnp.ones((T, T), bool))
  logits = scale * jnp.einsum("bihk,bjhk->bhij", q.astype(jnp.float32),
                              k.astype(jnp.float32), precision=hi)
  teacher = jax.lax.stop_gradient(
      jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1))
  kernel = jnp.einsum("bihf,bjhf->bhij", phi_q.astype(jnp.float32),
                      phi_k.astype(jnp.float32), precision=hi)
  kernel = jnp.where(causal, kernel, 0.0)
  student = kernel / (jnp.sum(kernel, -1, keepdims=True) + eps)
  log_student = jnp.log(jnp.where(causal, student, 1.0))
  return -jnp.mean(jnp.sum(teacher * log_student, axis=-1))


class Hedgehog(nnx.Module):
  """Hedgehog mixer: [B, T, D] -> [B, T, D] (protocol in lsm/layers/__init__.py).

  q, k, v: D -> D in H heads of K = D / H; phi_q, phi_k: the spiky map with its
  own W [H, K, F] and b [H, F] each (F = feature_dim, default K; state 2F);
  normalised linear attention; output projection.

  Args:
    d_model: width D.
    n_heads: heads H, dividing D.
    feature_dim: F, per half of the map; None for the head width K.
    eps: added to the denominator.
    chunk_size, impl: as lsm.ops.gla.gla.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets; GPT-2-style heads of 64, feature dim = head dim)."""
    return dict(n_heads=max(1, d_model // 64))

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): 12 H (2 F) K, the feature map's 2 F
    outputs per head as the state's key side."""
    return 12.0 * self.n_heads * 2 * self.feature_dim * self.head_dim

  def __init__(self, d_model: int, *, n_heads: int, feature_dim: int | None = None,
               eps: float = 1e-6, chunk_size: int = 64, impl: str = "auto",
               rngs: nnx.Rngs):
    if n_heads < 1 or d_model % n_heads:
      raise ValueError(f"Hedgehog: n_heads={n_heads!r}; expected a positive "
                       f"divisor of d_model={d_model}")
    K = d_model // n_heads
    F = K if feature_dim is None else feature_dim
    if F < 1:
      raise ValueError(f"Hedgehog: feature_dim={feature_dim!r}; expected None or "
                       "a positive int")
    if not eps > 0:
      raise ValueError(f"Hedgehog: eps={eps!r}; expected > 0")
    self.n_heads, self.head_dim, self.feature_dim = n_heads, K, F
    self.d_model, self.eps = d_model, float(eps)
    self.chunk_size, self.impl = chunk_size, impl
    init = nnx.initializers.lecun_normal()

    linear = functools.partial(sharded_linear, rngs=rngs)

    self.q_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.k_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.v_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.o_proj = linear(d_model, d_model, axes.HEADS, axes.EMBED)

    def feature_weights():
      if F == K:  # the paper's identity initialisation
        return jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (n_heads, K, K))
      return init(rngs.params(), (n_heads, K, F), jnp.float32)

    self.fq_w = param(feature_weights(), axes.HEADS, None, axes.STATE_K)
    self.fq_b = param(jnp.zeros((n_heads, F), jnp.float32), axes.HEADS,
                      axes.STATE_K, float32=True)
    self.fk_w = param(feature_weights(), axes.HEADS, None, axes.STATE_K)
    self.fk_b = param(jnp.zeros((n_heads, F), jnp.float32), axes.HEADS,
                      axes.STATE_K, float32=True)

  def _split(self, y):
    return y.reshape(*y.shape[:-1], self.n_heads, self.head_dim)

  def qk(self, x):
    """The layer's raw queries and keys, [..., H, K] each (x's dtype)."""
    return (self._split(self.q_proj(x)).astype(x.dtype),
            self._split(self.k_proj(x)).astype(x.dtype))

  def features(self, q, k):
    """phi_q(q), phi_k(k): [..., H, 2F] float32."""
    return (hedgehog_feature_map(q, self.fq_w[...], self.fq_b[...]),
            hedgehog_feature_map(k, self.fk_w[...], self.fk_b[...]))

  def distillation_loss(self, x, teacher_q=None, teacher_k=None):
    """``attention_distillation_loss`` of this layer's feature maps on x [B, T, D]
    against the softmax attention of (teacher_q, teacher_k) [B, T, H, K], by
    default the layer's own q, k."""
    q, k = self.qk(x)
    phi_q, phi_k = self.features(q, k)
    tq = q if teacher_q is None else teacher_q
    tk = k if teacher_k is None else teacher_k
    return attention_distillation_loss(tq, tk, phi_q, phi_k, eps=self.eps)

  def _output(self, o, x):
    return self.o_proj(o.reshape(*o.shape[:-2], self.d_model)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length
    return {"h": jnp.zeros((batch, self.n_heads, 2 * self.feature_dim,
                            self.head_dim + 1), jnp.float32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). ``segment_ids``: optional int
    [B, T] document ids of packed rows: the state restarts at every document
    (``positions`` is accepted for the mixer protocol and unused)."""
    del positions
    q, k = self.qk(x)
    phi_q, phi_k = self.features(q, k)
    v = self._split(self.v_proj(x)).astype(x.dtype)
    h0 = None if cache is None else cache["h"]
    o, h_t = normalized_linear_attention(phi_q, phi_k, v, h0=h0,
                                         chunk_size=self.chunk_size,
                                         impl=self.impl, eps=self.eps,
                                         segment_ids=segment_ids)
    return self._output(o, x), (None if cache is None else {"h": h_t})

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    q, k = self.qk(x_t)
    phi_q, phi_k = self.features(q, k)
    v = self._split(self.v_proj(x_t)).astype(x_t.dtype)
    o, h = normalized_linear_attention_step(phi_q, phi_k, v, cache["h"],
                                            eps=self.eps)
    return self._output(o, x_t), {"h": h}
