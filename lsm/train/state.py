"""The train state and its shardings.

The state is a plain dict pytree, so Orbax saves it without custom handlers and a
checkpoint stays readable across Flax versions:

  step       int32: optimiser steps taken, skipped ones included (batches consumed)
  params     the model's nnx.Param values as a pure dict (float32 master copy)
  opt_state  optax state
  bad_steps  int32: non-finite steps in a row (reset by a finite one)
  skipped    int32: non-finite steps skipped in total

Parameters are laid out on the mesh by their logical axis names
(lsm.layers.sharding) and the rules (lsm.parallel.rules); the optimiser moments
follow their parameters; scalars are replicated. ``float32_mask`` gives the
layers' float32 mark (lsm.layers.precision) in the layout of ``params``: the
train step's compute-dtype cast and the optimiser's weight-decay mask read it.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lsm.layers import precision
from lsm.models.lm import LanguageModel, LMConfig
from lsm.parallel import rules as rules_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the step functions and the checkpointer need to know."""
  model_cfg: LMConfig
  graphdef: Any
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  shardings: dict           # NamedSharding tree matching the state
  abstract_state: dict      # ShapeDtypeStructs with shardings (restore targets)
  batch_sharding: NamedSharding
  n_params: int
  # True for the parameters marked Float32Param (lsm.layers.precision), in the
  # layout of state["params"]: the step keeps them float32 in any compute dtype.
  float32_mask: dict


def _model_params(model_cfg: LMConfig, seed):
  model = LanguageModel(model_cfg, rngs=nnx.Rngs(seed))
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
  if any(jax.tree.leaves(r) for r in rest):
    raise ValueError("LanguageModel holds state other than nnx.Param; the trainer "
                     "only knows how to train parameters")
  return graphdef, params


def float32_mask(model_cfg: LMConfig) -> dict:
  """The model's float32 marks as a bool tree shaped like ``state["params"]``:
  True for parameters kept float32 and never weight-decayed
  (lsm.layers.precision). Pass it to ``optim.make_optimizer``. Allocates
  nothing."""
  _, abstract_params = nnx.eval_shape(lambda: _model_params(model_cfg, 0))
  return precision.float32_mask(abstract_params)


def build(model_cfg: LMConfig, optimizer: optax.GradientTransformation,
          mesh: jax.sharding.Mesh, rules) -> Setup:
  """Shapes, shardings and graph definition, without allocating parameters."""
  rules = rules_lib.normalize_rules(rules)
  graphdef, abstract_params = nnx.eval_shape(
      lambda: _model_params(model_cfg, 0))
  specs = rules_lib.param_specs(abstract_params, rules)
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                          is_leaf=lambda x: isinstance(x, P))
  shapes = jax.eval_shape(lambda: init_state(model_cfg, optimizer, 0))
  replicated = NamedSharding(mesh, P())
  # Frozen parameters (make_optimizer's ``trainable``) have no optimiser state:
  # optax.MaskedNode in place of their moments.
  opt_sh = optax.tree_map_params(
      optimizer, lambda v, sh: v if isinstance(v, optax.MaskedNode) else sh,
      shapes["opt_state"], param_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
  shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh,
               "bad_steps": replicated, "skipped": replicated}
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
  n_params = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  return Setup(model_cfg=model_cfg, graphdef=graphdef, optimizer=optimizer,
               mesh=mesh, shardings=shardings, abstract_state=abstract,
               batch_sharding=NamedSharding(mesh, rules_lib.batch_spec(rules)),
               n_params=int(n_params),
               float32_mask=precision.float32_mask(abstract_params))


def init_state(model_cfg: LMConfig, optimizer: optax.GradientTransformation,
               seed) -> dict:
  """A fresh state from an int seed or a PRNG key."""
  _, params = _model_params(model_cfg, seed)
  params = nnx.to_pure_dict(params)
  zero = jnp.zeros((), jnp.int32)
  return {"step": zero, "params": params, "opt_state": optimizer.init(params),
          "bad_steps": zero, "skipped": zero}


def create(setup: Setup, seed: int) -> dict:
  """A fresh state laid out on the mesh (each device builds only its shards)."""
  fn = jax.jit(lambda s: init_state(setup.model_cfg, setup.optimizer,
                                    jax.random.key(s)),
               out_shardings=setup.shardings)
  return fn(jnp.asarray(seed, jnp.uint32))
