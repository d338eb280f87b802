"""tests/crash_retry.py: a worker's death gives its test one more run on a new
worker; a second death, or a plain failure, still fails the run."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("xdist")

BODY = """
import os, pathlib, signal

def test_dies_once(tmp_path_factory):
  marker = pathlib.Path({dir!r}) / "died"
  if not marker.exists():
    marker.write_text("once")
    os.kill(os.getpid(), signal.SIGSEGV)

def test_dies_every_time():
  os.kill(os.getpid(), signal.SIGSEGV)

def test_fails():
  assert 1 + 1 == 3
"""


def test_a_worker_crash_is_retried_once_and_reported(tmp_path):
  test = tmp_path / "test_body.py"
  test.write_text(BODY.format(dir=str(tmp_path)))
  # No conftest in tmp_path: the plugin alone, with the repo root on the path.
  out = subprocess.run(
      [sys.executable, "-m", "pytest", "-n", "1", "-q", "-p", "tests.crash_retry",
       "-p", "no:cacheprovider", "-o", "addopts=", "-o", "timeout=60",
       "--rootdir", str(tmp_path), str(test)],
      capture_output=True, text=True, timeout=120,
      # The caller's PYTEST_ADDOPTS (test paths, -k) would reach the inner run.
      env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})
  # test_dies_once passes on its retry; test_dies_every_time fails after one
  # retry; test_fails fails without any.
  assert out.returncode == 1, out.stdout
  assert "2 failed, 1 passed, 2 rerun" in out.stdout, out.stdout
  retried = sorted(line.split("::")[1].split(":")[0]
                   for line in out.stdout.splitlines()
                   if "its worker crashed; retried 1x" in line)
  assert retried == ["test_dies_every_time", "test_dies_once"], out.stdout
