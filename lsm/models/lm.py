"""Language model: embedding, a stack of pre-norm (mixer + MLP) blocks whose
mixers follow a pattern, final RMSNorm, tied or untied output head. The MLP is
SwiGLU, or RWKV-7's channel mixing (``mlp="rwkv7"``).

``LMConfig(**config.model)`` is the one place model options are read, so an
unknown key raises. Mixers come from the explicit ``lsm.layers.MIXERS`` dict.
"""

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lsm import layers
from lsm.layers import lora as lora_lib
from lsm.layers.mlp import RWKV7ChannelMix, SwiGLU
from lsm.layers.norm import RMSNorm
from lsm.layers.sharding import sharded
from lsm.parallel import axes


# MLP name (LMConfig.mlp) -> class. RWKV-7's channel mixing has a token shift,
# so its blocks carry a cache for it (Block).
MLPS = {"swiglu": SwiGLU, "rwkv7": RWKV7ChannelMix}


def default_mlp_hidden(d_model: int, mlp: str = "swiglu") -> int:
  """The MLP's width: SwiGLU's 8/3 d rounded up to a multiple of 64 (LLaMA,
  GLA, DeltaNet); RWKV-7's channel mixing 4 d (the paper), rounded up to a
  multiple of 32 (flash-linear-attention's). Both give about 8 d^2 weights."""
  if mlp == "rwkv7":
    return 32 * math.ceil(4 * d_model / 32)
  return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Model options.

  Attributes:
    vocab_size: token vocabulary size.
    d_model: width D.
    n_layers: number of blocks.
    n_heads: heads of every mixer that has heads.
    mixer: the mixer of every layer when ``pattern`` is None.
    pattern: mixer names for consecutive layers, repeated to fill ``n_layers``
      (its length must divide n_layers), e.g. ("delta_net",) * 3 +
      ("attention",) puts attention in every 4th layer.
    mlp: the blocks' MLP, a name in ``MLPS``: "swiglu", or "rwkv7" (RWKV-7's
      channel mixing, relu(W_k lerp(x, x_prev))^2 W_v, with a token shift
      that restarts at each packed document and a cache for decoding).
    mlp_hidden: MLP width; None for ``default_mlp_hidden(d_model, mlp)``; 0 for
      no MLP (mixer-only blocks).
    tie_embeddings: share the embedding matrix with the output head.
    impl: op implementation for every mixer ("auto", "chunked", "reference").
    chunk_size: chunk length for the chunked ops.
    mixer_kwargs: per-mixer-name options, e.g. {"delta_net": {"beta_scale": 2.0}}.
    norm_eps: RMSNorm epsilon.
    lora: optional low-rank adapters on the mixers' projections
      (lsm.layers.lora): {"rank": r, "alpha": a, "targets": names such as
      ("q_proj", "k_proj", "v_proj", "o_proj")}; None for none.
  """
  vocab_size: int = 256
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  mixer: str = "gla"
  pattern: Sequence[str] | None = None
  mlp: str = "swiglu"
  mlp_hidden: int | None = None
  tie_embeddings: bool = True
  impl: str = "auto"
  chunk_size: int = 64
  # Left out of the hash (dicts are unhashable) so configs, and the nnx graph
  # definitions that hold them, can be static jit arguments.
  mixer_kwargs: Mapping[str, Mapping] = dataclasses.field(default_factory=dict,
                                                          hash=False)
  norm_eps: float = 1e-6
  lora: Mapping | None = dataclasses.field(default=None, hash=False)

  def __post_init__(self):
    valid = sorted(layers.MIXERS)
    for name in [self.mixer, *(self.pattern or ())]:
      if name not in layers.MIXERS:
        raise ValueError(f"LMConfig: unknown mixer {name!r}; expected one of {valid}")
    if self.mlp not in MLPS:
      raise ValueError(f"LMConfig: mlp={self.mlp!r}; expected one of {sorted(MLPS)}")
    for field in ("vocab_size", "d_model", "n_layers", "n_heads"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"LMConfig: {field}={value!r}; expected a positive int")
    if self.pattern is not None:
      pattern = tuple(self.pattern)
      if not pattern or self.n_layers % len(pattern):
        lengths = [n for n in range(1, self.n_layers + 1) if self.n_layers % n == 0]
        raise ValueError(f"LMConfig: pattern has length {len(pattern)}; expected a "
                         f"length dividing n_layers={self.n_layers}: one of {lengths}")
      object.__setattr__(self, "pattern", pattern)
    for name in self.mixer_kwargs:
      if name not in layers.MIXERS:
        raise ValueError(f"LMConfig: mixer_kwargs has unknown mixer {name!r}; "
                         f"expected one of {valid}")
    object.__setattr__(self, "mixer_kwargs",
                       {k: dict(v) for k, v in self.mixer_kwargs.items()})
    if self.lora is not None:
      object.__setattr__(self, "lora", lora_lib.check_options(self.lora))

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer name of each layer."""
    if self.pattern is None:
      return (self.mixer,) * self.n_layers
    return tuple(self.pattern[i % len(self.pattern)] for i in range(self.n_layers))

  @property
  def mlp_width(self) -> int:
    if self.mlp_hidden is None:
      return default_mlp_hidden(self.d_model, self.mlp)
    return self.mlp_hidden


