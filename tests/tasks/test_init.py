"""TASKS, TaskConfig and make_task: every name builds, options are checked with
messages that list what is valid, and importing lsm.tasks pulls in no JAX."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from lsm.tasks import TASKS, TaskConfig, make_task
from lsm.tasks.permutation import Permutation

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_names_match_classes():
  assert sorted(TASKS) == sorted(["parity", "modular_arithmetic",
                                  "modular_arithmetic_brackets", "permutation",
                                  "mqar", "noisy_recall", "selective_copy"])
  for name, cls in TASKS.items():
    assert cls.name == name
    assert dataclasses.is_dataclass(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(cls(), dataclasses.fields(cls)[0].name, None)


def test_make_task_builds_with_options():
  cfg = TaskConfig(name="permutation", train_sizes=(2, 64), eval_sizes=(128, 256),
                   options={"group": "A5"})
  assert make_task(cfg) == Permutation(group="A5")
  assert make_task(TaskConfig(name="parity", train_sizes=(3, 40))).mode == "final"


def test_config_dict_sections_work():
  """The trainer builds TaskConfig(**config.task) from an ml_collections config."""
  c = ml_collections.ConfigDict(dict(name="mqar", train_sizes=(64, 256),
                                     eval_sizes=(512, 1024),
                                     options=dict(num_pairs=16, alpha=0.1)))
  cfg = TaskConfig(**c)
  assert cfg.options == {"num_pairs": 16, "alpha": 0.1}
  assert isinstance(cfg.options, dict)
  assert make_task(cfg).num_pairs == 16
  # Lists (from a command-line override) are normalised to tuples.
  cfg = TaskConfig(name="parity", train_sizes=[1, 4], eval_sizes=[8])
  assert (cfg.train_sizes, cfg.eval_sizes) == ((1, 4), (8,))


@pytest.mark.parametrize("kw, match", [
    ({"name": "pairity"}, r"name='pairity'; expected one of \['modular_arithmetic'"),
    ({"name": ["parity"]}, r"name=\['parity'\]"),
    ({"train_sizes": (5, 3)}, r"train_sizes=\(5, 3\)"),
    ({"train_sizes": (0, 3)}, "train_sizes="),
    ({"train_sizes": (1, 2, 3)}, "train_sizes="),
    ({"train_sizes": 4}, "train_sizes=4"),
    ({"eval_sizes": (8, 0)}, r"eval_sizes=\(8, 0\)"),
    ({"eval_sizes": 8}, "eval_sizes=8"),
    ({"options": ["group"]}, "options="),
    ({"options": {1: "S5"}}, "str keys"),
])
def test_bad_configs(kw, match):
  kw = {"name": "parity", "train_sizes": (1, 8), **kw}
  with pytest.raises(ValueError, match=match):
    TaskConfig(**kw)


def test_unknown_option_lists_the_valid_ones():
  cfg = TaskConfig(name="mqar", train_sizes=(64, 64), options={"num_kv_pairs": 8})
  with pytest.raises(ValueError, match=r"\['num_kv_pairs'\].*\['vocab_size', "
                     r"'num_pairs', 'alpha'\]"):
    make_task(cfg)


def test_bad_option_value_and_small_sizes():
  with pytest.raises(ValueError, match="group='S6'"):
    make_task(TaskConfig(name="permutation", train_sizes=(1, 8),
                         options={"group": "S6"}))
  # MQAR with 8 pairs needs sizes >= 32, in training and evaluation alike.
  with pytest.raises(ValueError, match=r"train_sizes\[0\]=16"):
    make_task(TaskConfig(name="mqar", train_sizes=(16, 64)))
  with pytest.raises(ValueError, match=r"eval_sizes\[1\]=8"):
    make_task(TaskConfig(name="mqar", train_sizes=(64, 64), eval_sizes=(64, 8)))
  with pytest.raises(ValueError, match="cfg="):
    make_task({"name": "parity"})


def test_import_is_light():
  code = ("import sys, lsm.tasks, lsm.tasks.metrics; "
          "bad = [m for m in ('jax', 'flax', 'tensorflow', 'grain') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                 env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
