"""Real multi-process runs on CPU through launch/local_multiprocess.sh: two
``lsm-train`` processes with 4 CPU devices each, joined by jax.distributed on
localhost, against one process with 8 devices; then a hard kill of both and a
resume. Also the startup failures: different configs, no coordinator."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from lsm.train.metrics import read_metrics
from tests.numerics import assert_close, tolerance
from tests.train import runs

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER = str(ROOT / "launch" / "local_multiprocess.sh")
KEYS = ("loss", "accuracy", "grad_norm")
EVAL_KEYS = ("eval_loss", "eval_accuracy")


def _flags(corpus: str, data_dir: str, workdir, *overrides: str) -> list[str]:
  # data.shards is left at its default (gcd(batch_size, 8) = 4, recorded with
  # the run), so one process reads the same global batches as two; mesh
  # (data=4, seq=2) over 8 devices.
  return [f"--config={ROOT}/configs/gla.py:smoke=True", f"--workdir={workdir}",
          "--config.model.d_model=32", "--config.model.n_layers=1",
          f"--config.data.globs=('{corpus}',)", f"--config.data.data_dir={data_dir}",
          "--config.data.seq_len=16", "--config.data.batch_size=4",
          "--config.mesh.shape.data=4",
          "--config.mesh.shape.seq=2", "--config.optim.warmup_steps=2",
          "--config.optim.total_steps=100", "--config.train.num_steps=8",
          "--config.train.log_every=1", "--config.train.checkpoint_every=4",
          # Evaluation to the end of the held-out split (24 batches per shard):
          # the processes agree, batch by batch, on when it has ended.
          "--config.data.validation_fraction=0.5", "--config.train.eval_every=4",
          "--config.train.eval_steps=30",
          "--config.train.async_checkpoints=False",
          "--config.train.progress=False", *overrides]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Half the compile time; every run compared is compiled alike.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return {**env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
          "PYTHON": sys.executable, **extra}


def _launch(n: int, devices: int, flags: list[str], log_dir, timeout=240):
  return subprocess.run([LAUNCHER, str(n), str(devices), *flags], cwd=ROOT,
                        env=_env(LOG_DIR=str(log_dir)), capture_output=True,
                        text=True, timeout=timeout)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _logs(log_dir) -> str:
  return "\n".join(p.read_text() for p in sorted(pathlib.Path(log_dir).glob("*.log")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("mp")
  return runs.write_corpus(root / "text"), str(root / "tfds")


def _assert_close(got: dict, want: dict, steps, keys=KEYS):
  for key in keys:
    assert_close([got[s][key] for s in steps], [want[s][key] for s in steps],
                 rtol=tolerance("train", np.float32), what=key)


def test_two_processes_equal_one_and_resume_on_another_process_count(corpus,
                                                                     tmp_path):
  """1 process x 8 devices against 2 x 4; a run of either count resumes on the
  other from its step-4 checkpoint (the 2-process one after a SIGKILL of both
  processes at step 6), and steps 5-8 equal the uninterrupted run's."""
  one = _launch(1, 8, _flags(*corpus, tmp_path / "one"), tmp_path / "log1")
  assert one.returncode == 0, _logs(tmp_path / "log1")[-4000:]
  want = read_metrics(tmp_path / "one" / "metrics.jsonl")
  assert sorted(want) == list(range(1, 9))
  assert want[8]["loss"] < want[1]["loss"]   # it trained

  two = tmp_path / "two"
  crashed = _launch(2, 4, _flags(*corpus, two, "--config.train.crash_after_step=6"),
                    tmp_path / "log2")
  assert crashed.returncode == 128 + 9, _logs(tmp_path / "log2")[-4000:]  # SIGKILL
  before = read_metrics(two / "metrics.jsonl")
  assert sorted(before) == list(range(1, 7))
  _assert_close(before, want, range(1, 7))
  _assert_close(before, want, [4], EVAL_KEYS)
  # The data position of both processes is one file any process count reads.
  step4 = two / "checkpoints" / "4"
  position = json.loads((step4 / "data_position" / "metadata").read_text())
  assert len(position["shards"]) == 4 and not (step4 / "data").exists()

  # 2 processes -> 1.
  resumed = _launch(1, 8, _flags(*corpus, two), tmp_path / "log3")
  logs = _logs(tmp_path / "log3")
  assert resumed.returncode == 0, logs[-4000:]
  assert re.search(r"resumed from step 4\b", logs), logs[-4000:]
  after = read_metrics(two / "metrics.jsonl")   # the last record of each step
  assert sorted(after) == list(range(1, 9))
  _assert_close(after, want, range(5, 9))
  _assert_close(after, want, [4, 8], EVAL_KEYS)

  # 1 process -> 2: the uninterrupted run's workdir as it was after step 4.
  three = tmp_path / "three"
  shutil.copytree(tmp_path / "one", three)
  shutil.rmtree(three / "checkpoints" / "8")
  resumed = _launch(2, 4, _flags(*corpus, three), tmp_path / "log4")
  logs = _logs(tmp_path / "log4")
  assert resumed.returncode == 0, logs[-4000:]
  assert re.search(r"resumed from step 4\b", logs), logs[-4000:]
  after = read_metrics(three / "metrics.jsonl")
  _assert_close(after, want, range(5, 9))
  _assert_close(after, want, [8], EVAL_KEYS)
  # Only process 0 writes logs of the run; the others only warn.
  proc1 = (tmp_path / "log4" / "process_1.log").read_text()
  assert "resumed from step" not in proc1


def _start_pair(flags: list[str], per_process: list[list[str]], devices: int):
  """Two lsm-train processes started directly (no launcher); their stderr."""
  env = _env()
  env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "lsm.train", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", "--distributed_timeout_s=60",
       *flags, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i, extra in enumerate(per_process)]
  errs = [p.communicate(timeout=120)[1] for p in procs]
  return [(p.returncode, err) for p, err in zip(procs, errs)]


def test_processes_with_different_configs_stop_with_the_differences(corpus,
                                                                     tmp_path):
  flags = _flags(*corpus, tmp_path / "run", "--config.train.num_steps=2")
  results = _start_pair(flags, [["--config.optim.lr=1e-3"],
                                ["--config.optim.lr=2e-3"]], devices=4)
  for returncode, err in results:
    assert returncode != 0, err[-3000:]
    assert "ProcessesDisagree" in err, err[-3000:]
    assert "process 1 differs from process 0 in run.optim.lr: 0.001 vs 0.002" in err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_mesh_that_does_not_match_the_processes_devices_stops_all(corpus, tmp_path):
  # (data=4, seq=2) needs 8 devices; two processes with 2 each have 4.
  results = _start_pair(_flags(*corpus, tmp_path / "run"), [[], []], devices=2)
  for returncode, err in results:
    assert returncode != 0, err[-3000:]
    assert "needs 8 devices; 4 are available" in err, err[-3000:]
    assert "(2 processes with 2 devices each on this one" in err, err[-3000:]


def test_unreachable_coordinator_is_an_error_not_a_hang(tmp_path):
  port = _free_port()
  out = subprocess.run(
      [sys.executable, "-m", "lsm.train", f"--config={ROOT}/configs/gla.py:smoke=True",
       f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", "--process_id=1", "--distributed_timeout_s=2"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
  assert out.returncode != 0
  assert (f"process 1: could not reach the coordinator at 127.0.0.1:{port} within "
          "2 s") in out.stderr, out.stderr[-3000:]
