"""Synthetic tasks through the trainer: a recall smoke run with evaluation at
every test size (the state-tracking smoke run is notebooks/state_tracking.ipynb,
run by tests/test_notebooks.py), and the eval metrics checked against an
independent count on the same examples."""

import jax
import numpy as np
import pytest

import configs.recall as recall
import configs.state_tracking as state_tracking
from lsm.models.lm import LanguageModel, LMConfig
from lsm.tasks import TaskConfig, make_task
from lsm.tasks.base import TaskSource
from lsm.tasks.metrics import sequence_metrics
from lsm.train import loop

DEVICE = jax.devices()[:1]


@pytest.mark.parametrize("module, arg", [
    (recall, "task=mqar,mixer=gla,size=32,num_pairs=4,vocab=64"),
])
def test_task_smoke_run_evaluates_every_test_size(module, arg, tmp_path):
  config = module.get_config(arg + ",smoke=True")
  config.train.update(progress=False, log_every=10)
  history = loop.train(config, tmp_path, devices=DEVICE)
  last = history[max(history)]
  sizes = config.task.eval_sizes
  assert max(sizes) > config.task.train_sizes[1]   # length generalisation
  for size in sizes:
    for key in ("accuracy", "sequence_accuracy", "scaled_accuracy"):
      assert f"eval_{size}_{key}" in last, sorted(last)
    assert 0.0 <= last[f"eval_{size}_accuracy"] <= 1.0
    # Scaled accuracy is the token accuracy rescaled by the task's chance.
    chance = make_task(TaskConfig(**config.task.to_dict())).chance
    np.testing.assert_allclose(
        last[f"eval_{size}_scaled_accuracy"],
        (last[f"eval_{size}_accuracy"] - chance) / (1 - chance), rtol=1e-6)


def test_eval_metrics_match_an_independent_count(tmp_path):
  """The loop's eval numbers equal sequence_metrics on the model's own argmax
  predictions for the same records (first eval_steps * batch records)."""
  config = state_tracking.get_config(
      "task=parity,mixer=delta_net,beta_scale=2,smoke=True")
  config.train.update(progress=False, num_steps=1, eval_every=1, eval_steps=1)
  config.optim.update(lr=1e-12)   # the evaluated params are (almost) the init
  config.task.eval_sizes = (50,)
  history = loop.train(config, tmp_path, devices=DEVICE)
  task = make_task(TaskConfig(**config.task.to_dict()))
  # The loop's eval stream for the first eval size (see loop.train).
  source = TaskSource(task, seed=config.data.seed + 1_000_003, sizes=(50, 50))
  batch = [source[i] for i in range(config.data.batch_size)]
  inputs = np.stack([r["inputs"] for r in batch])
  targets = np.stack([r["targets"] for r in batch])
  mask = np.stack([r["mask"] for r in batch])
  from flax import nnx   # the model at init: lr 1e-12 moved it by ~1e-12
  model = LanguageModel(LMConfig(**config.model.to_dict()),
                        rngs=nnx.Rngs(config.train.seed))
  logits, _ = model(inputs)
  expected = sequence_metrics(np.asarray(logits.argmax(-1)), targets, mask,
                              task.chance)
  got = history[1]
  assert got["eval_50_accuracy"] == pytest.approx(expected["token_accuracy"])
  assert got["eval_50_sequence_accuracy"] == pytest.approx(
      expected["sequence_accuracy"])
  # experiments.state_tracking.parity_mechanism reads the same model at every
  # position of one pass; its accuracy at the last of 50 bits over the same
  # records is the loop's eval accuracy at size 50.
  from experiments.state_tracking import parity_mechanism
  mech = parity_mechanism(config, tmp_path, size=50,
                          n=config.data.batch_size,
                          seed=config.data.seed + 1_000_003)
  assert mech["position_accuracy"].shape == (50,)
  assert mech["position_accuracy"][-1] == pytest.approx(got["eval_50_accuracy"])
  assert np.all(np.abs(mech["layer0/key_cos"]) <= 1.0 + 1e-6)
