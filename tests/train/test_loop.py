"""The training loop in-process on one CPU device: it learns, resumes exactly,
survives a damaged checkpoint, refuses a mismatched model, stops on divergence."""

import dataclasses
import json
import logging
import pathlib
import shutil

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


def _listing(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b""
          for p in sorted(root.rglob("*"))}


def test_mismatched_model_is_refused_until_start_fresh(corpus, tmp_path):
  _train(corpus, tmp_path, steps=4)
  before = _listing(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointMismatch,
                     match=r"model.d_model: checkpoint has 32, config has 48"):
    _train(corpus, tmp_path, steps=4, model={"d_model": 48})
  assert _listing(tmp_path) == before   # config.json included
  history = _train(corpus, tmp_path, steps=4, model={"d_model": 48},
                   train={"start_fresh": True})
  assert sorted(history) == [1, 2, 3, 4]
  archived = list((tmp_path / "archive").glob("*/checkpoints/4"))
  assert len(archived) == 1


def test_another_optimiser_chain_is_a_mismatch_not_damage(corpus, tmp_path):
  """Resuming without gradient clipping changes the optimiser state's tree:
  the run stops naming the field and the state paths, and nothing on disk
  changes (no step is quarantined, config.json is not rewritten)."""
  _train(corpus, tmp_path, steps=8)
  before = _listing(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointMismatch) as info:
    _train(corpus, tmp_path, steps=12, optim={"clip_norm": 0.0})
  lines = info.value.lines
  assert "(step 8)" in lines[0]
  assert any(ln.strip().startswith("optim.clip_norm: checkpoint has 1.0, config "
                                   "has 0.0") for ln in lines), lines
  assert any(ln.strip().startswith("state.opt_state.") and "not in the "
             "checkpoint" in ln for ln in lines), lines
  assert _listing(tmp_path) == before
  assert not (tmp_path / "damaged_checkpoints").exists()
  # The meta holds the whole resolved config and the process count.
  meta = json.loads((tmp_path / "checkpoints" / "8" / "meta" /
                     "metadata").read_text())
  config = json.loads((tmp_path / "config.json").read_text())
  assert meta["config"] == config and meta["process_count"] == 1
  assert config["data"]["shards"] == 4                 # gcd(batch_size=4, 8)
  assert config["train"]["compute_dtype"] == "float32"   # "auto" on CPU


def test_every_step_damaged_stops_instead_of_starting_over(corpus, tmp_path):
  _train(corpus, tmp_path, steps=8)
  for step in ("4", "8"):
    _damage(tmp_path / "checkpoints" / step, "truncate")
  before = _listing(tmp_path)
  with pytest.raises(ckpt_lib.AllCheckpointsDamaged,
                     match=r"every checkpoint .* is damaged: step 8 .*; step 4 "):
    _train(corpus, tmp_path, steps=12)
  assert _listing(tmp_path) == before
  history = _train(corpus, tmp_path, steps=2, train={"start_fresh": True})
  assert sorted(history) == [1, 2]


def test_checkpoints_from_before_the_recorded_config_resume(corpus, tmp_path):
  """A checkpoint written before the config was recorded (meta = the model
  only, a data file per process, one record shard per process) is compared on
  the model and resumes exactly."""
  # A run from before: one record shard per process, and steps 4 and 8
  # rewritten the way the trainer wrote them then.
  old = tmp_path
  first = _train(corpus, old, steps=8, data={"shards": 1})
  for step in ("4", "8"):
    d = old / "checkpoints" / step
    meta = json.loads((d / "meta" / "metadata").read_text())
    (d / "meta" / "metadata").write_text(json.dumps({"model": meta["model"]}))
    position = json.loads((d / "data_position" / "metadata").read_text())
    shutil.rmtree(d / "data_position")
    (d / "data").mkdir()
    (d / "data" / "process_0-of-1.json").write_text(
        json.dumps(position["shards"][0]))
  shutil.rmtree(old / "checkpoints" / "8")
  with pytest.raises(ckpt_lib.CheckpointMismatch, match=r"model.n_heads"):
    _train(corpus, old, steps=8, model={"n_heads": 4})
  second = _train(corpus, old, steps=8)
  assert sorted(second) == [5, 6, 7, 8]
  for s in (5, 6, 7, 8):
    assert second[s]["loss"] == first[s]["loss"]
  assert json.loads((old / "config.json").read_text())["data"]["shards"] == 1


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
    ("model", {"vocab_size": 100}, r"model.vocab_size=100: smaller than the "
     r"tokenizer's vocabulary \(259\)"),
])
def test_bad_options_fail_before_training(corpus, tmp_path, section, values,
                                          match):
  with pytest.raises(ValueError, match=match):
    _train(corpus, tmp_path, **{section: values})
  # Refused before anything is written.
  assert not (tmp_path / "checkpoints").exists()
  assert not (tmp_path / "config.json").exists()


def test_a_resumed_run_keeps_the_data_settings_it_recorded(corpus, tmp_path):
  """Left at their defaults, data.shards and data.row_shuffle_window take the
  values the resumed run recorded (else the defaults of today); set to other
  values, the checkpoint does not fit (see the clip_norm test)."""
  glob, data_dir = corpus
  run = loop.RunConfig.from_config(runs.tiny_config(glob, data_dir))
  assert run.data.shards is None and run.data.row_shuffle_window is None
  fresh = loop.resolve(run, tmp_path)
  assert (fresh.data.shards, fresh.data.row_shuffle_window) == (4, 1024)
  recorded = {"config": {"data": {"shards": 2, "row_shuffle_window": 0}}}
  kept = loop.resolve(run, tmp_path, recorded)
  assert (kept.data.shards, kept.data.row_shuffle_window) == (2, 0)
  # Before shards were fixed: one per process of the recorded run.
  old = loop.resolve(run, tmp_path, {"model": {}, "process_count": 1})
  assert old.data.shards == 1
  lines = ckpt_lib.settings_diff(
      {"config": loop._jsonable(kept)},
      {"config": loop._jsonable(dataclasses.replace(
          kept, data=dataclasses.replace(kept.data, row_shuffle_window=8)))})
  assert lines == ["data.row_shuffle_window: checkpoint has 0, config has 8 "
                   "(the saved data position is for the recorded pipeline)"]
