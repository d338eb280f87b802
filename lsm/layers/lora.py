"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear layers.

A targeted layer y = x W (+ b), W [d_in, d_out], becomes

  y = x W (+ b) + (alpha / r) (x A) B,    A [d_in, r], B [r, d_out],

with A LeCun-normal and B zero, so an adapted model starts as the model it
adapts. ``LoRALinear`` keeps the wrapped layer's ``kernel`` and ``bias`` under
their names, so a checkpoint of the unadapted model loads into it unchanged,
and adds ``lora_a`` and ``lora_b``. ``merge`` folds trained adapters into the
kernels, W + (alpha / r) A B, giving the parameters of the same model without
adapters.

``LMConfig.lora`` (lsm.models.lm) adds them: {"rank": r, "alpha": alpha,
"targets": attribute names of the mixers' projections, e.g. ("q_proj",
"k_proj", "v_proj", "o_proj")}.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.sharding import sharded

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_options(lora: Mapping) -> dict:
  """The LoRA options with defaults, checked: rank >= 1, alpha > 0, targets a
  non-empty sequence of names."""
  unknown = sorted(set(lora) - {"rank", "alpha", "targets"})
  if unknown:
    raise ValueError(f"lora: unknown options {unknown}; expected rank, alpha, "
                     "targets")
  rank = lora.get("rank")
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"lora.rank={rank!r}; expected a positive int")
  alpha = lora.get("alpha", float(rank))
  if not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"lora.alpha={alpha!r}; expected a number > 0")
  targets = tuple(lora.get("targets", DEFAULT_TARGETS))
  if not targets or not all(isinstance(t, str) and t for t in targets):
    raise ValueError(f"lora.targets={targets!r}; expected attribute names of "
                     f"the mixers' projections, e.g. {list(DEFAULT_TARGETS)}")
  return {"rank": rank, "alpha": float(alpha), "targets": targets}


class LoRALinear(nnx.Module):
  """``base`` (an nnx.Linear) plus a rank-r update; parameters ``kernel``,
  ``bias`` (if base has one), ``lora_a`` [d_in, r], ``lora_b`` [r, d_out]."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float,
               rngs: nnx.Rngs):
    d_in, d_out = base.kernel.shape
    names = base.kernel.get_metadata().get("out_sharding") or (None, None)
    self.kernel = base.kernel
    self.bias = nnx.data(base.bias)
    self.scale = float(alpha) / rank
    a_init = sharded(nnx.initializers.lecun_normal(), names[0], None)
    b_init = sharded(nnx.initializers.zeros, None, names[1])
    self.lora_a = nnx.Param(a_init(rngs.params(), (d_in, rank), jnp.float32))
    self.lora_b = nnx.Param(b_init(rngs.params(), (rank, d_out), jnp.float32))

  def __call__(self, x):
    kernel = self.kernel[...]
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    x = x.astype(dtype)
    y = jnp.dot(x, kernel.astype(dtype))
    low = jnp.dot(jnp.dot(x, self.lora_a[...].astype(dtype)),
                  self.lora_b[...].astype(dtype))
    y = y + (self.scale * low).astype(dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


def add_adapters(model: nnx.Module, lora: Mapping, rngs: nnx.Rngs) -> int:
  """Replaces every nnx.Linear attribute named in ``lora["targets"]`` of every
  submodule of ``model`` by a ``LoRALinear`` around it. Returns how many were
  adapted; a target that matches no layer raises."""
  opts = check_options(lora)
  found = dict.fromkeys(opts["targets"], 0)
  for _, module in list(nnx.iter_graph(model)):
    if not isinstance(module, nnx.Module):
      continue
    for name in opts["targets"]:
      layer = getattr(module, name, None)
      if isinstance(layer, nnx.Linear):
        setattr(module, name, LoRALinear(layer, rank=opts["rank"],
                                         alpha=opts["alpha"], rngs=rngs))
        found[name] += 1
  missing = [n for n, c in found.items() if not c]
  if missing:
    raise ValueError(f"lora.targets {missing} match no linear layer of the "
                     "model; expected names of the mixers' projections (e.g. "
                     f"{list(DEFAULT_TARGETS)})")
  return sum(found.values())


def merge(params: dict, lora: Mapping) -> dict:
  """Parameters (a pure dict) with every adapter folded into its kernel,
  W + (alpha / r) A B, and ``lora_a`` / ``lora_b`` removed: the parameters of
  the model built without ``lora``. Computed in float32."""
  opts = check_options(lora)
  scale = opts["alpha"] / opts["rank"]

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    if "lora_a" in tree and "lora_b" in tree:
      out = {k: v for k, v in tree.items() if k not in ("lora_a", "lora_b")}
      update = jnp.dot(jnp.asarray(tree["lora_a"], jnp.float32),
                       jnp.asarray(tree["lora_b"], jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
      out["kernel"] = (jnp.asarray(tree["kernel"], jnp.float32)
                       + scale * update).astype(jnp.asarray(tree["kernel"]).dtype)
      return out
    return {k: walk(v) for k, v in tree.items()}

  return walk(params)


def without_adapters(params: dict) -> dict:
  """``params`` with every ``lora_b`` zeroed: the adapted model computes the
  unadapted one (the teacher of a LoRA fine-tune), in the same layout."""
  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    return {k: (jnp.zeros_like(v) if k == "lora_b" else walk(v))
            for k, v in tree.items()}
  return walk(params)
