r"""PYTHONPATH=. .venv/bin/python experiments/bench_train.py --markdown

Run from the repo root. Training throughput and peak memory of the trainer's own
train step on CPU, GLA vs DeltaNet vs softmax attention, at several sequence
lengths with the same tokens per step, all in one process; prints one table
(Markdown with --markdown, with a header giving machine, date, versions, shapes
and the exact command, to paste into BENCHMARKS.md). Options: --mixers gla
delta_net attention, --T 512 2048 8192, --tokens 8192, --repeats N,
--max-gib 16, --markdown. Quick check:
``--T 512 --tokens 1024 --repeats 2``.

What runs is the real train step, built as ``lsm.train.loop`` builds it:

- config: ``configs.common.lm_run("mixer=M,size=20m,impl=chunked,seq_len=T,
  batch_size=B")`` (d_model 384, 8 layers, 4 heads, SwiGLU MLP, tied
  embeddings, vocab_size 320 = the byte tokenizer's), chunk_size 64 (set
  explicitly), float32 compute, grad_accum 1;
- ``LMConfig(**config.model)``, ``OptimConfig(**config.optim)`` and
  ``make_optimizer`` (clip + AdamW with its decay mask and cosine schedule),
  ``MeshConfig(**config.mesh)`` / ``make_mesh`` (one CPU device),
  ``state.build`` / ``state.create(seed 0)``;
- ``step.make_train_step`` jitted with the trainer's in/out shardings and the
  state donated: forward, backward, optimiser update, non-finite guard and
  metrics, i.e. one full optimiser step.

For each mixer and T, B = tokens // T. The batch (``inputs``, ``targets``
uniform int32 over the vocabulary from a seeded numpy RNG, ``mask`` all True;
throughput does not depend on the values) is put on the device once, before
timing. The step is lowered and compiled explicitly (``compile (s)``: lower +
compile wall time); then one warm-up step and ``--repeats`` timed steps, each
fed the state the previous one returned (as in the training loop, since the
state is donated) and ended by ``block_until_ready`` on the loss. Reported:

- ms/step: median of the timed steps; tokens/s = B * T / median step time;
- model GFLOP/s: ``lsm.models.lm.flops_per_token(cfg, n_params, T)`` * B * T /
  median step time, for the whole machine (not per core). It is the trainer's
  MFU numerator, a model-FLOPs estimate (6 N plus a per-layer mixer term), not
  a count of the FLOPs XLA executes;
- peak (GiB): from the compiled step's ``memory_analysis()``: argument +
  output - alias + temp bytes / 2^30. The donated state is both argument and
  output and XLA aliases the two buffers, so alias bytes are subtracted once
  (the same formula as MaxText's compiled-memory report); alias is also shown.

A config whose compiled peak exceeds --max-gib is compiled and reported but not
run, so that it cannot exhaust the machine's memory and end the whole sweep.
"""

import argparse
import datetime
import os
import platform
import shlex
import sys
import time

import jax

# CPU benchmark by definition: pin the platform before any backend starts.
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from experiments.benchmarking import format_table, median_ms  # noqa: E402
from lsm import layers  # noqa: E402
from lsm.models.lm import LMConfig, flops_per_token  # noqa: E402
from lsm.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from lsm.train import optim  # noqa: E402
from lsm.train import state as state_lib  # noqa: E402
from lsm.train import step as step_lib  # noqa: E402

SIZE = "20m"
IMPL = "chunked"  # the CPU fast path ("auto" would pick it too; explicit here)
CHUNK_SIZE = 64
MIXERS = ("gla", "delta_net", "attention")
TOKENS_PER_STEP = 8192  # B * T of every step, unless --tokens
SEED = 0
# With --repeats 0 (default) the number of timed steps comes from the warm-up
# step's time, about BUDGET_S per config, clipped to [MIN_REPEATS, MAX_REPEATS].
# A 8192-token step takes seconds on a few cores, so this is usually the minimum.
BUDGET_S = 30.0
MIN_REPEATS = 3
MAX_REPEATS = 10
# Default --max-gib. bench_models.py uses the same limit on a 23 GiB machine.
MAX_PEAK_GIB = 16.0
GIB = 2**30


