"""LoRA adapters: a fresh adapter changes nothing, a trained one merged into
the kernels gives the adapted model's logits, and bad options are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers import lora as lora_lib
from lsm.models.lm import LanguageModel, LMConfig

LORA = {"rank": 2, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _cfg(mixer="lolcats", **kw):
  return LMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, mixer=mixer,
                  mixer_kwargs={mixer: dict(n_kv_heads=2, qkv_bias=True)}, **kw)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with(cfg, params):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _strip(params):
  if not isinstance(params, dict):
    return params
  return {k: _strip(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}


def test_fresh_adapters_change_nothing_and_merged_equals_applied():
  base_cfg, cfg = _cfg(), _cfg(lora=LORA)
  adapted = LanguageModel(cfg, rngs=nnx.Rngs(0))
  params = _params(adapted)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 40)
  base = _with(base_cfg, _strip(params))
  np.testing.assert_array_equal(adapted(tokens)[0], base(tokens)[0])
  # "Train" the adapters: random B, so every adapter moves its projection.
  keys = iter(jax.random.split(jax.random.key(1), 64))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.3 * jax.random.normal(next(keys), x.shape)
                    if str(getattr(p[-1], "key", "")) == "lora_b" else x), params)
  applied = _with(cfg, params)(tokens)[0]
  merged = _with(base_cfg, lora_lib.merge(params, cfg.lora))(tokens)[0]
  assert float(jnp.max(jnp.abs(applied - base(tokens)[0]))) > 1e-2
  np.testing.assert_allclose(merged, applied, rtol=0, atol=2e-5)
  assert jax.tree.structure(lora_lib.merge(params, cfg.lora)) == jax.tree.structure(
      _strip(params))


@pytest.mark.parametrize("options,match", [
    ({"rank": 0}, r"lora.rank=0"),
    ({"rank": 2, "alpha": -1}, r"lora.alpha=-1"),
    ({"rank": 2, "targets": []}, r"lora.targets=\(\)"),
    ({"rank": 2, "scale": 1}, r"unknown options \['scale'\]"),
])
def test_bad_options_are_named(options, match):
  with pytest.raises(ValueError, match=match):
    _cfg(lora=options)


def test_a_target_that_matches_nothing_is_refused():
  with pytest.raises(ValueError, match=r"lora.targets \['qkv'\] match no linear"):
    LanguageModel(_cfg(lora={"rank": 2, "targets": ["q_proj", "qkv"]}),
                  rngs=nnx.Rngs(0))