class Block(nnx.Module):
  """x + mixer(norm(x)), then x + mlp(norm(x)).

  The block's cache is its mixer's, or, when its MLP keeps state (RWKV-7's
  channel mixing: the previous token's MLP input), {"mixer": the mixer's,
  "mlp": the MLP's}.
  """

  def __init__(self, mixer: str, cfg: LMConfig, *, rngs: nnx.Rngs,
               layer_index: int = 0):
    self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mixer = layers.MIXERS[mixer](
        cfg.d_model, **mixer_options(cfg, mixer, layer_index), rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.mlp_width else None
    # RWKV-7's mu_k init depends on the depth, as its time mixing's.
    depth = (dict(layer_index=layer_index, n_layers=cfg.n_layers)
             if cfg.mlp == "rwkv7" else {})
    self.mlp = MLPS[cfg.mlp](cfg.d_model, cfg.mlp_width, rngs=rngs,
                             **depth) if cfg.mlp_width else None
    # A token shift: the block's cache carries the MLP's last input.
    self.mlp_state = isinstance(self.mlp, RWKV7ChannelMix)

  def init_cache(self, batch: int, max_len: int):
    cache = self.mixer.init_cache(batch, max_len)
    if self.mlp_state:
      return {"mixer": cache, "mlp": self.mlp.init_cache(batch)}
    return cache

  def _mlp(self, x, cache, segment_ids=None, step=False):
    """x + mlp(norm(x)) and the MLP's new cache (None without state)."""
    if self.mlp is None:
      return x, None
    h = self.mlp_norm(x)
    if not self.mlp_state:
      return x + self.mlp(h), None
    if step:
      y, cache = self.mlp.step(h, cache)
    else:
      y, cache = self.mlp(h, cache, segment_ids=segment_ids)
    return x + y, cache

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    mixer_cache, mlp_cache = cache, None
    if self.mlp_state and cache is not None:
      mixer_cache, mlp_cache = cache["mixer"], cache["mlp"]
    y, mixer_cache = self.mixer(self.mixer_norm(x), mixer_cache,
                                segment_ids=segment_ids, positions=positions)
    x, mlp_cache = self._mlp(x + y, mlp_cache, segment_ids)
    if self.mlp_state and cache is not None:
      return x, {"mixer": mixer_cache, "mlp": mlp_cache}
    return x, mixer_cache

  def step(self, x_t, cache):
    mixer_cache = cache["mixer"] if self.mlp_state else cache
    y, mixer_cache = self.mixer.step(self.mixer_norm(x_t), mixer_cache)
    x_t, mlp_cache = self._mlp(x_t + y, cache["mlp"] if self.mlp_state else None,
                               step=True)
    if self.mlp_state:
      return x_t, {"mixer": mixer_cache, "mlp": mlp_cache}
    return x_t, mixer_cache


def _signature(cls) -> set[str]:
  return set(inspect.signature(cls.__init__).parameters)


def mixer_options(cfg: LMConfig, mixer: str, layer_index: int = 0) -> dict:
  """Constructor options of layer ``layer_index``'s mixer ``mixer``:
  ``n_heads`` and ``impl`` from the config, then ``mixer_kwargs[mixer]`` (which
  may set its own n_heads), the config's chunk size, and the depth for mixers
  that depend on it (Lightning's decays)."""
  kwargs = {"n_heads": cfg.n_heads, "impl": cfg.impl,
            **cfg.mixer_kwargs.get(mixer, {})}
  signature = _signature(layers.MIXERS[mixer])
  if "chunk_size" in signature:
    kwargs.setdefault("chunk_size", cfg.chunk_size)
  if "layer_index" in signature:
    kwargs.setdefault("layer_index", layer_index)
    kwargs.setdefault("n_layers", cfg.n_layers)
  return kwargs


class LanguageModel(nnx.Module):
  """Decoder-only LM over any mixer stack.

  ``model(tokens)`` -> float32 logits [B, T, vocab]; ``init_cache`` / ``step``
  follow the mixer protocol (lsm/layers/__init__.py) for decoding.
  ``model(tokens, segment_ids=..., positions=...)`` runs packed rows with every
  document on its own (states, convolutions and attention restart at each
  document start; RoPE at the pipeline's per-document positions).
  """

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                           embedding_init=sharded(nnx.initializers.normal(0.02),
                                                  axes.VOCAB, axes.EMBED))
    self.blocks = nnx.List([Block(m, cfg, rngs=rngs, layer_index=i)
                            for i, m in enumerate(cfg.layer_mixers)])
    if cfg.lora is not None:
      lora_lib.add_adapters(self.blocks, cfg.lora, rngs)
    self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.head = None if cfg.tie_embeddings else nnx.Linear(
        cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs,
        kernel_init=sharded(nnx.initializers.lecun_normal(), axes.EMBED, axes.VOCAB))

  def _embed(self, tokens):
    """Rows of the table in the table's dtype: bfloat16 under a bf16 compute
    step (``nnx.Embed`` would promote to the float32 it was built with, and
    every layer after it would run in float32)."""
    return jnp.take(self.embed.embedding[...], tokens, axis=0)

  def _logits(self, x):
    """float32 logits: the head's matmul in the compute dtype, accumulated
    and returned in float32."""
    x = self.norm(x)
    if self.head is None:
      w = self.embed.embedding[...].T
    else:
      w = self.head.kernel[...]
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)

  def init_cache(self, batch: int, max_len: int):
    """One cache per layer (``Block.init_cache``); linear mixers' are O(1) in
    ``max_len``."""
    return [blk.init_cache(batch, max_len) for blk in self.blocks]

  def __call__(self, tokens, cache=None, *, segment_ids=None, positions=None):
    """tokens: int [B, T] -> (logits float32 [B, T, vocab], cache or None).
    segment_ids, positions: optional int [B, T] of packed rows (lsm.data.packing;
    every mixer restarts at each document start)."""
    x = self._embed(tokens)
    new_cache = None if cache is None else []
    for i, blk in enumerate(self.blocks):
      x, c = blk(x, None if cache is None else cache[i], segment_ids=segment_ids,
                 positions=positions)
      if cache is not None:
        new_cache.append(c)
    return self._logits(x), new_cache

  def step(self, token, cache):
    """token: int [B] -> (logits float32 [B, vocab], cache)."""
    x = self._embed(token)
    new_cache = []
    for blk, c in zip(self.blocks, cache):
      x, c = blk.step(x, c)
      new_cache.append(c)
    return self._logits(x), new_cache


