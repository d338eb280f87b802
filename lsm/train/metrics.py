"""Metric output: JSON lines (``metrics.jsonl``) and TensorBoard event files
(``tensorboard/``, via tensorboardX: no TensorFlow), written by process 0 only;
and the throughput figures (tokens/s, MFU).
"""

import json
import math
from pathlib import Path

import jax

# Peak dense bf16 FLOP/s per device, from the vendors' data sheets. MFU is only
# reported for devices listed here or given by train.peak_flops_per_device.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device: jax.Device, override: float | None = None) -> float | None:
  """Peak FLOP/s of one device: ``override`` if set, else from PEAK_FLOPS."""
  if override:
    return float(override)
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


class MetricWriter:
  """Appends one JSON object per write to metrics.jsonl and the same scalars to
  TensorBoard. A resumed run appends: readers take the last record of a step.
  """

  def __init__(self, workdir: str | Path, *, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # only process 0 needs it
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    # purge_step hides events a crashed run wrote after its last checkpoint.
    self._tb = SummaryWriter(str(workdir / "tensorboard"),
                             purge_step=start_step or None)

  def write(self, step: int, scalars: dict, prefix: str = ""):
    if not self.enabled:
      return
    values = {f"{prefix}{k}": _number(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      if value is not None:
        self._tb.add_scalar(name, value, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _number(v):
  v = float(v)
  return None if math.isnan(v) or math.isinf(v) else v


def read_metrics(path: str | Path) -> dict[int, dict]:
  """metrics.jsonl as {step: merged record}; later records of a step win."""
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      out.setdefault(record["step"], {}).update(record)
  return out
