"""Train and eval steps (pure functions of state and batch; jitted by the loop).

Mixed precision: the state keeps float32 master parameters; with a bfloat16
``compute_dtype`` the weight matrices are cast for the forward and backward
pass, while the parameters the layers mark ``Float32Param`` where they create
them (decay rates and step sizes, S4D's A, B, C, skip gains, norm scales,
biases: lsm.layers.precision) stay float32, since bf16's 8 mantissa bits would
move the recurrences' eigenvalues. Unmarked vectors stay float32 too. Gradients
reach the float32 masters through the cast; recurrent states and accumulators
are float32 in every op. ``resolve_compute_dtype`` turns ``train.compute_dtype``
("auto", "float32", "bfloat16") into the dtype a run uses.

The objective is the masked token cross entropy plus the mixers' auxiliary
losses (lsm.models.lm.logits_and_aux_loss: MoM's load balancing, 0 for other
mixers); ``loss`` reports the cross entropy alone and ``aux_loss`` the rest.

A non-finite loss or gradient norm skips the update: parameters and optimiser
state keep their old values, ``bad_steps`` counts the streak and ``skipped`` the
total; the loop stops the run when the streak grows too long.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lsm.layers import lora
from lsm.models import distill
from lsm.models.lm import logits_and_aux_loss
from lsm.models.loss import cross_entropy
from lsm.train.state import Setup


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# Platforms (jax.default_backend() names) where "auto" trains in bfloat16.
BF16_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def resolve_compute_dtype(name: str, platform: str | None = None) -> str:
  """``train.compute_dtype`` as a run uses it: "float32" or "bfloat16".

  "auto" is bfloat16 on GPU and TPU, where the field trains in bf16 (float32
  master weights, states and accumulators; marked parameters float32), and
  float32 on CPU and any other platform. "float32" and "bfloat16" force one.

  Args:
    name: "auto", "float32" or "bfloat16".
    platform: a ``jax.default_backend()`` name; None for this process's.

  Raises:
    ValueError: for any other name, naming ``train.compute_dtype``.
  """
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype={name!r}; expected one of "
                     f"{list(COMPUTE_DTYPES)}")
  if name != "auto":
    return name
  platform = jax.default_backend() if platform is None else platform
  return "bfloat16" if platform.lower() in BF16_PLATFORMS else "float32"


def _dtype(compute_dtype):
  """A dtype, or a ``train.compute_dtype`` name ("auto" resolved here)."""
  if isinstance(compute_dtype, str):
    compute_dtype = resolve_compute_dtype(compute_dtype)
  return jnp.dtype(compute_dtype)


def cast_params(params, float32_mask, dtype):
  """The parameters as the forward and backward pass see them: matrices
  (ndim >= 2) in ``dtype``, except those marked in ``float32_mask`` (a bool
  tree shaped like ``params``: ``Setup.float32_mask``), which keep their
  float32, as do vectors."""
  if dtype == jnp.float32:
    return params
  return jax.tree.map(
      lambda x, keep: x if keep or x.ndim < 2 else x.astype(dtype),
      params, float32_mask)


# Packed-document keys a batch may carry (text rows with
# data.reset_at_boundaries); the model then restarts at each document.
DOCUMENT_KEYS = ("segment_ids", "positions")


def _documents(batch) -> dict:
  return {k: batch[k] for k in DOCUMENT_KEYS if k in batch}


def _logits(setup, params, batch, dtype):
  model = nnx.merge(setup.graphdef, cast_params(params, setup.float32_mask, dtype))
  return model(batch["inputs"], **_documents(batch))[0]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the train step minimises (per target token, summed then divided by
  the count).

  Attributes:
    kind: "lm" (next-token cross entropy plus the mixers' auxiliary losses),
      "transfer" (attention transfer: the converted layers' output MSE against
      the softmax attention they replace, lsm.models.distill; reported as
      ``loss``) or "lm_kl" (cross entropy plus ``kl_weight`` times
      KL(teacher || student) per token, the teacher being the same parameters
      with LoRA adapters zeroed and converted layers as softmax attention;
      the weighted KL is reported in ``aux_loss``).
    kl_weight: the KL term's weight ("lm_kl").
    trainable: optional bool tree shaped like the parameters: False leaves
      are held constant (stop_gradient), so their gradients are zero and the
      backward pass skips them.
  """
  kind: str = "lm"
  kl_weight: float = 0.0
  trainable: Any = dataclasses.field(default=None, compare=False, hash=False)

  def __post_init__(self):
    if self.kind not in ("lm", "transfer", "lm_kl"):
      raise ValueError(f"Objective.kind={self.kind!r}; expected lm, transfer "
                       "or lm_kl")


