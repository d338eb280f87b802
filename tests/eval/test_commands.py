"""lsm-eval, lsm-generate and lsm-plot end to end, as a user runs them: real
console scripts in subprocesses on smoke runs trained by lsm-train in a
temporary directory; their numbers are checked against computations made here,
independently, from the checkpoint and the data pipeline."""

import json
import math
import pathlib
import subprocess
import sys
import tempfile

import jax
import ml_collections
import numpy as np
import pytest

from lsm.data.pipeline import DataConfig, make_dataset
from lsm.data.tokenizers import ByteTokenizer
from lsm.models.decoding import generate
from lsm.train import loop
from lsm.train.metrics import read_metrics
from tests.train import runs

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def cmd(name: str, *args: str, timeout: int = 240):
  out = subprocess.run([str(BIN / name), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout,
                       env={"JAX_PLATFORMS": "cpu", "PATH": str(BIN) + ":/usr/bin:/bin",
                            # Caches (matplotlib, HF) go to a scratch home.
                            "HOME": tempfile.gettempdir(), "PYTHONPATH": str(ROOT)})
  return out


def train(workdir, corpus, data_dir, mixer: str, steps: int, *extra: str):
  out = cmd("lsm-train", f"--config={ROOT}/configs/lm.py:mixer={mixer},smoke=True",
            f"--workdir={workdir}", "--config.model.d_model=32",
            "--config.model.n_layers=1", f"--config.data.globs=('{corpus}',)",
            f"--config.data.data_dir={data_dir}", "--config.data.seq_len=32",
            "--config.data.batch_size=4", "--config.optim.warmup_steps=2",
            f"--config.train.num_steps={steps}", "--config.train.log_every=5",
            f"--config.train.eval_every={steps // 2}",
            f"--config.train.checkpoint_every={steps}",
            "--config.train.progress=False", *extra)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  corpus = runs.write_corpus(root / "text")
  gla = train(root / "gla", corpus, root / "tfds", "gla", 30, "--sample_tokens=40")
  train(root / "attn", corpus, root / "tfds", "attention", 10)
  return {"root": root, "gla": root / "gla", "attn": root / "attn",
          "train_stdout": gla.stdout}


def _model(workdir):
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  config.mesh.shape = {"data": 1}
  return loop.load_model(config, workdir, devices=jax.devices()[:1])


def _document_positions(segment_ids):
  """Each input's position in its document piece: 0 where a segment starts."""
  out = np.zeros_like(segment_ids)
  for r, row in enumerate(segment_ids):
    for j in range(1, len(row)):
      out[r, j] = 0 if row[j] != row[j - 1] else out[r, j - 1] + 1
  return out


def _nll_by_position(model, batches):
  """Independent: numpy log-softmax of the model's logits, per target, summed
  by position in the document (the model restarts at each one)."""
  nll, count = 0.0, 0.0
  for b in batches:
    # The smoke runs train with data.reset_at_boundaries (the default): each
    # packed document on its own.
    logits = np.asarray(model(b["inputs"], segment_ids=b["segment_ids"],
                              positions=b["positions"])[0], np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
    w = b["mask"].astype(np.float64)
    where = _document_positions(b["segment_ids"]).ravel()
    length = w.shape[1]
    nll = nll + np.bincount(where, (-picked * w).ravel(), minlength=length)
    count = count + np.bincount(where, w.ravel(), minlength=length)
  return nll, count


def test_train_ends_with_a_summary_and_a_sample(smoke):
  out = smoke["train_stdout"]
  gla = smoke["gla"]
  metrics = read_metrics(gla / "metrics.jsonl")
  assert f"step 30: train loss {metrics[30]['loss']:.4f}" in out
  assert f"eval loss {metrics[30]['eval_loss']:.4f}" in out
  for what in ("checkpoints", "metrics.jsonl", "tensorboard"):
    assert str(gla / what) in out
  for tool in ("lsm-eval", "lsm-generate", "lsm-plot"):
    assert f"{BIN / tool} " in out
  assert "sample (40 tokens" in out


def test_eval_matches_an_independent_loss(smoke):
  gla, out_dir = smoke["gla"], smoke["root"] / "gla_eval"
  out = cmd("lsm-eval", f"--workdir={gla}", "--lengths=32,64", "--bucket=8",
            "--eval_tokens=256", f"--out={out_dir}", "--progress=False")
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((out_dir / "eval.json").read_text())
  assert report["step"] == 30 and report["kind"] == "lm" and report["by_document"]
  _, model = _model(gla)
  saved = json.loads((gla / "config.json").read_text())["data"]
  for length in (32, 64):
    r = report["results"][str(length)]
    # The same batches: the held-out split, rows of `length` tokens, in order.
    cfg = DataConfig(**{**saved, "seq_len": length, "batch_size": r["batch_rows"],
                        "prefetch_batches": 0, "num_threads": 0,
                        "shards": None, "row_shuffle_window": 0})
    batches = [b for _, b in zip(range(r["batches"]), make_dataset(cfg, cfg.eval_split))]
    nll, count = _nll_by_position(model, batches)
    np.testing.assert_allclose(r["loss"], nll.sum() / count.sum(), rtol=1e-5)
    assert r["tokens"] == count.sum()
    np.testing.assert_allclose(r["perplexity"], math.exp(r["loss"]), rtol=1e-9)
    starts = [b["start"] for b in r["buckets"]]
    assert starts == list(range(0, length, 8))
    for b in r["buckets"]:
      np.testing.assert_allclose(
          b["loss"], nll[b["start"]:b["end"]].sum() / count[b["start"]:b["end"]].sum(),
          rtol=1e-5)
    # Buckets average back (token-weighted) to the overall loss.
    weighted = sum(b["loss"] * b["tokens"] for b in r["buckets"]) / sum(
        b["tokens"] for b in r["buckets"])
    np.testing.assert_allclose(weighted, r["loss"], rtol=1e-9)
    assert f"length {length}: loss {r['loss']:.4f}" in out.stdout
  csv_rows = (out_dir / "eval.csv").read_text().splitlines()
  assert csv_rows[0] == "length,start,end,tokens,loss,perplexity"
  assert len(csv_rows) == 1 + 2 + 32 // 8 + 64 // 8
  assert _colours(out_dir / "eval.png") == {"C0", "C1"}


def test_generate_greedy_equals_generate(smoke):
  gla = smoke["gla"]
  prompt = "one two three"
  out = cmd("lsm-generate", f"--workdir={gla}", f"--prompt={prompt}",
            "--temperature=0", "--max_new_tokens=24")
  assert out.returncode == 0, out.stderr[-3000:]
  _, model = _model(gla)
  tok = ByteTokenizer()
  ids = np.concatenate([[tok.bos_id], tok.encode(prompt)])[None]
  new = np.asarray(generate(model, ids, max_new_tokens=24))[0, ids.shape[1]:]
  if tok.eos_id in new:
    new = new[:list(new).index(tok.eos_id)]
  assert out.stdout == prompt + tok.decode(new) + "\n"
  # A prompts file: one batch per prompt length, same greedy text per prompt.
  prompts = smoke["root"] / "prompts.txt"
  prompts.write_text(f"{prompt}\nfive six\n")
  many = cmd("lsm-generate", f"--workdir={gla}", f"--prompts_file={prompts}",
             "--temperature=0", "--max_new_tokens=24", "--format=jsonl")
  assert many.returncode == 0, many.stderr[-3000:]
  lines = [json.loads(x) for x in many.stdout.splitlines()]
  assert [x["prompt"] for x in lines] == [prompt, "five six"]
  assert prompt + lines[0]["completion"] + "\n" == out.stdout


# Matplotlib's default cycle: one colour per run (or length).
CYCLE = {"C0": (0x1f, 0x77, 0xb4), "C1": (0xff, 0x7f, 0x0e), "C2": (0x2c, 0xa0, 0x2c)}


def _colours(png) -> set[str]:
  import matplotlib.image
  img = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
  return {name for name, rgb in CYCLE.items()
          if (np.abs(img - np.array(rgb)).max(-1) <= 2).sum() > 20}


def test_plot_draws_one_line_per_run(smoke):
  png = smoke["root"] / "loss.png"
  out = cmd("lsm-plot", str(smoke["gla"]), str(smoke["attn"]), "--metric=loss",
            f"--out={png}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert _colours(png) == {"C0", "C1"}
  lines = out.stdout.splitlines()
  assert lines[0].startswith("gla: 6 points, 2 eval points")
  assert lines[1].startswith("attn: 2 points, 2 eval points")
  one = cmd("lsm-plot", str(smoke["gla"]), f"--out={smoke['root'] / 'one.png'}")
  assert one.returncode == 0 and _colours(smoke["root"] / "one.png") == {"C0"}


def test_task_run_accuracy_at_sizes(tmp_path):
  """A parity run: lsm-eval at the trainer's eval sizes reproduces the
  trainer's own end-of-run evaluation on the same examples."""
  workdir = tmp_path / "parity"
  out = cmd("lsm-train", f"--config={ROOT}/configs/state_tracking.py:smoke=True,"
            "d_model=16,n_heads=2", f"--workdir={workdir}",
            "--config.train.progress=False", "--config.train.num_steps=10",
            "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
            "--config.task.eval_sizes=(39, 63)")
  assert out.returncode == 0, out.stderr[-3000:]
  metrics = read_metrics(workdir / "metrics.jsonl")[10]
  config = json.loads((workdir / "config.json").read_text())
  examples = config["train"]["eval_steps"] * config["data"]["batch_size"]
  ev = cmd("lsm-eval", f"--workdir={workdir}", f"--examples={examples}",
           f"--out={tmp_path / 'ev'}", "--progress=False")
  assert ev.returncode == 0, ev.stderr[-3000:]
  results = json.loads((tmp_path / "ev" / "eval.json").read_text())["results"]
  assert sorted(results) == ["39", "63"]
  for size, r in results.items():
    assert r["examples"] == examples
    for key in ("accuracy", "sequence_accuracy", "scaled_accuracy", "loss"):
      np.testing.assert_allclose(r[key], metrics[f"eval_{size}_{key}"], rtol=1e-5,
                                 atol=1e-6)
    # Parity has two answers: chance 1/2.
    np.testing.assert_allclose(r["scaled_accuracy"], 2 * r["accuracy"] - 1,
                               atol=1e-9)


@pytest.mark.parametrize("tool, args, message", [
    ("lsm-eval", ["--workdir={root}/missing"],
     "--workdir={root}/missing: no such directory"),
    ("lsm-eval", ["--workdir={gla}", "--step=7"],
     "--step=7: no checkpoint at that step; expected one of [30]"),
    ("lsm-eval", ["--workdir={gla}", "--lengths=64,abc"],
     "--lengths=64,abc: expected comma-separated positive ints"),
    ("lsm-eval", ["--workdir={gla}", "--data=hdf5:x"],
     "--data=hdf5:x: expected run, text:GLOB or tfds:NAME"),
    ("lsm-generate", ["--workdir={gla}"],
     "--prompt / --prompts_file: expected exactly one of them"),
    ("lsm-generate", ["--workdir={gla}", "--prompt=a", "--top_k=0"],
     "--top_k=0: expected an int in [1, 320]"),
    ("lsm-generate", ["--workdir={root}/text", "--prompt=a"],
     "has no config.json"),
    ("lsm-plot", ["{gla}", "--metric=lss"], "--metric=lss: not in"),
    ("lsm-plot", [], "no runs given"),
])
def test_commands_answer_bad_input_in_one_line(smoke, tool, args, message):
  fill = lambda s: s.format(root=smoke["root"], gla=smoke["gla"])  # noqa: E731
  before = sorted(p.relative_to(smoke["gla"]) for p in smoke["gla"].rglob("*"))
  out = cmd(tool, *map(fill, args), timeout=120)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert out.stderr == f"{tool}: error: " + out.stderr.split(": error: ", 1)[1]
  assert out.stderr.count("\n") == 1 and fill(message) in out.stderr, out.stderr
  assert "Traceback" not in out.stderr
  assert sorted(p.relative_to(smoke["gla"]) for p in smoke["gla"].rglob("*")) == before


def _logp_rows(model, rows):
  """Independent: float64 log-softmax of the model's logits for each token
  row (one forward pass over rows zero-padded on the right to 64: causal, so
  the padding never reaches the real positions)."""
  batch = np.zeros((len(rows), 64), np.int32)
  for i, r in enumerate(rows):
    batch[i, :len(r)] = r
  logits = np.asarray(jax.jit(lambda x: model(x)[0])(batch), np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _logliks(model, pairs) -> list[float]:
  """log P(continuation | BOS + context) for each (context, continuation)."""
  tok = ByteTokenizer()
  rows = [np.concatenate([[tok.bos_id], tok.encode(c), tok.encode(x)])
          for c, x in pairs]
  logp = _logp_rows(model, rows)
  out = []
  for i, ((context, _), ids) in enumerate(zip(pairs, rows)):
    pos = np.arange(len(tok.encode(context)), len(ids) - 1)
    out.append(float(logp[i, pos, ids[pos + 1]].sum()))
  return out


def test_scorer_loglikelihoods(smoke):
  """The adapter's three request types, without lm_eval."""
  from lsm.eval.harness import Scorer
  from lsm.train import restore
  run = restore.open_run(smoke["gla"])
  _, model = _model(smoke["gla"])
  scorer = Scorer(run, batch_size=3)
  pairs = [("one two", " three"), ("", "four five"), ("six seven ", "eight"),
           ("zero one two three four five", " six")]
  got = scorer.loglikelihood(pairs)
  # Trailing context spaces move to the continuation (same bytes scored).
  want = _logliks(model, [("one two", " three"), ("", "four five"),
                          ("six seven", " eight"),
                          ("zero one two three four five", " six")])
  np.testing.assert_allclose([g[0] for g in got], want, rtol=1e-5)
  greedy = scorer.generate_until([("one two", {"until": ["\n"], "max_gen_toks": 6})])[0]
  assert scorer.loglikelihood([("one two", greedy)])[0][1] is True
  text = "three four five six seven"
  np.testing.assert_allclose(scorer.loglikelihood_rolling([text])[0],
                             _logliks(model, [("", text)])[0], rtol=1e-5)
  # One-token windows: every token is still scored exactly once, each predicted
  # from its predecessor alone.
  tiny = Scorer(run, max_length=1)
  ids = np.concatenate([[ByteTokenizer().bos_id], ByteTokenizer().encode(text)])
  logp = _logp_rows(model, [[a] for a in ids[:-1]])
  pairs_of_bytes = sum(logp[i, 0, ids[i + 1]] for i in range(len(ids) - 1))
  np.testing.assert_allclose(tiny.loglikelihood_rolling([text])[0], pairs_of_bytes,
                             rtol=1e-5)


TASK_YAML = """\
task: lsm_counting
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_harness_local_task(smoke):
  pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install "
                      "-e '.[eval]'): the harness adapter cannot be run")
  root = smoke["root"] / "harness"
  (root / "tasks").mkdir(parents=True)
  words = runs.WORDS
  docs = []
  for i in range(8):
    q = " ".join(words[(i + j) % 10] for j in range(4))
    choices = [words[(i + 4) % 10], words[(i + 7) % 10], "seventy"]
    docs.append({"question": q, "choices": choices, "answer": i % 3})
  (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (root / "tasks" / "counting.yaml").write_text(
      TASK_YAML.format(data=root / "docs.jsonl"))
  out = subprocess.run(
      [str(BIN / "lsm-eval"), f"--workdir={smoke['gla']}", "--lengths=32",
       "--eval_tokens=64", "--harness_tasks=lsm_counting",
       f"--harness_include={root / 'tasks'}", f"--out={root / 'out'}",
       # The run as its own teacher: the side-by-side path must give the
       # same numbers for the same model.
       f"--teacher={smoke['gla']}", "--decode_tokens=0",
       "--progress=False"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={"JAX_PLATFORMS": "cpu", "PATH": str(BIN) + ":/usr/bin:/bin",
           "HOME": str(root), "HF_HOME": str(root / "hf"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((root / "out" / "eval.json").read_text())
  harness = report["harness"]
  assert report["teacher"]["harness"] == harness
  assert report["teacher"]["results"] == report["results"]
  _, model = _model(smoke["gla"])
  acc, acc_norm = [], []
  # lm_eval joins question and choice with its default target delimiter " ".
  lls = _logliks(model, [(d["question"], " " + c) for d in docs
                         for c in d["choices"]])
  for i, d in enumerate(docs):
    ll = lls[3 * i:3 * i + 3]
    acc.append(int(np.argmax(ll)) == d["answer"])
    # acc_norm divides by the choice's own length, without the delimiter.
    norm = [x / len(c) for x, c in zip(ll, d["choices"])]
    acc_norm.append(int(np.argmax(norm)) == d["answer"])
  assert harness["lsm_counting"]["sample_len"] == len(docs)
  np.testing.assert_allclose(harness["lsm_counting"]["acc,none"], np.mean(acc))
  np.testing.assert_allclose(harness["lsm_counting"]["acc_norm,none"],
                             np.mean(acc_norm))
