"""The optimiser: AdamW with a weight-decay mask, a learning-rate schedule and
global-norm clipping, built from ``OptimConfig(**config.optim)``.

AdamW decays the weight matrices only: never a vector, and never a parameter
its layer marks ``Float32Param`` (decay rates, step sizes, skip gains, S4D's A,
B, C, norm scales, biases; lsm.layers.precision), which the train step also
keeps float32. Weight decay would pull those towards 0 (for a_log: towards no
forgetting), which the papers avoid. The mark reaches the optimiser as a bool
tree, ``lsm.train.state.float32_mask(model_cfg)``.

Gradient accumulation lives in the train step (a scan over micro-batches), not in
``optax.MultiSteps``, so every optimiser step sees the gradient of the whole
batch and metrics stay per step.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "wsd", "constant")

# The obsolete optim.no_decay_names default, which every config.json written
# before the float32 mark records; such runs still load (OptimConfig).
_OLD_NO_DECAY_NAMES = ("a_log", "A_log", "log_a_real", "a_imag", "log_dt",
                       "dt_bias", "d", "D")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser options.

  Attributes:
    lr: peak learning rate.
    schedule: "cosine" (linear warmup, cosine decay to ``min_lr_ratio * lr``),
      "wsd" (warmup, stable, then a decay over the last ``decay_fraction`` of the
      steps; Hu et al. 2024), or "constant" (after warmup).
    warmup_steps: linear warmup from 0.
    total_steps: length of the schedule; None uses ``train.num_steps``.
    min_lr_ratio: final learning rate as a fraction of ``lr``.
    decay_fraction: WSD only: fraction of total steps spent decaying.
    b1, b2, eps: Adam moments.
    weight_decay: decoupled (AdamW) decay, applied to unmarked matrices only
      (module docstring).
    clip_norm: global gradient-norm clipping threshold; None or 0 for none.
    no_decay_names: obsolete (init-only, not a field): the layers' float32
      mark replaced this name list. Accepted only as None or the old default,
      which config.json files of earlier runs record, so they still load;
      any other list is refused.
  """
  lr: float = 3e-4
  schedule: str = "cosine"
  warmup_steps: int = 100
  total_steps: int | None = None
  min_lr_ratio: float = 0.1
  decay_fraction: float = 0.2
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0
  no_decay_names: dataclasses.InitVar[Sequence[str] | None] = None

  def __post_init__(self, no_decay_names):
    if no_decay_names is not None and (
        isinstance(no_decay_names, str)
        or sorted(no_decay_names) != sorted(_OLD_NO_DECAY_NAMES)):
      raise ValueError(
          f"optim.no_decay_names={no_decay_names!r} is obsolete: the parameters "
          "kept out of weight decay are now marked where their layer creates "
          "them (lsm.layers.precision.Float32Param); drop the key (only the "
          "old default list is accepted, for earlier runs' config.json)")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optim.schedule={self.schedule!r}; expected one of "
                       f"{list(SCHEDULES)}")
    for name in ("lr", "eps"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"optim.{name}={value!r}; expected a positive number")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ValueError(f"optim.warmup_steps={self.warmup_steps!r}; expected an "
                       "int >= 0")
    for name in ("min_lr_ratio", "decay_fraction", "b1", "b2"):
      value = getattr(self, name)
      if not 0 <= value <= 1:
        raise ValueError(f"optim.{name}={value!r}; expected a number in [0, 1]")
    if self.weight_decay < 0:
      raise ValueError(f"optim.weight_decay={self.weight_decay!r}; expected >= 0")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimiser step."""
  total = cfg.total_steps or total_steps
  warmup = min(cfg.warmup_steps, total)
  peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=warmup, decay_steps=max(total, warmup + 1),
        end_value=floor)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if cfg.schedule == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
  decay_steps = max(int(round(cfg.decay_fraction * total)), 1)
  stable_end = max(total - decay_steps, warmup)
  return optax.join_schedules(
      [warm, optax.constant_schedule(peak),
       optax.linear_schedule(peak, floor, decay_steps)],
      [warmup, stable_end])


def decay_mask(params, float32_mask: Any = None):
  """True for the parameters AdamW decays: matrices (ndim >= 2) not marked in
  ``float32_mask`` (a bool tree shaped like ``params``, True for the layers'
  ``Float32Param``s: ``lsm.train.state.float32_mask``; None marks nothing)."""
  if float32_mask is None:
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
  # Under make_optimizer's ``trainable``, frozen parameters arrive as
  # optax.MaskedNode subtrees; they stay MaskedNodes in the mask.
  return jax.tree.map(
      lambda keep, x: x if isinstance(x, optax.MaskedNode) else (
          jnp.ndim(x) >= 2 and not keep), float32_mask, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, float32_mask: Any,
                   trainable: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule): clip, then AdamW with the decay mask.

  float32_mask: the model's marks, ``lsm.train.state.float32_mask(model_cfg)``;
  the marked parameters are never decayed. None marks nothing (every matrix is
  decayed): for parameter trees that come from no lsm model.
  trainable: optional bool tree shaped like the parameters; False leaves are
  frozen (zero updates, no optimiser state: optax.multi_transform), and
  clipping sees the trainable gradients only."""
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      mask=lambda p: decay_mask(p, float32_mask)))
  chain = optax.chain(*parts)
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    chain = optax.multi_transform({"train": chain, "frozen": optax.set_to_zero()},
                                  labels)
  return chain, schedule
