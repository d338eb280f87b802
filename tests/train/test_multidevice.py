"""Sharded training equals one device, and checkpoints move between meshes: on 8
forced CPU devices, in a subprocess (the device count is fixed at JAX start)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_sharded_equals_one_device_and_restore_onto_another_mesh(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, str(ROOT / "tests/train/multidevice_check.py"),
       str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True,
      timeout=280)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  # The runs trained: the loss moved over the steps compared.
  assert result["one"][0] != result["one"][-1]
  assert result["moved"][0] != result["moved"][-1]