def run_config(mixer: str, T: int, B: int):
  """The lm_run config of one benchmark point (see module docstring)."""
  config = common.lm_run(f"mixer={mixer},size={SIZE},impl={IMPL},seq_len={T},"
                         f"batch_size={B}")
  config.model.chunk_size = CHUNK_SIZE
  return config


def random_batch(T: int, B: int, vocab_size: int) -> dict:
  """The trainer's batch layout: int32 inputs / targets [B, T], bool mask."""
  rng = np.random.default_rng(SEED)
  tokens = rng.integers(0, vocab_size, size=(B, T + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": np.ones((B, T), bool)}


def peak_bytes(mem) -> tuple[float, float]:
  """(argument + output - alias + temp, alias) bytes of a memory analysis."""
  alias = mem.alias_size_in_bytes
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - alias
          + mem.temp_size_in_bytes), alias


def bench(mixer: str, T: int, n_tokens: int, repeats: int, max_gib: float) -> dict:
  """Compiles and times the train step of one (mixer, T).

  Returns:
    dict with params, compile_s, peak_gib, alias_gib, and either step_ms, tok_s
    and gflop_s, or skip (a reason).
  """
  B = n_tokens // T
  config = run_config(mixer, T, B)
  model_cfg = LMConfig(**config.model)
  mesh = make_mesh(MeshConfig(**config.mesh))
  tx, schedule = optim.make_optimizer(optim.OptimConfig(**config.optim),
                                      config.train.num_steps,
                                      state_lib.float32_mask(model_cfg))
  setup = state_lib.build(model_cfg, tx, mesh, config.mesh.get("rules"))
  out = dict(params=setup.n_params)
  train_step = jax.jit(
      step_lib.make_train_step(setup, schedule, grad_accum=1,
                               compute_dtype=jnp.float32),
      in_shardings=(setup.shardings, setup.batch_sharding),
      out_shardings=(setup.shardings, None), donate_argnums=0)
  batch = jax.device_put(random_batch(T, B, model_cfg.vocab_size),
                         setup.batch_sharding)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = train_step.lower(setup.abstract_state, batch).compile()
    out["compile_s"] = time.perf_counter() - start
    peak, alias = peak_bytes(compiled.memory_analysis())
    out["peak_gib"], out["alias_gib"] = peak / GIB, alias / GIB
    if out["peak_gib"] > max_gib:
      out["skip"] = (f"compiled peak {out['peak_gib']:.1f} GiB, over the "
                     f"--max-gib {max_gib:g} limit")
      return out
    # The state is donated, so each step must get the state the last one
    # returned; `advance` keeps it and returns the loss, which median_ms blocks
    # on (all outputs of one executable become ready together).
    held = {"state": state_lib.create(setup, SEED)}

    def advance(state, batch):
      held["state"], metrics = compiled(state, batch)
      return metrics["loss"]

    out["step_ms"] = median_ms(advance, repeats, BUDGET_S, MIN_REPEATS,
                               MAX_REPEATS,
                               prepare=lambda: (held["state"], batch))
  seconds = out["step_ms"] / 1e3
  out["tok_s"] = n_tokens / seconds
  out["gflop_s"] = (flops_per_token(model_cfg, setup.n_params, T) * n_tokens
                    / seconds / 1e9)
  return out


COLUMNS = ("mixer", "T", "B", "params", "compile (s)", "ms/step", "tokens/s",
           "model GFLOP/s", "peak (GiB)", "alias (GiB)")


def row(mixer: str, T: int, n_tokens: int, res: dict) -> list[str]:
  head = [mixer, str(T), str(n_tokens // T), f"{res['params'] / 1e6:.2f}M",
          f"{res['compile_s']:.1f}"]
  tail = [f"{res['peak_gib']:.2f}", f"{res['alias_gib']:.2f}"]
  if "skip" in res:
    return head + ["skipped"] * 3 + tail
  return head + [f"{res['step_ms']:.0f}", f"{res['tok_s']:.0f}",
                 f"{res['gflop_s']:.1f}"] + tail


# -- header -----------------------------------------------------------------------


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def command() -> str:
  """The command line that ran this script, as typed from the repo root."""
  exe = os.path.relpath(sys.executable)
  if exe.startswith(".."):
    exe = sys.executable
  env = "PYTHONPATH=. " if os.environ.get("PYTHONPATH") else ""
  return env + shlex.join([exe, *sys.argv])


def header(args, markdown: bool) -> list[str]:
  shape = common.check_size(SIZE)
  model = run_config(args.mixers[0], 1, 1).model
  cores = len(os.sched_getaffinity(0))
  now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
  pairs = ", ".join(f"{args.tokens // T}x{T}" for T in sorted(args.T))
  lines = [
      f"Machine: {cpu_model()}, {cores} cores usable (os.sched_getaffinity; "
      f"{os.cpu_count()} online), {platform.machine()}, jax CPU backend",
      f"Date: {now}",
      f"jax {jax.__version__}",
      f"Shapes: preset {SIZE} ({', '.join(f'{k}={v}' for k, v in shape.items())}),"
      f" vocab_size={model.vocab_size}, impl={IMPL}, chunk_size={CHUNK_SIZE},"
      f" float32; {args.tokens} tokens per step as BxT = {pairs}; "
      f"repeats={args.repeats or f'auto ({MIN_REPEATS}-{MAX_REPEATS})'} timed "
      "steps after 1 warm-up",
      (f"Command (repo root): `{command()}`" if markdown
       else f"Command (repo root): {command()}"),
  ]
  if markdown:
    lines = [f"- {line}" for line in lines]
  return lines


def main():
  parser = argparse.ArgumentParser(
      description="Training throughput and peak memory of the trainer's train "
      "step on CPU, per mixer and sequence length.")
  parser.add_argument("--mixers", nargs="+", default=list(MIXERS),
                      choices=sorted(layers.MIXERS) + ["hybrid"],
                      help="mixers (lm_run's mixer=; hybrid: 3 delta_net + 1 "
                      "attention)")
  parser.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192],
                      help="sequence lengths (B = tokens // T)")
  parser.add_argument("--tokens", type=int, default=TOKENS_PER_STEP,
                      help="B * T of every step")
  parser.add_argument("--repeats", type=int, default=0,
                      help="timed steps after one warm-up; 0 (default): "
                      f"{MIN_REPEATS}-{MAX_REPEATS}, about {BUDGET_S:g} s per "
                      "config")
  parser.add_argument("--max-gib", type=float, default=MAX_PEAK_GIB,
                      help="compile but do not run configs whose compiled peak "
                      "memory exceeds this many GiB")
  parser.add_argument("--markdown", action="store_true",
                      help="print a Markdown table (for BENCHMARKS.md)")
  args = parser.parse_args()
  for T in args.T:
    if T < 1 or args.tokens % T:
      parser.error(f"--T {T}: expected a divisor of --tokens {args.tokens}")

  print("\n".join(header(args, args.markdown)))
  t0 = time.perf_counter()
  rows, notes = [], []
  for mixer in args.mixers:
    for T in sorted(args.T):
      res = bench(mixer, T, args.tokens, args.repeats, args.max_gib)
      if "skip" in res:
        notes.append(f"skipped {mixer} T={T}: {res['skip']}")
        print(notes[-1], file=sys.stderr, flush=True)
      # Progress on stderr, so that stdout is only the header and the table.
      print(f"{mixer} T={T} done ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr, flush=True)
      rows.append(row(mixer, T, args.tokens, res))
  print()
  print(f"Train step (forward, backward, AdamW update), {args.tokens} tokens per "
        "step; ms/step = median; model GFLOP/s = flops_per_token * tokens / "
        "step time (whole machine); peak = compiled memory_analysis() argument "
        "+ output - alias + temp (alias: donated state, counted once)")
  print()
  print(format_table(COLUMNS, rows, args.markdown))
  if notes:
    print()
    print("\n".join(notes))
  print(f"\ntotal {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
  main()