def logits_and_aux_loss(model: nnx.Module, tokens, **kwargs):
  """``model(tokens, **kwargs)`` (no cache; kwargs: segment_ids, positions),
  with the sum of the auxiliary losses its
  mixers sow (``nnx.Intermediate`` named ``aux_loss``: MoM's weighted
  load-balancing loss), collected by ``nnx.capture``.

  Returns:
    (logits float32 [B, T, vocab], aux float32 scalar; 0 without such mixers).
  """
  (logits, _), inter = nnx.capture(lambda m, t: m(t, **kwargs),
                                   nnx.Intermediate)(model, tokens)
  aux = jnp.zeros((), jnp.float32)
  for path, value in jax.tree_util.tree_leaves_with_path(inter):
    if any(getattr(p, "key", None) == "aux_loss" for p in path):
      aux = aux + jnp.asarray(value, jnp.float32)
  return logits, aux


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (nnx.Param leaves)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(cfg: LMConfig, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), for MFU. An estimate.

  6 N for the weights (Kaplan et al. 2020; the embedding lookup is excluded, the
  tied or untied head included), plus each layer's sequence mixing beyond its
  projections, from the mixer's own head shapes (its ``flops_per_token``:
  causal QK^T and AV for attention, about 12 H K V for a linear recurrence's
  state write and read, forward and backward). The mixers are built abstractly
  (``nnx.eval_shape``) once per distinct mixer to read their shapes.
  """
  table = cfg.vocab_size * cfg.d_model  # embedding; the head has the same size
  non_embedding = n_params - table - (0 if cfg.tie_embeddings else table)
  flops = 6.0 * (non_embedding + table)
  per_mixer = {}
  for name in cfg.layer_mixers:
    if name not in per_mixer:
      mixer = nnx.eval_shape(lambda n=name: layers.MIXERS[n](
          cfg.d_model, **mixer_options(cfg, n), rngs=nnx.Rngs(0)))
      per_mixer[name] = float(mixer.flops_per_token(seq_len))
    flops += per_mixer[name]
  return flops
