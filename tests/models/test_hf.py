"""Hugging Face checkpoints in and out (lsm.models.hf).

The fixtures (tests/models/hf_fixtures, made by make_fixtures.py with torch and
transformers, not in CI) are tiny random Llama, Qwen2, Qwen3 and Mistral models
with transformers' own float32 logits: lsm's import must reproduce them.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.models import hf
from lsm.models.lm import LanguageModel, LMConfig

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "hf_fixtures")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _dir(family):
  return os.path.join(FIXTURES, family)


def _reference(family):
  ref = np.load(os.path.join(_dir(family), "reference.npz"))
  return ref["ids"], ref["logits"]


@nnx.jit
def _logits(model, ids):
  return model(ids)[0]


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_bit_identical(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family):
  """Each family's options (GQA, biases, q/k norm, tied and untied heads,
  llama3 and YaRN RoPE scaling, a sliding window, bf16 shards) as transformers
  computes them: logits within 1e-4."""
  model, config = hf.load(_dir(family))
  assert config["model_type"] == family
  ids, want = _reference(family)
  got = np.asarray(_logits(model, jnp.asarray(ids)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family,option", [
    ("llama", "rope_scaling"), ("qwen3", "rope_scaling"), ("mistral", "window")])
def test_the_fixtures_exercise_each_option(family, option):
  """Without the option the logits move far outside 1e-4, so the test above
  checks the option and not only the plain path."""
  cfg = hf.lm_config(hf.read_config(_dir(family)))
  attention = {**cfg.mixer_kwargs["attention"], option: None}
  plain = dataclasses.replace(cfg, mixer_kwargs={"attention": attention})
  params = hf.load_params(_dir(family), plain)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: LanguageModel(plain, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  ids, want = _reference(family)
  got = np.asarray(_logits(nnx.merge(graphdef, state), jnp.asarray(ids)))
  assert np.max(np.abs(got - want)) > 1e-2


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_imported_models_decode_the_parallel_logits(family):
  """The cache path (q/k norm, biases, scaled RoPE at the cache's positions)
  gives the parallel forward's logits."""
  model, _ = hf.load(_dir(family))
  ids = jnp.asarray(_reference(family)[0])
  want = _logits(model, ids)
  cache = model.init_cache(2, ids.shape[1])
  logits, cache = nnx.jit(lambda m, t, c: m(t, c))(model, ids[:, :4], cache)
  outs = [logits]
  step = nnx.jit(lambda m, t, c: m.step(t, c))
  for t in range(4, ids.shape[1]):
    lt, cache = step(model, ids[:, t], cache)
    outs.append(lt[:, None])
  np.testing.assert_allclose(np.concatenate(outs, 1), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_is_bit_identical(family, tmp_path):
  model, config = hf.load(_dir(family))
  out = tmp_path / family
  # Shards of about one tensor each for qwen2 (an index), one file otherwise.
  hf.save(out, model.cfg, model, base_config=config, tokenizer_dir=_dir(family),
          max_shard_bytes=20_000 if family == "qwen2" else 5 * 2**30)
  again, config2 = hf.load(out)
  assert again.cfg == model.cfg
  assert again.cfg.mixer_kwargs == model.cfg.mixer_kwargs
  _assert_bit_identical(_params(again), _params(model))
  assert config2["model_type"] == family
  assert config2["architectures"] == [hf.FAMILIES[family]]
  assert config2["bos_token_id"] == config["bos_token_id"]
  files = set(os.listdir(out))
  assert {"config.json", "tokenizer.json"} <= files
  if family == "qwen2":
    assert hf.INDEX in files and len([f for f in files if f.startswith("model-")]) > 2
  else:
    assert hf.SINGLE in files
  # A tied head is written once, as the embedding (as transformers writes it).
  from safetensors import safe_open
  names = set()
  for f in files:
    if f.endswith(".safetensors"):
      with safe_open(str(out / f), framework="numpy") as handle:
        names |= set(handle.keys())
  assert ("lm_head.weight" in names) == (not model.cfg.tie_embeddings)
  assert "model.embed_tokens.weight" in names


def test_a_model_trained_in_lsm_exports_as_its_family(tmp_path):
  """A fresh lsm model with Qwen3's options (no base config) writes a qwen3
  checkpoint that imports bit-identically with the same logits."""
  cfg = LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, mixer="attention",
                 mlp_hidden=40, tie_embeddings=True, norm_eps=1e-6,
                 mixer_kwargs={"attention": dict(n_kv_heads=2, head_dim=8,
                                                 qk_norm=True, norm_eps=1e-6,
                                                 rope_base=500.0)})
  model = LanguageModel(cfg, rngs=nnx.Rngs(3))
  hf.save(tmp_path / "m", cfg, _params(model))
  with open(tmp_path / "m" / "config.json") as f:
    config = json.load(f)
  assert (config["model_type"], config["tie_word_embeddings"],
          config["num_key_value_heads"], config["rope_theta"]) == ("qwen3", True, 2, 500.0)
  again, _ = hf.load(tmp_path / "m")
  _assert_bit_identical(_params(again), _params(model))
  ids = jnp.arange(20).reshape(2, 10) % 50
  np.testing.assert_array_equal(_logits(again, ids), _logits(model, ids))


def test_bad_checkpoints_name_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    hf.load(tmp_path)
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"model_type='gpt2'; expected one of"):
    hf.load(gpt2)
  # A missing shard, named.
  broken = tmp_path / "qwen2"
  shutil.copytree(_dir("qwen2"), broken)
  os.remove(broken / "model-00002-of-00002.safetensors")
  with pytest.raises(ValueError, match="shard model-00002-of-00002.safetensors"):
    hf.load(broken)
  # Weights that do not fit the config: the tensor and both shapes.
  wrong = tmp_path / "wrong"
  shutil.copytree(_dir("llama"), wrong)
  config = json.loads((wrong / "config.json").read_text())
  (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
  with pytest.raises(ValueError, match=r"mlp.down_proj.weight has shape \[32, 48\]; "
                                       r"expected \[32, 40\]"):
    hf.load(wrong)
  (wrong / "config.json").write_text(json.dumps(
      {**config, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}))
  with pytest.raises(ValueError, match="type 'dynamic' is not supported"):
    hf.load(wrong)
  (wrong / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    hf.load(wrong)


def test_save_never_overwrites(tmp_path):
  model, config = hf.load(_dir("mistral"))
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="is not an empty directory"):
    hf.save(out, model.cfg, model, base_config=config)
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary left behind
  # Models outside the family are refused before anything is written.
  gla = LMConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, mixer="gla")
  with pytest.raises(ValueError, match="expected attention in every layer"):
    hf.save(tmp_path / "gla", gla, {})
  assert not (tmp_path / "gla").exists()


