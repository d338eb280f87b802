"""Every configs/*.py parses into the trainer's typed sections at smoke size and
runs one real train step (the trainer's jitted step on a random batch) on CPU;
configs import nothing but ml_collections and configs.common."""

import ast
import dataclasses
import importlib
import pathlib

import math

import jax
import jax.numpy as jnp
import pytest

from lsm import layers
from lsm.parallel.mesh import MeshConfig, make_mesh
from lsm.tasks import make_task
from lsm.train import loop, optim
from lsm.train import state as state_lib
from lsm.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))
# The linear-attention family (issue 20): each trains several steps below
# (test_family_smoke_config_trains), which covers its one-step check too.
LINEAR_FAMILY = ("lightning", "retnet", "based", "hedgehog", "mom",
                 # the mixers on the dplr op (issue 29)
                 "delta_product", "kda", "gdn2", "rwkv7")
# configs/lm.py variants worth building: every mixer, and the hybrid pattern.
LM_ARGS = [f"mixer={m},smoke=True" for m in sorted(layers.MIXERS)
           if m not in LINEAR_FAMILY] + ["mixer=hybrid,smoke=True,beta_scale=2.0"]


FAMILIES = [n for n in CONFIGS if n in layers.MIXERS or n == "hybrid"]
# Synthetic-task configs; tests/train/test_task_training.py trains them.
TASK_CONFIGS = {"state_tracking": [
    f"task={t},smoke=True" for t in ("parity", "modular_arithmetic",
                                      "modular_arithmetic_brackets",
                                      "permutation")],
    "recall": [f"task={t},smoke=True" for t in ("mqar", "noisy_recall",
                                                 "selective_copy")]}


def test_every_config_is_covered():
  # linearize: below, and its runs in tests/train/test_linearize.py.
  assert set(CONFIGS) == {"lm", "linearize", *FAMILIES, *TASK_CONFIGS}


@pytest.mark.parametrize("arg, mixers, lora", [
    ("stage=transfer", ("lolcats", "lolcats"), None),
    ("student=liger,stage=finetune,keep_every=2", ("liger", "attention"), 8),
    ("student=gdn_attention,stage=finetune,lora_rank=0", ("gdn_attention",) * 2,
     None)])
def test_linearize_config_derives_the_student(arg, mixers, lora):
  teacher = ROOT / "tests" / "models" / "hf_fixtures" / "llama"
  run = loop.RunConfig.from_config(importlib.import_module(
      "configs.linearize").get_config(f"teacher={teacher},{arg}"))
  assert run.model.layer_mixers == mixers
  assert (run.model.lora or {}).get("rank") == lora
  assert run.model.mixer_kwargs[mixers[0]]["n_kv_heads"] == 2  # the teacher's
  assert run.data.tokenizer == "hf" and run.data.tokenizer_path == str(
      teacher / "tokenizer.json")


@pytest.mark.parametrize("name, arg", [(n, a) for n, args in TASK_CONFIGS.items()
                                       for a in args])
def test_task_config_parses_and_fits_its_task(name, arg):
  run = loop.RunConfig.from_config(
      importlib.import_module(f"configs.{name}").get_config(arg))
  task = make_task(run.task)
  assert task.vocab_size <= run.model.vocab_size
  assert max(run.task.eval_sizes) > run.task.train_sizes[1]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_config_is_the_lm_config_of_its_mixer(name):
  """Each family file fixes a mixer of configs/lm.py; lm.py's variants run a
  train step below, so this equality extends that check to the family file."""
  family = importlib.import_module(f"configs.{name}").get_config("smoke=True")
  general = importlib.import_module("configs.lm").get_config(
      f"mixer={name},smoke=True")
  assert family.to_dict() == general.to_dict()
  loop.RunConfig.from_config(family)


@pytest.mark.parametrize("arg", LM_ARGS)
def test_config_builds_and_trains_one_step(arg):
  config = importlib.import_module("configs.lm").get_config(arg)
  run = loop.RunConfig.from_config(config)
  tx, schedule = optim.make_optimizer(run.optim, run.train.num_steps,
                                      state_lib.float32_mask(run.model))
  setup = state_lib.build(run.model, tx, make_mesh(MeshConfig(),
                                                   jax.devices()[:1]), None)
  step = jax.jit(step_lib.make_train_step(setup, schedule))
  tokens = jax.random.randint(jax.random.key(0), (2, 25), 0, run.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((2, 24), bool)}
  state = state_lib.create(setup, 0)
  # Two steps: warmup makes the first step's learning rate 0.
  new_state, metrics = step(step(state_lib.create(setup, 0), batch)[0], batch)
  loss = float(metrics["loss"])
  assert abs(loss - math.log(run.model.vocab_size)) < 1.0, loss
  assert float(metrics["grad_norm"]) > 0 and int(metrics["nonfinite"]) == 0
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       new_state["params"], state["params"])
  assert max(jax.tree.leaves(moved)) > 0


