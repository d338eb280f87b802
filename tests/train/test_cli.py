"""``lsm-train`` as a user runs it, in subprocesses: exact resume after SIGKILL,
a checkpoint on SIGTERM, and clear errors for bad overrides."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from lsm.train.metrics import read_metrics
from tests.train import runs

ROOT = pathlib.Path(__file__).resolve().parents[2]


# The installed console script (make installs it into the venv beside python).
LSM_TRAIN = str(pathlib.Path(sys.executable).parent / "lsm-train")


def _command(corpus: str, data_dir: str, workdir, *overrides: str,
             script: bool = False) -> list[str]:
  return [*([LSM_TRAIN] if script else [sys.executable, "-m", "lsm.train"]),
          f"--config={ROOT}/configs/gla.py:smoke=True",
          f"--workdir={workdir}",
          "--config.model.d_model=32", "--config.model.n_layers=1",
          f"--config.data.globs=('{corpus}',)", f"--config.data.data_dir={data_dir}",
          "--config.data.seq_len=32", "--config.data.batch_size=4",
          "--config.optim.warmup_steps=2", "--config.optim.total_steps=100",
          "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=4", "--config.train.progress=False",
          *overrides]


def _env():
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _run(cmd, timeout=240):
  return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  return runs.write_corpus(root / "text"), str(root / "tfds")


def test_resume_after_sigkill_is_exact(corpus, tmp_path):
  full = _run(_command(*corpus, tmp_path / "full", "--config.train.num_steps=12"))
  assert full.returncode == 0, full.stderr[-3000:]
  crashed = _run(_command(*corpus, tmp_path / "crash",
                          "--config.train.num_steps=12",
                          "--config.train.crash_after_step=10"))
  assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
  before = read_metrics(tmp_path / "crash" / "metrics.jsonl")
  assert max(before) == 10
  resumed = _run(_command(*corpus, tmp_path / "crash",
                          "--config.train.num_steps=12"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # Step 8's checkpoint may still have been in flight at the kill (async save):
  # then the run resumes from step 4. Either way the replay must be exact.
  assert re.search(r"resumed from step (4|8)\b", resumed.stderr), resumed.stderr
  assert "starting from step 0" not in resumed.stderr
  expected = read_metrics(tmp_path / "full" / "metrics.jsonl")
  got = read_metrics(tmp_path / "crash" / "metrics.jsonl")
  assert sorted(got) == list(range(1, 13))
  for step in range(1, 13):   # bitwise: same floats, same JSON text
    for key in ("loss", "accuracy", "grad_norm", "lr"):
      assert got[step][key] == expected[step][key], (step, key)


def test_sigterm_saves_a_checkpoint_and_exits(corpus, tmp_path):
  # Also the console script, started outside the repo: the config still finds
  # its configs package.
  cmd = _command(*corpus, tmp_path, "--config.train.num_steps=100000",
                 "--config.train.checkpoint_every=0", script=True)
  env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
  proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 180
  while time.time() < deadline and proc.poll() is None and (
      not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "stopping on signal 15" in err
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  assert max(read_metrics(metrics)) <= steps[0]


@pytest.mark.parametrize("override, match", [
    ("--config.optim.lr=abc", "abc"),
    ("--config.optim.lrr=0.1", "lrr"),
])
def test_bad_override_is_a_clear_error(corpus, tmp_path, override, match):
  out = _run(_command(*corpus, tmp_path, override), timeout=120)
  assert out.returncode != 0
  assert match in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
  """An existing workdir (a finished run) that bad commands must not touch."""
  workdir = tmp_path_factory.mktemp("existing") / "run"
  out = _run(_command(*corpus, workdir, "--config.train.num_steps=4",
                      script=True), timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def _snapshot(workdir):
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in workdir.rglob("*")}


@pytest.mark.parametrize("override, message", [
    ("--config.model.n_heads=0", "model.n_heads=0: expected a positive int"),
    ("--config.train.num_steps=-3", "train.num_steps=-3: expected a positive int"),
    ("--workdir={afile}", "--workdir={afile}: is a file; expected a directory"),
    ("--config.data.globs=('/nonexistent/*.txt',)",
     "glob '/nonexistent/*.txt' matches no files; expected at least one text file"),
    ("--config.data.tokenizer=hf", "data.tokenizer_path=None with tokenizer='hf': "
     "expected the tokenizer.json file path"),
    ("--config.model.mixer=gru", "model.mixer='gru': unknown mixer 'gru'"),
    ("--config.data.batch_size=3", "data.batch_size=3 must split into "
     "train.grad_accum=2"),
    ("--config.optim.lrr=0.1", "--config.optim.lrr=0.1: the config has no field "
     "optim.lrr; did you mean 'lr'?"),
    ("--config.model.vocab_size=100", "model.vocab_size=100: smaller than the "
     "tokenizer's vocabulary (259)"),
])
def test_bad_input_is_one_line_and_exit_2(corpus, finished_run, tmp_path,
                                          override, message):
  afile = tmp_path / "afile"
  afile.write_text("x")
  fill = lambda s: s.format(afile=afile, workdir=finished_run)  # noqa: E731
  extra = ["--config.train.grad_accum=2"] if "batch_size" in override else []
  before = _snapshot(finished_run)
  out = _run(_command(*corpus, finished_run, fill(override), *extra, script=True),
             timeout=120)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert out.stderr.startswith("lsm-train: error: "), out.stderr[-2000:]
  assert out.stderr.count("\n") == 1 and fill(message) in out.stderr, out.stderr
  assert _snapshot(finished_run) == before
  if override != "--config.model.n_heads=0":
    return
  with_tb = _run(_command(*corpus, finished_run, fill(override), *extra,
                          "--traceback", script=True), timeout=120)
  assert with_tb.returncode == 2
  assert "Traceback" in with_tb.stderr
  assert with_tb.stderr.splitlines()[-1] == out.stderr.strip()


def test_new_workdir_is_not_created_on_bad_input(corpus, tmp_path):
  out = _run(_command(*corpus, tmp_path / "new", "--config.model.n_heads=0",
                      script=True), timeout=120)
  assert out.returncode == 2 and not (tmp_path / "new").exists()


def test_checkpoint_that_does_not_fit_is_one_line_per_difference(
    corpus, finished_run):
  """A resume whose model differs stops with exit 2 before anything is
  written: a header naming the step, then one line per config field and per
  state path."""
  before = _snapshot(finished_run)
  out = _run(_command(*corpus, finished_run, "--config.model.d_model=64",
                      script=True), timeout=120)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  lines = out.stderr.splitlines()
  assert lines[0] == (f"lsm-train: error: {finished_run}/checkpoints holds a "
                      "checkpoint (step 4) that this run cannot resume:"), lines
  assert "  model.d_model: checkpoint has 32, config has 64" in lines
  assert any(ln.startswith("  state.opt_state.1.0.mu.blocks.0.mixer.") and
             ln.endswith(": checkpoint has float32[16,16], this run has "
                         "float32[16,32]") for ln in lines), lines
  assert lines[-1].startswith("Use another --workdir"), lines
  assert _snapshot(finished_run) == before
