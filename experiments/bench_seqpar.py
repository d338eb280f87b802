r"""LASP-2 sequence parallelism: weak scaling of one layer and its communication.

Run (8 forced CPU devices; set before JAX starts, which this script does):

  PYTHONPATH=. python experiments/bench_seqpar.py [--tokens_per_device 256]

For GLA and the gated delta rule (lsm.parallel.sequence, chunked impl) at
seq = 1, 2, 4, 8 with T = seq * tokens_per_device (weak scaling), prints the
median time of a jitted forward + backward of the op and the bytes each device
moves per layer, read from the compiled HLO: the forward all-gather of state
summaries receives (seq - 1) summaries, and its transpose, the backward
reduce-scatter, sends (seq - 1). Beside it, what ring attention would move at
the same sizes: K and V blocks of T / seq tokens for seq - 1 steps forward, and
K, V plus their gradient accumulators for seq - 1 steps backward, 3 (seq - 1)
blocks in all. Finally projects both to 64 devices at 2M tokens.

On a CPU the 8 "devices" share the machine's cores, so the times say nothing
about parallel speedup; they show the extra work per device (the summary pass,
the fold of seq - 1 summaries) staying small as T grows with seq.
"""

import argparse
import datetime
import json
import os
import platform
import re
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lsm.parallel import sequence  # noqa: E402
from lsm.parallel.mesh import MeshConfig, make_mesh  # noqa: E402

_COLLECTIVE = re.compile(r"\s(all-gather|reduce-scatter|all-reduce|"
                         r"collective-permute|all-to-all)(?:-start)?\(")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "c64": 8, "s32": 4}


def collectives(text):
  """[(kind, result bytes)] of the collectives in compiled HLO text."""
  out = []
  for line in text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m or " = " not in line[:m.start() + 1]:
      continue
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", line[line.index(" = ") + 3:m.start()])
    out.append((m.group(1), sum(
        _BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
        for t, dims in shapes)))
  return out


def per_device_bytes(found, n):
  """Bytes one device receives (all-gather) or sends (reduce-scatter) per call
  of the ring algorithms: (n - 1) / n of the gathered result, (n - 1) times
  the scattered result."""
  total = 0
  for kind, size in found:
    if kind == "all-gather":
      total += size * (n - 1) // n
    elif kind == "reduce-scatter":
      total += size * (n - 1)
    else:
      raise AssertionError(f"unexpected collective {kind} ({size} bytes)")
  return total


def ring_attention_bytes(B, t_local, H, K, V, n, itemsize=4):
  """Per device, per layer, forward + backward: 3 (n - 1) K/V-sized blocks."""
  return 3 * (n - 1) * B * t_local * H * (K + V) * itemsize


def lasp2_bytes(summary_bytes, n):
  """Per device, per layer: all-gather (n - 1) summaries, reduce-scatter back."""
  return 2 * (n - 1) * summary_bytes


def bench(op, B, H, K, V, t_local, n, reps, devices=None):
  """(median seconds, collectives) of one fwd+bwd at T = n * t_local on a
  seq = ``devices`` mesh (default n)."""
  T = n * t_local
  devices = n if devices is None else devices
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)
  k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
  g = jnp.asarray(-np.exp(rng.standard_normal((B, T, H)) - 3), jnp.float32)
  beta = jnp.asarray(rng.uniform(0, 2, (B, T, H)), jnp.float32)
  fns = {"gla": lambda q, k, v, g, beta: sequence.gla(
             q, k, v, g, chunk_size=64, impl="chunked")[0],
         "gated_delta_rule": lambda q, k, v, g, beta: sequence.delta_rule(
             q, k, v, beta, log_g=g, chunk_size=64, impl="chunked")[0]}
  loss = lambda *a: jnp.sum(fns[op](*a) ** 2)  # noqa: E731
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  mesh = make_mesh(MeshConfig(shape={"seq": devices}), jax.devices()[:devices])
  with jax.set_mesh(mesh):
    compiled = step.lower(q, k, v, g, beta).compile()
    found = collectives(compiled.as_text())
    jax.block_until_ready(compiled(q, k, v, g, beta))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v, g, beta))
      times.append(time.perf_counter() - t0)
  return float(np.median(times)), found


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens_per_device", type=int, default=256)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  B, H, K, V = 1, 4, 32, 32
  print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}, 8 forced CPU devices")
  print(f"# B={B} H={H} K={K} V={V} float32, chunk 64, "
        f"{args.tokens_per_device} tokens per device")
  print("| op | seq | T | fwd+bwd ms | same T on 1 device, ms | collectives (HLO, "
        "result bytes) | LASP-2 bytes/device | ring attention bytes/device |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for op in ("gla", "gated_delta_rule"):
    for n in (1, 2, 4, 8):
      sec, found = bench(op, B, H, K, V, args.tokens_per_device, n, args.reps)
      one, _ = bench(op, B, H, K, V, args.tokens_per_device, n, args.reps, 1)
      lasp = per_device_bytes(found, n)
      ring = ring_attention_bytes(B, args.tokens_per_device, H, K, V, n)
      rows.append(dict(op=op, seq=n, T=n * args.tokens_per_device,
                       ms=round(sec * 1e3, 2), one_device_ms=round(one * 1e3, 2),
                       collectives=found,
                       lasp2_bytes=lasp, ring_bytes=ring))
      print(f"| {op} | {n} | {n * args.tokens_per_device} | {sec * 1e3:.1f} | "
            f"{one * 1e3:.1f} | "
            f"{found or '-'} | {lasp} | {ring} |")

  # Projection: 64 devices, 2M tokens, H=16 heads of K=V=128 (D=2048), B=1.
  n, tokens, H, K, V = 64, 2 ** 21, 16, 128, 128
  t_local = tokens // n
  gla_summary = H * K * (V + 1) * 4
  delta_summary = H * K * (K + V) * 4
  proj = {"devices": n, "tokens": tokens, "tokens_per_device": t_local,
          "gla_lasp2_MB": lasp2_bytes(gla_summary, n) / 1e6,
          "delta_lasp2_MB": lasp2_bytes(delta_summary, n) / 1e6,
          "ring_f32_MB": ring_attention_bytes(1, t_local, H, K, V, n) / 1e6,
          "ring_bf16_MB": ring_attention_bytes(1, t_local, H, K, V, n, 2) / 1e6}
  print("# projection per layer per device, fwd+bwd:", json.dumps(proj))
  print(json.dumps({"rows": rows, "projection": proj}))


if __name__ == "__main__":
  main()
