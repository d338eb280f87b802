"""Schedules, the weight-decay mask and optimiser option checks."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lsm.models.lm import LanguageModel, LMConfig
from lsm.train import optim
from lsm.train import state as state_lib


def _lrs(cfg, total, steps):
  schedule = optim.make_schedule(cfg, total)
  return np.array([float(schedule(s)) for s in steps])


def test_cosine_warms_up_linearly_then_decays_to_floor():
  cfg = optim.OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10,
                          min_lr_ratio=0.1)
  lrs = _lrs(cfg, 110, [0, 5, 10, 60, 110])
  np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def test_wsd_holds_peak_then_decays_over_the_last_fraction():
  cfg = optim.OptimConfig(lr=2.0, schedule="wsd", warmup_steps=10,
                          decay_fraction=0.2, min_lr_ratio=0.0)
  lrs = _lrs(cfg, 100, [5, 10, 50, 79, 80, 90, 100])
  np.testing.assert_allclose(lrs, [1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0], atol=1e-6)


def test_constant_after_warmup():
  cfg = optim.OptimConfig(lr=3.0, schedule="constant", warmup_steps=4)
  np.testing.assert_allclose(_lrs(cfg, 100, [2, 4, 99]), [1.5, 3.0, 3.0])


def test_decay_mask_skips_vectors_and_marked_parameters():
  cfg = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2,
                 pattern=("gated_delta_net", "mamba"))
  params = nnx.to_pure_dict(nnx.eval_shape(  # shapes only: no initialisation
      lambda: nnx.state(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  mask = optim.decay_mask(params, state_lib.float32_mask(cfg))
  flat = {jax.tree_util.keystr(p): m for p, m in
          jax.tree_util.tree_leaves_with_path(mask)}
  assert flat.keys() == {jax.tree_util.keystr(p) for p, _ in
                         jax.tree_util.tree_leaves_with_path(params)}
  # The cases the papers single out: present, and not decayed.
  assert not flat["['blocks'][0]['mixer']['A_log']"]
  assert not flat["['blocks'][0]['mixer']['dt_bias']"]
  assert not flat["['blocks'][1]['mixer']['a_log']"]   # 2-D, still excluded
  assert not flat["['blocks'][1]['mixer']['d']"]
  assert not flat["['norm']['scale']"]
  assert flat["['blocks'][0]['mixer']['q_proj']['kernel']"]
  assert flat["['blocks'][1]['mixer']['in_proj']"]
  assert flat["['embed']['embedding']"]
  # Without marks (a tree from no lsm model): every matrix, no vector.
  plain = optim.decay_mask({"w": np.ones((2, 2)), "b": np.ones(2)})
  assert plain == {"w": True, "b": False}


def test_obsolete_no_decay_names_loads_only_as_the_old_default():
  """Every config.json written before the float32 mark records the old
  default list; such runs still load. Any other list is refused by name."""
  old = ["a_log", "A_log", "log_a_real", "a_imag", "log_dt", "dt_bias", "d", "D"]
  cfg = optim.OptimConfig(lr=1e-3, no_decay_names=old)
  assert cfg == optim.OptimConfig(lr=1e-3)
  assert "no_decay_names" not in {f.name for f in dataclasses.fields(cfg)}
  with pytest.raises(ValueError, match=r"optim.no_decay_names=\['w'\] is "
                     r"obsolete.*Float32Param"):
    optim.OptimConfig(no_decay_names=["w"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="linear"), r"optim.schedule='linear'; expected one of"),
    (dict(lr=-1.0), r"optim.lr=-1.0; expected a positive number"),
    (dict(b2=1.5), r"optim.b2=1.5; expected a number in \[0, 1\]"),
    (dict(warmup_steps=-3), r"optim.warmup_steps=-3"),
])
def test_bad_options_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.OptimConfig(**kwargs)