def _sums(setup, params, batch, dtype, objective: Objective = Objective()):
  """(sum of token losses + aux * count, (sum of correct, number of target
  tokens, sum of token losses, aux * count)).

  aux is the sum of the mixers' auxiliary losses (MoM's load balancing; 0 for
  other models; plus the weighted KL for "lm_kl"), weighted by the
  target-token count so that dividing by the total count, as the step does,
  adds the (count-weighted mean) aux loss to the mean token loss, with or
  without gradient accumulation."""
  if objective.trainable is not None:
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p),
                          params, objective.trainable)
  model = nnx.merge(setup.graphdef, cast_params(params, setup.float32_mask, dtype))
  mask = batch["mask"].astype(jnp.float32)
  count = jnp.sum(mask)
  docs = _documents(batch)
  if objective.kind == "transfer":
    loss_sum, _ = distill.attention_transfer(model, batch["inputs"], mask, **docs)
    zero = jnp.zeros((), jnp.float32)
    return loss_sum, (zero, count, loss_sum, zero)
  logits, aux = logits_and_aux_loss(model, batch["inputs"], **docs)
  loss, acc = cross_entropy(logits, batch["targets"], mask)
  # cross_entropy divides by max(count, 1); multiplying back gives exact sums.
  denom = jnp.maximum(count, 1.0)
  loss_sum, aux_sum = loss * denom, aux * denom
  if objective.kind == "lm_kl":
    teacher = nnx.merge(setup.graphdef, cast_params(
        lora.without_adapters(jax.lax.stop_gradient(params)),
        setup.float32_mask, dtype))
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(
        distill.teacher_logits(teacher, batch["inputs"], **docs)), -1)
    log_s = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)
    aux_sum = aux_sum + objective.kl_weight * jnp.sum(kl * mask)
  return loss_sum + aux_sum, (acc * denom, count, loss_sum, aux_sum)


def make_train_step(setup: Setup, schedule: optax.Schedule, *, grad_accum: int = 1,
                    compute_dtype=jnp.float32, objective: Objective = Objective()):
  """step(state, batch) -> (state, metrics). Batch rows: a multiple of grad_accum.
  compute_dtype: a dtype or a ``train.compute_dtype`` name; objective: what
  the step minimises (``Objective``; the next-token loss by default)."""
  optimizer, dtype = setup.optimizer, _dtype(compute_dtype)
  grad_fn = jax.value_and_grad(
      lambda p, b: _sums(setup, p, b, dtype, objective), has_aux=True)

  def gradients(params, batch):
    if grad_accum == 1:
      return grad_fn(params, batch)
    # Micro-batch j holds rows j, j + A, j + 2A, ...: the reshape keeps the
    # leading (sharded) dimension whole, so no data moves between devices.
    def split(x):
      rows = x.shape[0] // grad_accum
      return jnp.swapaxes(x.reshape(rows, grad_accum, *x.shape[1:]), 0, 1)

    def body(carry, micro):
      out = grad_fn(params, micro)
      return jax.tree.map(jnp.add, carry, out), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        grad_fn, params, jax.tree.map(lambda x: split(x)[0], batch)))
    out, _ = jax.lax.scan(body, zero, jax.tree.map(split, batch))
    return out

  def step(state, batch):
    params = state["params"]
    (_, (correct, count, loss_sum, aux_sum)), grads = gradients(params, batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    # loss: the token cross entropy alone (comparable across mixers); the
    # gradient is that of loss + aux_loss.
    loss, aux_loss = loss_sum / denom, aux_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    bad = jnp.where(finite, 0, state["bad_steps"] + 1)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, params),
        "opt_state": keep(opt_state, state["opt_state"]),
        "bad_steps": bad.astype(jnp.int32),
        "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = {
        "loss": loss, "aux_loss": aux_loss, "accuracy": correct / denom,
        "grad_norm": grad_norm,
        # The update of this step used the schedule at the count of applied
        # (not skipped) updates.
        "lr": schedule(state["step"] - state["skipped"]),
        "target_tokens": count, "nonfinite": (~finite).astype(jnp.int32),
        "bad_steps": new_state["bad_steps"],
    }
    if objective.kind == "transfer":
      del metrics["accuracy"]  # no logits in attention transfer
    return new_state, metrics

  return step


def make_eval_step(setup: Setup, *, compute_dtype=jnp.float32):
  """eval_step(params, batch) -> sums over one batch: loss_sum, correct and
  count (target tokens), seq_correct and seqs (sequences with at least one
  target, and those with every target right). compute_dtype: a dtype or a
  ``train.compute_dtype`` name."""
  dtype = _dtype(compute_dtype)

  def step(params, batch):
    logits = _logits(setup, params, batch, dtype)
    mask = batch["mask"].astype(bool)
    weights = mask.astype(jnp.float32)
    loss, _ = cross_entropy(logits, batch["targets"], weights)
    count = jnp.sum(weights)
    right = jnp.argmax(logits, axis=-1) == batch["targets"]
    has_target = jnp.any(mask, axis=-1)
    all_right = jnp.all(right | ~mask, axis=-1) & has_target
    return {"loss_sum": loss * jnp.maximum(count, 1.0),
            "correct": jnp.sum(right & mask).astype(jnp.float32), "count": count,
            "seq_correct": jnp.sum(all_right).astype(jnp.float32),
            "seqs": jnp.sum(has_target).astype(jnp.float32)}
  return step
