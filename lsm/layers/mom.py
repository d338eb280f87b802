"""Mixture-of-Memories (Du et al. 2025, "MoM: Linear Sequence Modeling with
Mixture-of-Memories"). M memories per layer plus one shared memory, each a Gated
DeltaNet state (``memory="gated_delta"``, the paper's main variant;
lsm.ops.delta_rule) or a GLA state (``memory="gla"``; lsm.ops.gla). A router picks
the top-k memories of each token; the token writes to and reads from only those.

The paper's equations (routing, per-memory update, mixed read):

  p_t = softmax(x_t W_r) in R^M,  I_t = TopK(p_t),
  g_t^m = p_t^m / sum_{n in I_t} p_t^n  for m in I_t, else 0,
  k_t^m = x_t W_k^m, v_t^m = x_t W_v^m     (each memory its own key/value maps),
  M_t^m = update(M_{t-1}^m; k_t^m, v_t^m)  for m in I_t, else M_t^m = M_{t-1}^m,
  o_t = q_t (M_t^shared + sum_m g_t^m M_t^m),   q_t = x_t W_q (shared),

then the output norm, gate and projection of the memory type (per-head RMSNorm
times silu(x W_g), W_o). The shared memory is updated and read by every token with
weight 1.

On the existing ops without a gather: the M + 1 memories are M + 1 groups of H
heads of one op call, [B, T, (M + 1) H, K]. A token not routed to memory m gets
beta = 0 and log_g = 0 there (delta rule: S <- exp(0) S + 0 k (v - k S)) or k = 0
and log_g = 0 (GLA: S <- exp(0) S + 0^T v), which leaves the state exactly
unchanged, and its read of memory m is multiplied by g_t^m = 0. Linearity of the
read in the state makes "mix the states, then read" equal "read, then mix", so
the op's outputs are mixed with g. Every memory's state is carried in the cache,
so decoding keeps M + 1 states per head. Compute is (M + 1) times one memory's
(the paper's routed-only kernels avoid that; here the unrouted tokens are
masked, not skipped).

Load balancing (Switch Transformer's auxiliary loss, Fedus et al. 2022, which the
paper adds): with f_m the fraction of routed (token, choice) pairs that chose m
and P_m the mean router probability of m over the tokens,

  L_aux = M * sum_m f_m P_m        (1 at perfect balance),

computed in ``load_balancing_loss``. ``__call__`` sows aux_loss_weight * L_aux
as an ``nnx.Intermediate`` named ``aux_loss``, recorded inside ``nnx.capture``
only; lsm.models.lm.logits_and_aux_loss collects every layer's and the trainer
adds their sum to the objective. ``step`` (decoding) sows nothing.

Memory types follow lsm.layers.delta_net (gated_delta: short convs, L2-normalised
q, k, beta = sigmoid(x W_b), Mamba2-style decay) and lsm.layers.gla (gla: low-rank
per-channel forget gate with temperature 16), with beta, the decay and the gate
computed per memory. Simplified: the router has no noise or capacity limit; the
paper's optional extra memory types (plain linear attention, RetNet-style) are
not included.
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
from lsm.ops.delta_rule import delta_rule_step
from lsm.ops.gla import gla_step
from lsm.parallel import axes, sequence

MEMORY_TYPES = ("gated_delta", "gla")


def route(logits, top_k: int):
  """Top-k routing. logits: [..., M] -> (probs [..., M] float32 softmax,
  chosen [..., M] bool, weights [..., M] float32: probs renormalised over the
  chosen, 0 elsewhere). Ties go to the lower index (lax.top_k)."""
  logits = logits.astype(jnp.float32)
  M = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  _, idx = jax.lax.top_k(logits, top_k)  # [..., k]
  chosen = jnp.sum(jax.nn.one_hot(idx, M, dtype=jnp.int32), axis=-2) > 0
  kept = jnp.where(chosen, probs, 0.0)
  return probs, chosen, kept / jnp.sum(kept, axis=-1, keepdims=True)


def load_balancing_loss(probs, chosen):
  """M * sum_m f_m P_m over every leading position (module docstring).

  Args:
    probs: [..., M] router probabilities.
    chosen: [..., M] bool, the top-k choices (k per position).

  Returns:
    float32 scalar; 1 when every memory gets the same share of choices and of
    probability.
  """
  M = probs.shape[-1]
  probs = probs.reshape(-1, M).astype(jnp.float32)
  chosen = chosen.reshape(-1, M).astype(jnp.float32)
  f = jnp.sum(chosen, 0) / jnp.maximum(jnp.sum(chosen), 1.0)
  P = jnp.mean(probs, 0)
  return M * jnp.sum(f * P)


class MoM(nnx.Module):
  """Mixture-of-Memories mixer: [B, T, D] -> [B, T, D] (protocol in
  lsm/layers/__init__.py).

  Args:
    d_model: width D.
    n_heads: heads H per memory; the key and value widths must divide by H.
    n_memories: routed memories M.
    top_k: memories per token, 1 <= top_k <= M.
    shared_memory: add the always-on shared memory.
    memory: "gated_delta" or "gla" (module docstring).
    expand_k, expand_v: key and value widths relative to D, per memory.
    conv_width: gated_delta only: short-conv width on q, k, v (0: none).
    gate_rank: gla only: rank of the forget-gate projection.
    aux_loss_weight: weight of the load-balancing loss in the objective.
    routed_reads: False is an ablation: the routed memories' reads are
      multiplied by 0 (their writes, the router and the aux loss still run),
      so the output is the shared memory's read alone and the layer computes a
      Gated DeltaNet (or a GLA) with extra unused parameters. Needs
      shared_memory.
    chunk_size, impl: as the ops.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): 4 heads of K = V = 256 per memory from d_model 1024 up,
    D/4 below; 4 memories, top-2, the shared memory."""
    k = min(256, d_model // 4)
    return dict(n_heads=4, expand_k=4 * k / d_model, expand_v=4 * k / d_model)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the memories' recurrences beyond the
    projections (``lsm.models.lm.flops_per_token``): every memory slot of the
    op call (routed and shared), 18 H K V each for gated_delta, 12 for gla."""
    per = 18.0 if self.memory == "gated_delta" else 12.0
    return per * self.n_slots * self.key_dim * self.value_dim / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, n_memories: int = 4,
               top_k: int = 2, shared_memory: bool = True,
               memory: str = "gated_delta", expand_k: float = 1.0,
               expand_v: float = 1.0, conv_width: int = 4, gate_rank: int = 16,
               aux_loss_weight: float = 0.01, routed_reads: bool = True,
               chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs):
    key_dim, value_dim = round(d_model * expand_k), round(d_model * expand_v)
    if n_heads < 1 or key_dim % n_heads or value_dim % n_heads:
      raise ValueError(f"MoM: n_heads={n_heads!r}; expected a positive divisor "
                       f"of key width {key_dim} and value width {value_dim}")
    if n_memories < 1:
      raise ValueError(f"MoM: n_memories={n_memories!r}; expected a positive int")
    if not 1 <= top_k <= n_memories:
      raise ValueError(f"MoM: top_k={top_k!r}; expected 1 <= top_k <= "
                       f"n_memories={n_memories}")
    if memory not in MEMORY_TYPES:
      raise ValueError(f"MoM: memory={memory!r}; expected one of {MEMORY_TYPES}")
    if conv_width < 0:
      raise ValueError(f"MoM: conv_width={conv_width!r}; expected >= 0")
    if not routed_reads and not shared_memory:
      raise ValueError("MoM: routed_reads=False needs shared_memory=True (the "
                       "output would be 0)")
    if aux_loss_weight < 0:
      raise ValueError(f"MoM: aux_loss_weight={aux_loss_weight!r}; expected >= 0")
    self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
    self.n_memories, self.top_k, self.memory = n_memories, top_k, memory
    self.shared_memory, self.routed_reads = shared_memory, routed_reads
    self.n_slots = n_memories + int(shared_memory)  # memories in the op call
    self.aux_loss_weight = float(aux_loss_weight)
    self.chunk_size, self.impl = chunk_size, impl
    S, H = self.n_slots, n_heads

    def linear(i, o, ax_in=axes.EMBED, ax_out=axes.HEADS, bias=False):
      return sharded_linear(i, o, ax_in, ax_out, rngs=rngs, bias=bias)

    self.router = linear(d_model, n_memories, axes.EMBED, None)
    self.q_proj = linear(d_model, key_dim)
    self.k_proj = linear(d_model, S * key_dim)  # memory-major: slot s, head h
    self.v_proj = linear(d_model, S * value_dim)
    self.g_proj = linear(d_model, value_dim)
    self.o_proj = linear(value_dim, d_model, axes.HEADS, axes.EMBED)
    self.norm = RMSNorm(value_dim // n_heads, axis_name=axes.STATE_V)
    self.convs = nnx.List([ShortConv(w, width=conv_width, rngs=rngs)
                           for w in (key_dim, S * key_dim, S * value_dim)]
                          ) if memory == "gated_delta" and conv_width else None
    if memory == "gated_delta":
      self.b_proj = linear(d_model, S * H)
      self.a_proj = linear(d_model, S * H)
      a = jax.random.uniform(rngs.params(), (S * H,), jnp.float32, 1.0, 16.0)
      self.A_log = param(jnp.log(a), axes.HEADS, float32=True)
      dt = jnp.exp(jax.random.uniform(rngs.params(), (S * H,), jnp.float32,
                                      math.log(1e-3), math.log(1e-1)))
      self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), axes.HEADS,
                           float32=True)
    else:
      self.gk_down = linear(d_model, gate_rank, axes.EMBED, None)
      self.gk_up = linear(gate_rank, S * key_dim, None, axes.HEADS, bias=True)

  # -- projections -----------------------------------------------------------

  def _heads(self, y, slots: int | None):
    """[..., slots * H * d] -> [..., slots * H, d] (or [..., H, d])."""
    n = self.n_heads * (slots or 1)
    return y.reshape(*y.shape[:-1], n, y.shape[-1] // n)

  def _qkv(self, x, conv_cache, step: bool, segment_ids=None):
    qkv = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
    new_cache = None
    if self.convs is not None:
      qkv, new_cache = conv.apply_each(self.convs, qkv, conv_cache, step=step,
                                       segment_ids=segment_ids)
    elif self.memory == "gated_delta":
      qkv = [jax.nn.silu(y) for y in qkv]
    q, k, v = (y.astype(x.dtype) for y in qkv)
    q, k, v = self._heads(q, None), self._heads(k, self.n_slots), self._heads(
        v, self.n_slots)
    if self.memory == "gated_delta":
      q, k = _l2norm(q), _l2norm(k)
    # The shared query reads every memory: tile it over the slots.
    q = jnp.tile(q, (1,) * (q.ndim - 2) + (self.n_slots, 1))
    return q, k, v, new_cache

  def _routing(self, x):
    """-> (probs, chosen, slot weights [..., S] float32, slot mask [..., S])."""
    probs, chosen, weights = route(self.router(x), self.top_k)
    if self.shared_memory:
      one = jnp.ones((*weights.shape[:-1], 1), jnp.float32)
      if not self.routed_reads:  # the ablation (class docstring)
        weights = jnp.zeros_like(weights)
      return probs, chosen, jnp.concatenate([weights, one], -1), jnp.concatenate(
          [chosen, one > 0], -1)
    return probs, chosen, weights, chosen

  def _per_head(self, slot_values):
    """[..., S] -> [..., S * H] (each slot's value for its H heads)."""
    return jnp.repeat(slot_values, self.n_heads, axis=-1)

  def _gates(self, x, mask):
    """Masked transition data: (beta, log_g) for gated_delta ([..., S * H]
    each), (None, log_g [..., S * H, K]) for gla. Unrouted slots: beta = 0,
    log_g = 0 (the module docstring's exactness)."""
    mask_h = self._per_head(mask)
    if self.memory == "gated_delta":
      beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
      a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...]
      log_g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)
      return jnp.where(mask_h, beta, 0.0), jnp.where(mask_h, log_g, 0.0)
    log_g = jax.nn.log_sigmoid(self.gk_up(self.gk_down(x)).astype(jnp.float32))
    log_g = self._heads(log_g / 16.0, self.n_slots)
    return None, jnp.where(mask_h[..., None], log_g, 0.0)

  def _mix(self, o, weights):
    """o: [..., S * H, V] per-slot reads -> [..., H, V] mixed by weights [..., S]."""
    o = o.reshape(*o.shape[:-2], self.n_slots, self.n_heads, o.shape[-1])
    w = weights[..., None, None]
    return jnp.sum(o.astype(jnp.float32) * w, axis=-3)

  def _output(self, o, x):
    gate = self._heads(self.g_proj(x), None)
    o = self.norm(o.astype(x.dtype), gate)
    return self.o_proj(o.reshape(*o.shape[:-2], self.value_dim)).astype(x.dtype)

  # -- protocol ----------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length: one state per memory
    S, H = self.n_slots, self.n_heads
    cache = {"h": jnp.zeros((batch, S * H, self.key_dim // H,
                             self.value_dim // H), jnp.float32)}
    if self.convs is not None:
      cache["conv"] = [conv.init_cache(batch) for conv in self.convs]
    return cache

  def memory_states(self, cache):
    """The cache's states as [B, S, H, K, V] (slot S - 1 is the shared memory
    when there is one)."""
    h = cache["h"]
    return h.reshape(h.shape[0], self.n_slots, self.n_heads, *h.shape[2:])

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). Stores the weighted
    load-balancing loss as the Intermediate ``aux_loss``. ``segment_ids``:
    optional int [B, T] document ids of packed rows: every memory and the short
    convolutions restart at every document (``positions`` is accepted for the
    mixer protocol and unused)."""
    del positions
    conv_cache = None if cache is None else cache.get("conv")
    if cache is not None and self.convs is not None and conv_cache is None:
      raise ValueError("MoM: cache has no 'conv' entry")
    q, k, v, conv_cache = self._qkv(x, conv_cache, step=False,
                                    segment_ids=segment_ids)
    probs, chosen, weights, mask = self._routing(x)
    # Recorded only inside nnx.capture (the trainer's forward); elsewhere a
    # no-op, so calling the layer never changes its state.
    self.sow(nnx.Intermediate, "aux_loss",
             self.aux_loss_weight * load_balancing_loss(probs, chosen),
             capture_noop=True)
    beta, log_g = self._gates(x, mask)
    h0 = None if cache is None else cache["h"]
    if self.memory == "gated_delta":
      o, h_t = sequence.delta_rule(q, k, v, beta, log_g=log_g, h0=h0,
                                   chunk_size=self.chunk_size, impl=self.impl,
                                   segment_ids=segment_ids)
    else:
      k = jnp.where(self._per_head(mask)[..., None], k, jnp.zeros_like(k))
      o, h_t = sequence.gla(q, k, v, log_g, h0=h0, chunk_size=self.chunk_size,
                            impl=self.impl, segment_ids=segment_ids)
    y = self._output(self._mix(o, weights), x)
    if cache is None:
      return y, None
    new = {"h": h_t}
    if self.convs is not None:
      new["conv"] = conv_cache
    return y, new

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    q, k, v, conv_cache = self._qkv(x_t, cache.get("conv"), step=True)
    _, _, weights, mask = self._routing(x_t)
    beta, log_g = self._gates(x_t, mask)
    if self.memory == "gated_delta":
      o, h = delta_rule_step(q, k, v, beta, cache["h"], log_g_t=log_g)
    else:
      k = jnp.where(self._per_head(mask)[..., None], k, jnp.zeros_like(k))
      o, h = gla_step(q, k, v, log_g, cache["h"])
    new = {"h": h}
    if self.convs is not None:
      new["conv"] = conv_cache
    return self._output(self._mix(o, weights), x_t), new
