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


@pytest.mark.parametrize("model, mixer, options", [
    ("deltaproduct:3:2", "delta_product",
     dict(n_householder=3, beta_scale=2.0, gated=False)),
    ("deltaproduct:2:1", "delta_product",
     dict(n_householder=2, beta_scale=1.0, gated=False)),
    ("kda:2", "kda", dict(beta_scale=2.0)),
    ("deltanet:2", "delta_net", dict(beta_scale=2.0)),
])
def test_model_names_reach_the_mixer(model, mixer, options):
  """A grid model name sets the mixer and its options in the state-tracking
  config, and the built layer has them (n_h Householder steps, the range)."""
  from flax import nnx
  from configs import state_tracking
  from lsm.models.lm import LanguageModel, LMConfig
  config, _ = synthetic_grid.cell(state_tracking.get_config, "permutation",
                                  model, 0, 3e-3, steps=1, batch=2, out="/x",
                                  extra="group=S4,d_model=16")
  assert config.model.mixer == mixer
  assert dict(config.model.mixer_kwargs[mixer]) == options
  layer = LanguageModel(LMConfig(**config.model.to_dict()),
                        rngs=nnx.Rngs(0)).blocks[0].mixer
  assert layer.beta_scale == options["beta_scale"]
  if mixer == "delta_product":
    assert layer.n_householder == options["n_householder"]
    assert not layer.gated


def test_rwkv7_name_takes_no_value():
  assert synthetic_grid.model_arg("rwkv7") == "mixer=rwkv7"
  with pytest.raises(ValueError, match=r"'rwkv7:2': RWKV-7 has no beta_scale"):
    synthetic_grid.model_arg("rwkv7:2")


@pytest.mark.parametrize("model", ["deltaproduct", "deltaproduct:5:2",
                                   "deltaproduct:2:x"])
def test_bad_deltaproduct_name_is_clear(model):
  with pytest.raises(ValueError, match=r"expected deltaproduct:NH:RANGE"):
    synthetic_grid.model_arg(model)
