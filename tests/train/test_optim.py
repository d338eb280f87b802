"""Schedules, the weight-decay mask and optimiser option checks."""

import jax
import numpy as np
import pytest
from flax import nnx

from lsm.models.lm import LanguageModel, LMConfig
from lsm.train import optim


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


def test_decay_mask_skips_vectors_and_decay_parameters():
  cfg = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2,
                 pattern=("gated_delta_net", "mamba"))
  params = nnx.to_pure_dict(nnx.state(LanguageModel(cfg, rngs=nnx.Rngs(0)),
                                      nnx.Param))
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in
          jax.tree_util.tree_leaves_with_path(mask)}
  shapes = {jax.tree_util.keystr(p): np.ndim(x) for p, x in
            jax.tree_util.tree_leaves_with_path(params)}
  for name, decayed in flat.items():
    leaf = name.rsplit("'", 2)[-2]
    expected = shapes[name] >= 2 and leaf not in optim.NO_DECAY_NAMES
    assert decayed == expected, name
  # The cases the papers single out: present, and not decayed.
  assert not flat["['blocks'][0]['mixer']['A_log']"]
  assert not flat["['blocks'][1]['mixer']['a_log']"]   # 2-D, still excluded
  assert flat["['blocks'][0]['mixer']['q_proj']['kernel']"]
  assert flat["['embed']['embedding']"]


def test_adamw_leaves_masked_parameters_undecayed():
  params = {"w": np.ones((2, 2), np.float32), "a_log": np.ones((2, 2), np.float32)}
  cfg = optim.OptimConfig(lr=0.1, schedule="constant", warmup_steps=0,
                          weight_decay=0.5, clip_norm=None)
  tx, _ = optim.make_optimizer(cfg, 10)
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates["a_log"], 0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(schedule="linear"), r"optim.schedule='linear'; expected one of"),
    (dict(lr=-1.0), r"optim.lr=-1.0; expected a positive number"),
    (dict(b2=1.5), r"optim.b2=1.5; expected a number in \[0, 1\]"),
    (dict(warmup_steps=-3), r"optim.warmup_steps=-3"),
])
def test_bad_options_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.OptimConfig(**kwargs)