# kda, gdn2 and rwkv7 train with -m slow (the default suite's 20-minute budget,
# 2026-12-06); tests/layers/test_dplr_mixers.py and test_rwkv7.py train none
# but check the layers against their papers' recurrences and decoding in the
# default suite.
SLOW_FAMILY = ("kda", "gdn2", "rwkv7")


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILY else n
    for n in LINEAR_FAMILY])
def test_family_smoke_config_trains(name):
  """configs/<name>.py at smoke size: 12 steps on one fixed batch through the
  trainer's jitted step; the loss starts near log(vocab) and falls by more
  than 1 nat (memorising the batch), every step finite."""
  run = loop.RunConfig.from_config(
      importlib.import_module(f"configs.{name}").get_config("smoke=True"))
  tx, schedule = optim.make_optimizer(run.optim, run.train.num_steps,
                                      state_lib.float32_mask(run.model))
  setup = state_lib.build(run.model, tx, make_mesh(MeshConfig(),
                                                   jax.devices()[:1]), None)
  step = jax.jit(step_lib.make_train_step(setup, schedule))
  tokens = jax.random.randint(jax.random.key(0), (2, 25), 0, run.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((2, 24), bool)}
  state = first = state_lib.create(setup, 0)
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    assert int(metrics["nonfinite"]) == 0, (name, losses)
  assert abs(losses[0] - math.log(run.model.vocab_size)) < 1.0, losses
  assert losses[-1] < losses[0] - 1.0, (name, losses)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       state["params"], first["params"])
  assert max(jax.tree.leaves(moved)) > 0
  aux = float(metrics["aux_loss"])
  if name == "mom":  # the weighted load-balancing loss, >= weight * 1
    assert aux >= 0.01 * run.model.n_layers * (1 - 1e-5), aux
  else:
    assert aux == 0.0, aux


@pytest.mark.parametrize("name", CONFIGS + ["common"])
def test_configs_import_only_ml_collections(name):
  tree = ast.parse((ROOT / "configs" / f"{name}.py").read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      mods = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mods = [node.module or ""]
    else:
      continue
    # common.py reads the sections' defaults from lsm's dataclasses, and a
    # linearisation teacher's config.json (json, os: no JAX).
    allowed = ("ml_collections", "configs") + (
        ("dataclasses", "json", "os", "types", "typing", "lsm")
        if name == "common" else ())
    for mod in mods:
      assert mod.split(".")[0] in allowed, f"configs/{name}.py imports {mod}"


def test_bad_config_arg_is_clear():
  lm = importlib.import_module("configs.lm")
  with pytest.raises(ValueError, match=r"key one of \["):
    lm.get_config("mixr=gla")
  with pytest.raises(ValueError, match=r"size='9b'; expected one of"):
    lm.get_config("size=9b")


def test_task_config_weight_decay_reaches_the_optimizer():
  st = importlib.import_module("configs.state_tracking")
  assert loop.RunConfig.from_config(st.get_config("")).optim.weight_decay == 0.1
  run = loop.RunConfig.from_config(st.get_config("weight_decay=0"))
  assert run.optim.weight_decay == 0.0
  with pytest.raises(ValueError, match=r"optim.weight_decay=-1.0: expected >= 0"):
    loop.RunConfig.from_config(st.get_config("weight_decay=-1"))


@pytest.mark.parametrize("name", ["lm", "state_tracking", "recall"])
def test_sections_take_their_defaults_from_the_dataclasses(name):
  """Every field of each section's dataclass is in the config (so any can be
  overridden on the command line), at the dataclass default unless the config
  sets it: a default changed in lsm is the default of every config."""
  config = importlib.import_module(f"configs.{name}").get_config("smoke=True")
  for section in ("model", "data", "optim", "train", "mesh"):
    typ = loop.SECTIONS[section]
    have = config[section]
    for field in dataclasses.fields(typ):
      default = (field.default if field.default is not dataclasses.MISSING
                 else field.default_factory())
      if default is None and field.name not in have:
        continue   # an untyped None (e.g. mesh.rules): not overridable
      assert field.name in have, f"{name}: {section}.{field.name} missing"
  assert config.train.compute_dtype == loop.TrainConfig.compute_dtype == "auto"
  assert config.model.norm_eps == loop.SECTIONS["model"]().norm_eps
