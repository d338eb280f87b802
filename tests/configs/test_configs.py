"""Every configs/*.py builds its model at smoke size and runs one forward and
backward on CPU; configs import nothing but ml_collections and configs.common."""

import ast
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lsm import layers
from lsm.models.lm import LanguageModel, LMConfig
from lsm.models.loss import cross_entropy

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))
# configs/lm.py variants worth building: every mixer, and the hybrid pattern.
LM_ARGS = [f"mixer={m},smoke=True" for m in sorted(layers.MIXERS)] + [
    "mixer=hybrid,smoke=True,beta_scale=2.0"]


def _cases():
  for name in CONFIGS:
    args = LM_ARGS if name == "lm" else ["smoke=True"]
    for arg in args:
      yield name, arg


@pytest.mark.parametrize("name, arg", list(_cases()))
def test_config_builds_and_trains_one_step(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  cfg = LMConfig(**config.model)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)

  def loss_fn(m):
    logits, _ = m(tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:])[0]

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  assert jnp.isfinite(loss) and abs(float(loss) - jnp.log(cfg.vocab_size)) < 1.0
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


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
    for mod in mods:
      assert mod.split(".")[0] in ("ml_collections", "configs"), (
          f"configs/{name}.py imports {mod}")


def test_bad_config_arg_is_clear():
  lm = importlib.import_module("configs.lm")
  with pytest.raises(ValueError, match=r"key one of \["):
    lm.get_config("mixr=gla")
  with pytest.raises(ValueError, match=r"size='9b'; expected one of"):
    lm.get_config("size=9b")
