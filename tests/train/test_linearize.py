"""Linearising a pretrained model through the trainer (lsm.train.linearize):
attention transfer trains only the new maps and lowers its loss, a LoRA
finetune starts from it and writes the merged student, resume is exact, a
stage never resumes another's checkpoints, the KL term is the teacher's, and
bad input is refused before anything is written. The teacher is the tiny
Hugging Face Llama of tests/models/hf_fixtures."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import linearize as linearize_config
from lsm.data.tokenizers import HFTokenizer
from lsm.models import distill, hf
from lsm.models.lm import LanguageModel
from lsm.train import linearize, loop, restore
from lsm.train import step as step_lib
from lsm.train.metrics import read_metrics
from tests.train import runs

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEACHER = str(ROOT / "tests" / "models" / "hf_fixtures" / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("linearize")
  return runs.write_corpus(root / "text"), str(root / "tfds")


def _config(corpus, arg, steps=8):
  c = linearize_config.get_config(f"teacher={TEACHER},local_window=8,{arg}")
  c.data.update(globs=(corpus[0],), data_dir=corpus[1], seq_len=32, batch_size=4)
  c.optim.update(warmup_steps=2, total_steps=100)  # shared by runs of any length
  if "stage=transfer" in arg:
    c.optim.lr = 0.1  # a few steps must move the maps of a random teacher
  c.train.update(num_steps=steps, log_every=1, eval_every=0, checkpoint_every=4,
                 progress=False)
  return c


@pytest.fixture(scope="module")
def transfer_run(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("transfer") / "run"
  history = loop.train(_config(corpus, "stage=transfer"), workdir)
  return workdir, history


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tokens():
  tok = HFTokenizer(os.path.join(TEACHER, "tokenizer.json"))
  ids = tok.encode(" ".join(runs.WORDS * 4))[:64]
  return jnp.asarray(ids.reshape(2, 32))


def test_transfer_freezes_the_teacher_and_lowers_its_loss(transfer_run):
  workdir, history = transfer_run
  assert sorted(history) == list(range(1, 9)) and "accuracy" not in history[1]
  student = restore.open_run(workdir).model
  trained = _flat(_params(student))
  teacher = _flat(hf.load_params(TEACHER))
  for name, x in teacher.items():  # every teacher weight bit-identical
    np.testing.assert_array_equal(trained[name], x, err_msg=name)
  new = sorted(set(trained) - set(teacher))
  assert len(new) == 2 * 5  # per layer: fq_w, fq_b, fk_w, fk_b, window_factor
  # The same student at its initialisation (the maps' init is deterministic).
  init = LanguageModel(student.cfg, rngs=nnx.Rngs(0))
  params = _params(init)
  graphdef, state = nnx.split(init)
  start = {**_flat(params), **teacher}
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
      lambda p, _: start[jax.tree_util.keystr(p)], params))
  init = nnx.merge(graphdef, state)
  tokens = _tokens()
  weights = jnp.ones(tokens.shape)
  before, per_layer = distill.attention_transfer(init, tokens, weights)
  after, _ = distill.attention_transfer(student, tokens, weights)
  assert per_layer.shape == (2,)
  assert float(after) < 0.8 * float(before), (float(before), float(after))


def test_finetune_writes_the_merged_student(corpus, transfer_run, tmp_path):
  workdir, _ = transfer_run
  config = _config(corpus, f"stage=finetune,init={workdir},lora_rank=4,"
                           "kl_weight=0.5", steps=4)
  history = loop.train(config, tmp_path / "ft")
  assert all(history[s]["aux_loss"] > 0 for s in history)  # the weighted KL
  adapted = restore.open_run(tmp_path / "ft")
  merged = restore.open_run(tmp_path / "ft" / linearize.MERGED)
  assert merged.config.linearize is None and merged.config.model.lora is None
  assert adapted.config.model.lora["rank"] == 4
  tokens = _tokens()
  np.testing.assert_allclose(merged.model(tokens)[0], adapted.model(tokens)[0],
                             rtol=0, atol=2e-5)
  # Only the adapters trained: kernels and maps are the transfer run's.
  before = _flat(_params(restore.open_run(workdir).model))
  after = _flat(_params(adapted.model))
  for name, x in before.items():
    np.testing.assert_array_equal(after[name], x, err_msg=name)
  lora_b = [x for n, x in after.items() if n.endswith("['lora_b']")]
  assert len(lora_b) == 8 and all(np.abs(x).max() > 0 for x in lora_b)
  # Extended to more steps, the run replaces its merged student.
  assert merged.step == 4
  loop.train(_config(corpus, f"stage=finetune,init={workdir},lora_rank=4,"
                             "kl_weight=0.5", steps=6), tmp_path / "ft")
  assert restore.open_run(tmp_path / "ft" / linearize.MERGED).step == 6
  assert restore.checkpoint_steps(tmp_path / "ft" / linearize.MERGED) == [6]


def test_resume_mid_stage_replays_exactly(corpus, transfer_run, tmp_path):
  full = read_metrics(transfer_run[0] / "metrics.jsonl")
  loop.train(_config(corpus, "stage=transfer", steps=4), tmp_path)
  loop.train(_config(corpus, "stage=transfer", steps=8), tmp_path)
  got = read_metrics(tmp_path / "metrics.jsonl")
  for step in range(1, 9):
    for key in ("loss", "grad_norm"):
      assert got[step][key] == full[step][key], (step, key)


def test_a_stage_never_resumes_another_stages_checkpoints(corpus, transfer_run,
                                                          tmp_path):
  """Full fine-tuning has the transfer run's parameter tree: only the
  recorded stage tells them apart."""
  workdir = tmp_path / "copy"
  shutil.copytree(transfer_run[0], workdir)
  listing = sorted(str(p) for p in workdir.rglob("*"))
  config = _config(corpus, "stage=finetune,lora_rank=0")
  with pytest.raises(ValueError, match=r"linearize.stage: checkpoint has "
                                       r"'transfer', config has 'finetune'"):
    loop.train(config, workdir)
  assert sorted(str(p) for p in workdir.rglob("*")) == listing


def test_the_kl_term_is_the_teachers(corpus):
  """lm_kl's aux term against KL(teacher || student) computed from the
  imported teacher model itself, with trained (non-zero) adapters."""
  config = _config(corpus, "stage=finetune,student=liger,lora_rank=2,kl_weight=1")
  run = loop.RunConfig.from_config(config)
  optimizer, _, objective = loop.make_optimizer(run)
  from lsm.parallel.mesh import MeshConfig, make_mesh
  from lsm.train import state as state_lib
  setup = state_lib.build(run.model, optimizer, make_mesh(
      MeshConfig(), jax.devices()[:1]), None)
  params = _params(LanguageModel(run.model, rngs=nnx.Rngs(0)))
  teacher_params = _flat(hf.load_params(TEACHER))
  keys = iter(jax.random.split(jax.random.key(3), 64))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: teacher_params.get(jax.tree_util.keystr(p), x)
      if str(getattr(p[-1], "key", "")) != "lora_b"
      else 0.2 * jax.random.normal(next(keys), x.shape), params)
  tokens = _tokens()
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((2, 31), bool)}
  _, (_, count, _, aux_sum) = step_lib._sums(setup, params, batch, jnp.float32,
                                             objective)
  teacher, _ = hf.load(TEACHER)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: LanguageModel(run.model, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  student = nnx.merge(graphdef, state)
  log_t = jax.nn.log_softmax(teacher(batch["inputs"])[0], -1)
  log_s = jax.nn.log_softmax(student(batch["inputs"])[0], -1)
  kl = jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1))
  assert float(kl) > 1e-2
  np.testing.assert_allclose(float(aux_sum / count), float(kl), rtol=1e-5)


def test_liger_has_nothing_to_transfer(corpus, tmp_path):
  with pytest.raises(ValueError, match="trains no parameter"):
    loop.train(_config(corpus, "stage=transfer,student=liger"), tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_bad_teachers_are_refused_before_anything_is_written(corpus, tmp_path):
  # A missing shard, named.
  broken = tmp_path / "qwen2"
  shutil.copytree(ROOT / "tests" / "models" / "hf_fixtures" / "qwen2", broken)
  os.remove(broken / "model-00002-of-00002.safetensors")
  c = _config(corpus, "stage=transfer")
  c.linearize.teacher = str(broken)
  with pytest.raises(ValueError, match="shard model-00002-of-00002.safetensors"):
    loop.train(c, tmp_path / "w1")
  # A tokenizer with more ids than the teacher's vocabulary (272).
  import tokenizers as hf_tokenizers
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(
      {f"t{i}": i for i in range(300)}, unk_token="t0"))
  tok.add_special_tokens(["<eos>"])
  tok.save(str(tmp_path / "big.json"))
  c = _config(corpus, "stage=transfer")
  c.data.tokenizer_path = str(tmp_path / "big.json")
  with pytest.raises(ValueError, match=r"model.vocab_size=272: smaller than the "
                                       r"tokenizer's vocabulary \(301\)"):
    loop.train(c, tmp_path / "w2")
  assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def test_lsm_linearize_names_another_architecture_and_exits_2(tmp_path):
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  out = subprocess.run(
      [str(pathlib.Path(sys.executable).parent / "lsm-linearize"),
       f"--config={ROOT}/configs/linearize.py:teacher={gpt2}",
       f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("lsm-linearize:")]
  assert len(lines) == 1 and "model_type='gpt2'; expected one of" in lines[0]
  assert not (tmp_path / "run").exists()


def test_lsm_eval_puts_the_teacher_beside_the_student(transfer_run, tmp_path):
  """Same rows for both; decode cache growth per token of context: 0 for the
  all-linear student, 2 layers x (k, v) x 2 kv heads x 8 dims x 4 bytes =
  256 for the attention teacher."""
  workdir, _ = transfer_run
  out = subprocess.run(
      [str(pathlib.Path(sys.executable).parent / "lsm-eval"),
       f"--workdir={workdir}", "--teacher=run", "--lengths=32,64",
       "--eval_tokens=256", "--decode_tokens=4", f"--out={tmp_path}",
       "--progress=False"],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "eval.json").read_text())
  student, teacher = report, report["teacher"]
  assert teacher["model"] == TEACHER
  assert student["decode"]["cache_bytes_per_token"] == 0
  assert teacher["decode"]["cache_bytes_per_token"] == 256
  assert student["decode"]["decode_tokens_per_s"] > 0
  for length in ("32", "64"):
    s, t = student["results"][length], teacher["results"][length]
    assert s["tokens"] == t["tokens"] > 0
    assert np.isfinite(s["loss"]) and np.isfinite(t["loss"]) and s["loss"] != t["loss"]
  assert "teacher loss" in out.stdout and "teacher decoding: 256" in out.stdout


def test_settings_diff_ignores_fields_at_their_defaults_and_unused_mixers():
  """A checkpoint written before LMConfig.lora existed, or before the configs
  carried options for the linearised mixers, still resumes; a real model
  difference (and a stage) is still named."""
  from lsm.train.checkpoint import settings_diff
  old = {"model": {"mixer": "gla", "d_model": 32,
                   "mixer_kwargs": {"gla": {"n_heads": 2}}}}
  new = {"model": {"mixer": "gla", "d_model": 32, "lora": None,
                   "mixer_kwargs": {"gla": {"n_heads": 2},
                                    "lolcats": {"local_window": 64}}}}
  assert settings_diff(old, new) == []
  changed = {"model": {**new["model"], "mixer_kwargs": {"gla": {"n_heads": 4}}}}
  assert settings_diff(old, changed) == [
      "model.mixer_kwargs.gla.n_heads: checkpoint has 2, config has 4"]


def test_gdn_attention_transfer_trains_only_its_gates(corpus, tmp_path):
  """The mmMamba-style student: its transfer trains the beta and decay
  projections and parameters, nothing of the teacher."""
  c = _config(corpus, "stage=transfer,student=gdn_attention", steps=2)
  run = loop.RunConfig.from_config(c)
  mask = linearize.trainable_mask(run.linearize, run.model,
                                  linearize.teacher_config(TEACHER))
  names = sorted(k for k, t in _flat(mask).items() if t)
  assert names == sorted(f"['blocks'][{i}]['mixer']{p}" for i in range(2) for p in (
      "['A_log']", "['dt_bias']", "['a_proj']['kernel']", "['b_proj']['kernel']"))
  history = loop.train(c, tmp_path)
  assert np.isfinite(history[2]["loss"]) and history[2]["loss"] > 0
