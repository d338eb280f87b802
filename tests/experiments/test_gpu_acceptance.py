"""experiments/gpu_acceptance.sh on CPU: the whole dry run (slow, ~2.5 min),
and its parts (the default suite): step command lines, the driver's summary and
its time limits, the inputs of the preset checks, and one preset call class
checked against the reference in interpret mode."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gpu_acceptance as ga

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_dry_run(tmp_path):
  out = tmp_path / "out"
  env = {**os.environ, "PYTHON": sys.executable}
  proc = subprocess.run(["bash", "experiments/gpu_acceptance.sh", "--dry-run",
                         str(out)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["dry_run"] and set(summary["steps"]) == set(ga.STEPS)
  assert all(r["status"] == "ok" for r in summary["steps"].values()), summary
  for name in ("info.txt", "tests.txt", "matrix.txt", "matrix.json",
               "presets.jsonl", "train.json", "bench.txt"):
    assert (out / name).stat().st_size > 0, name
  assert "DRY RUN" in proc.stdout
  presets = [json.loads(line) for line in
             (out / "presets.jsonl").read_text().splitlines()]
  assert presets and all(r["ok"] for r in presets), presets
  train = json.loads((out / "train.json").read_text())
  assert not train["failures"] and train["results"]["auto"]["nonfinite"] == 0
  assert "| gla |" in (out / "bench.txt").read_text()


def test_step_commands():
  for f in ga.GPU_TEST_FILES:  # a renamed test file must be renamed here too
    assert os.path.exists(os.path.join(ROOT, f)), f
  tests = ga.step_command("tests", "/o", dry_run=False)
  assert tests[1:6] == ["-m", "pytest", "-q", "-m", "gpu"]
  assert tests[-len(ga.GPU_TEST_FILES):] == list(ga.GPU_TEST_FILES)
  bench = ga.step_command("bench", "/o", dry_run=False)
  assert "8,4096,16,128" in bench and "--small" not in bench
  assert "--small" in ga.step_command("bench", "/o", dry_run=True)
  assert ga.step_command("train", "/o", dry_run=True)[-4:] == [
      "train", "--out", "/o", "--dry-run"]
  # within the ~7 minutes a lent GPU command may take
  assert sum(limit for limit, _ in ga.STEPS.values()) <= 450


def test_driver_writes_a_summary(tmp_path):
  assert ga.main(["--dry-run", str(tmp_path), "--steps", "info"]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"]["info"]["status"] == "ok"
  text = (tmp_path / "info.txt").read_text()
  assert "DRY RUN" in text and "jax 0." in text


def test_driver_kills_a_step_at_its_limit(tmp_path, monkeypatch):
  monkeypatch.setitem(ga.STEPS, "info", (0.05, 0.05))
  assert ga.main(["--dry-run", str(tmp_path), "--steps", "info"]) == 1
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"]["info"]["status"] == "timeout"


def test_main_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
  with pytest.raises(SystemExit):
    ga.main([str(tmp_path)])


@pytest.fixture(scope="module")
def gla_matrix():
  return ga.build_matrix(mixers=("gla", "delta_net"), sizes=("20m",),
                         targets=("h100",))


def test_inputs_are_in_the_layers_ranges(gla_matrix):
  by_op = {e.call.op: e.call for e in gla_matrix.entries if e.call.call.documents}
  x = ga.make_inputs(by_op["gla"])
  assert float(jnp.max(x["log_g"])) <= 0
  ids = np.asarray(x["segment_ids"])
  assert np.all(np.diff(ids, axis=1) >= 0) and np.all(ids[:, -1] >= 1)
  y = ga.make_inputs(by_op["delta_rule"])
  norms = jnp.linalg.norm(y["k"].astype(jnp.float32), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-2)
  assert 0 < float(jnp.min(y["beta"])) and float(jnp.max(y["beta"])) < 1


def test_a_kernel_class_checks_against_the_reference(gla_matrix):
  classes = ga.kernel_classes(gla_matrix, "h100")
  assert {k[0] for k, _ in classes} == {"gla", "delta_rule"}
  docs = [k[6] for k, _ in classes]
  assert docs == sorted(docs, reverse=True)  # the training path first
  key, entries = next((k, e) for k, e in classes if k[0] == "gla" and k[6])
  call = entries[0].call.with_length(80, H=1)
  rec = ga.check_call(call, key[1], interpret=True, chunked=False)
  assert rec["ok"], rec
  errs = rec["errors"][key[1]]
  assert {"o", "h_t", "dq", "dk", "dv", "dlog_g", "dh0"} <= set(errs)
  assert all(v["tol"] > 0 for v in errs.values())