def test_sharded_load_reads_each_device_its_slice():
  """On 4 CPU devices (fsdp=2, tensor=2): every parameter arrives with the
  trainer's sharding and equals the unsharded load."""
  script = textwrap.dedent(f"""
      import os
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + " --xla_force_host_platform_device_count=4")
      import jax, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from lsm.models import hf
      from lsm.parallel import mesh as mesh_lib, rules as rules_lib
      path = {_dir("qwen2")!r}
      cfg = hf.lm_config(hf.read_config(path))
      mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape={{"fsdp": 2, "tensor": 2}}))
      from flax import nnx
      from lsm.models.lm import LanguageModel
      _, abstract = nnx.eval_shape(
          lambda: nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
      specs = rules_lib.param_specs(abstract, rules_lib.DEFAULT_RULES)
      shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                               is_leaf=lambda x: isinstance(x, P))
      sharded = hf.load_params(path, cfg, shardings=shardings)
      full = hf.load_params(path, cfg)
      split = 0
      for (k, a), b, sh in zip(jax.tree_util.tree_leaves_with_path(sharded),
                               jax.tree.leaves(full), jax.tree.leaves(
                                   shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        assert a.sharding == sh, k
        assert np.array_equal(np.asarray(a), np.asarray(b)), k
        split += any(s.data.shape != a.shape for s in a.addressable_shards)
      print("split", split)
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(HERE)))
  assert out.returncode == 0, out.stderr[-3000:]
  # Embedding, projections and MLP kernels are split over fsdp and tensor.
  assert int(out.stdout.split("split")[-1]) >= 10


@pytest.mark.parametrize("family,changes,want", [
    ("mistral", {"window": None}, "mistral"),   # still a Mistral without a window
    ("llama", {"window": 7}, "mistral"),        # a window: Llama has none
    ("qwen2", {"window": 7}, "qwen2"),           # per layer_types
])
def test_export_keeps_the_family_where_the_model_fits_it(family, changes, want,
                                                         tmp_path):
  model, config = hf.load(_dir(family))
  attention = {**model.cfg.mixer_kwargs["attention"], **changes}
  if family == "llama":
    attention.update(qkv_bias=False, o_bias=False)
  cfg = dataclasses.replace(model.cfg, mixer_kwargs={"attention": attention})
  fresh = LanguageModel(cfg, rngs=nnx.Rngs(0))
  hf.save(tmp_path / "m", cfg, fresh, base_config=config)
  again, exported = hf.load(tmp_path / "m")
  assert exported["model_type"] == want
  assert again.cfg.mixer_kwargs["attention"]["window"] == changes["window"]
  _assert_bit_identical(_params(again), _params(fresh))
