"""Run by test_multidevice.py in a fresh process with 8 forced CPU devices:
a sharded mesh trains like one device, and a checkpoint saved on 8 devices
restores onto 4. Prints one JSON line of results; raises on a mismatch."""

import json
import os
import pathlib
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           # Half the compile time; both sides of every
                           # comparison are compiled alike.
                           " --xla_backend_optimization_level=0")

import jax  # noqa: E402  (after XLA_FLAGS)

from lsm.train import loop  # noqa: E402
from tests.numerics import assert_close, tolerance  # noqa: E402
from tests.train import runs  # noqa: E402


def main(tmp: pathlib.Path):
  assert len(jax.devices()) == 8, jax.devices()
  glob, data_dir = runs.write_corpus(tmp / "text"), str(tmp / "tfds")
  rtol = tolerance("train", "float32")

  def train(name, steps, shape, devices=None, batch_size=4):
    # eps=1e-3: see tests/train/test_step.py (Adam's first steps amplify
    # rounding in near-zero gradients; the comparison is about the gradients).
    config = runs.tiny_config(glob, data_dir, steps=steps,
                              mesh={"shape": shape}, optim={"eps": 1e-3},
                              # 4 record shards: the corpus has 7 training
                              # documents, fewer than the default 8.
                              data={"batch_size": batch_size, "shards": 4})
    return loop.train(config, tmp / name, devices=devices)

  one = train("one", 4, {"data": 1}, jax.devices()[:1])
  sharded = train("sharded", 4, {"data": 2, "fsdp": 2, "tensor": 2})
  for s in range(1, 5):
    for key in ("loss", "grad_norm"):
      assert_close(sharded[s][key], one[s][key], rtol=rtol,
                   what=f"sharded vs one device, step {s} {key}")

  # Saved on 8 devices as (data=2, fsdp=4), resumed on 4 as (data=2, fsdp=2).
  reference = train("reference", 8, {"data": 2, "fsdp": 4}, batch_size=8)
  train("moved", 4, {"data": 2, "fsdp": 4}, batch_size=8)
  moved = train("moved", 8, {"data": 2, "fsdp": 2}, jax.devices()[:4],
                batch_size=8)
  assert sorted(moved) == [5, 6, 7, 8], sorted(moved)
  for s in range(5, 9):
    assert_close(moved[s]["loss"], reference[s]["loss"], rtol=rtol,
                 what=f"restored on 4 devices vs 8, step {s} loss")
  print(json.dumps({"one": [one[s]["loss"] for s in range(1, 5)],
                    "sharded": [sharded[s]["loss"] for s in range(1, 5)],
                    "moved": [moved[s]["loss"] for s in range(5, 9)],
                    "reference": [reference[s]["loss"] for s in range(5, 9)]}))


if __name__ == "__main__":
  with tempfile.TemporaryDirectory() as d:
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else d))
