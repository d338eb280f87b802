"""The grid runner reads a finished cell back instead of retraining it, and
refuses a directory that holds a run of another config (loop.train would
otherwise resume it under the new one)."""

import pytest

from configs import recall
from experiments import synthetic_grid
from lsm.train import loop

# A seconds-long MQAR cell: one attention layer on 16-token rows.
EXTRA = "n_layers=1,d_model=16,size=16,num_pairs=2,vocab=32"
CELL = dict(steps=6, batch=4, extra=EXTRA)


def _grid(out, **kw):
  return synthetic_grid.run_grid(recall.get_config, ["mqar"], ["attention"],
                                 [0], [3e-3], out=out, **(CELL | kw))


def test_finished_cells_are_read_back_not_retrained(tmp_path, monkeypatch):
  runs, summary = _grid(tmp_path)
  assert {r["size"] for r in runs} == {16, 32, 64}

  def no_training(*args, **kwargs):
    raise AssertionError("a finished cell was trained again")

  monkeypatch.setattr(loop, "train", no_training)
  runs_again, summary_again = _grid(tmp_path)
  assert runs_again == runs
  assert summary_again[0]["by_size"] == summary[0]["by_size"]


def test_another_config_in_the_cell_directory_raises(tmp_path):
  _grid(tmp_path)
  # The directory name has task, model, seed and lr, not the step count.
  with pytest.raises(ValueError, match=r"train\.num_steps=6 \(this grid: 8\)"):
    _grid(tmp_path, steps=8)


def test_unfinished_cell_has_no_results(tmp_path):
  config, workdir = synthetic_grid.cell(recall.get_config, "mqar", "attention",
                                        0, 3e-3, out=tmp_path, **CELL)
  assert synthetic_grid.final_results(config, workdir) is None
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"step": 6, "loss": 1.0}\n')
  assert synthetic_grid.final_results(config, workdir) is None
