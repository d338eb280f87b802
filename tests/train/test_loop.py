"""The training loop in-process on one CPU device: it learns, resumes exactly,
survives a damaged checkpoint, refuses a mismatched model, stops on divergence."""

import logging
import pathlib

import jax
import pytest

from lsm.train import checkpoint as ckpt_lib
from lsm.train import loop
from lsm.train.metrics import read_metrics
from tests.train import runs

DEVICE = jax.devices()[:1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return runs.write_corpus(root / "text"), str(root / "tfds")


def _train(corpus, workdir, **kwargs):
  glob, data_dir = corpus
  return loop.train(runs.tiny_config(glob, data_dir, **kwargs), workdir,
                    devices=DEVICE)


def test_training_learns_and_writes_its_outputs(corpus, tmp_path):
  history = _train(corpus, tmp_path, steps=60,
                   train={"eval_every": 30, "log_every": 10})
  first, last = history[10]["loss"], history[60]["loss"]
  assert last < 0.5 * first, (first, last)
  assert history[60]["eval_loss"] < 0.5 * first
  assert history[60]["tokens_per_s"] > 0 and history[60]["step_time_s"] > 0
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert sorted(records) == [10, 20, 30, 40, 50, 60]
  assert records[60]["loss"] == pytest.approx(last)
  assert "eval_accuracy" in records[30]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "config.json").exists()
  assert ckpt_lib.Checkpointer(tmp_path, every=4, keep=3).steps()[-1] == 60


def _damage(step_dir: pathlib.Path, how: str):
  files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
  if how == "truncate":
    big = files[-1]
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  else:
    for p in files:
      if "manifest" in p.name or p.name == "_METADATA":
        p.unlink()


@pytest.mark.parametrize("how", ["truncate", "missing"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(corpus, tmp_path, how,
                                                          caplog):
  first = _train(corpus, tmp_path, steps=8)
  _damage(tmp_path / "checkpoints" / "8", how)
  with caplog.at_level(logging.WARNING, logger="lsm"):
    second = _train(corpus, tmp_path, steps=10)
  assert "checkpoint at step 8 is damaged" in caplog.text
  # Resumed from step 4 and replayed steps 5..8 exactly.
  assert sorted(second) == [5, 6, 7, 8, 9, 10]
  for s in (5, 6, 7, 8):
    assert second[s]["loss"] == first[s]["loss"]
  assert (tmp_path / "damaged_checkpoints" / "8" / "state").is_dir()
  steps = ckpt_lib.Checkpointer(tmp_path, every=4, keep=3).steps()
  assert steps == [4, 8, 10]


def test_mismatched_model_is_refused_until_start_fresh(corpus, tmp_path):
  _train(corpus, tmp_path, steps=4)
  with pytest.raises(ckpt_lib.ConfigMismatchError,
                     match=r"model.d_model: checkpoint has 32, config has 48"):
    _train(corpus, tmp_path, steps=4, model={"d_model": 48})
  history = _train(corpus, tmp_path, steps=4, model={"d_model": 48},
                   train={"start_fresh": True})
  assert sorted(history) == [1, 2, 3, 4]
  archived = list((tmp_path / "archive").glob("*/checkpoints/4"))
  assert len(archived) == 1


def test_divergence_stops_the_run_and_keeps_checkpoints(corpus, tmp_path):
  with pytest.raises(loop.TrainingDiverged, match=r"non-finite in the last 3 "):
    _train(corpus, tmp_path, steps=40,
           optim={"lr": 1e30, "warmup_steps": 0, "clip_norm": 0.0},
           train={"max_bad_steps": 3, "checkpoint_every": 1})
  steps = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3).steps()
  assert steps and steps[-1] < 40
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert records[max(records)]["nonfinite"] == 1


@pytest.mark.parametrize("section, values, match", [
    ("train", {"grad_accum": 3}, r"data.batch_size=4 must split into "
     r"train.grad_accum=3"),
    ("train", {"compute_dtype": "float16"}, r"train.compute_dtype='float16'"),
    ("mesh", {"shape": {"data": 3}}, r"needs 3 devices; 1 are available"),
    ("model", {"vocab_size": 100}, r"model.vocab_size=100 is smaller than the "
     r"tokenizer's vocabulary \(259\)"),
])
def test_bad_options_fail_before_training(corpus, tmp_path, section, values,
                                          match):
  with pytest.raises(ValueError, match=match):
    _train(corpus, tmp_path, **{section: values})
  assert not (tmp_path / "checkpoints").exists()
