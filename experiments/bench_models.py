r"""PYTHONPATH=. .venv/bin/python experiments/bench_models.py --markdown

Run from the repo root. Benchmarks whole language models, one per mixer in
``lsm.layers.MIXERS``, on CPU, and prints two tables (Markdown with --markdown,
as pasted into BENCHMARKS.md). Options: --T 512 2048 8192, --tokens 8192,
--mixers gla ..., --contexts 128 512 2048, --repeats N, --markdown,
--broadcast-head-gates (a baseline row per mixer: the old per-head gate path,
``head_gates_broadcast``), --memory-only (compile the training steps and
report their temp memory, run nothing); an empty --T or --contexts skips that
part.

Every model is the "20m" preset of configs/common.py (d_model 384, 8 layers,
each mixer's paper head shapes from its ``preset``, SwiGLU MLPs, tied
embeddings) with vocab_size=256 (byte level, the
trainer's default tokenizer; the 32000-token head of configs/lm.py is too slow on
CPU), impl="chunked" (ignored by attention), chunk_size 64, float32, every
mixer's default options, parameters from ``nnx.Rngs(0)``. The linear-attention
family (lightning, retnet, based, hedgehog, mom) runs with its paper defaults:
Based's feature dim 16 (state 273 per head) and its 64-token window branch, MoM's
4 gated-delta memories (top 2) plus the shared one, so 5 states per head.

1. Training throughput. For each mixer and sequence length T, batch
   B = 8192 // T (B * T = 8192 tokens per step, or --tokens): wall time of one
   jitted forward + backward, ``jax.value_and_grad`` with respect to every
   nnx.Param of the next-token cross entropy (``lsm.models.loss.cross_entropy``
   with an all-ones mask) of tokens [B, T + 1] (inputs [:, :-1], labels
   [:, 1:]). The tokens are uniform over the vocabulary from a fixed key: the same batch for
   every mixer at a given T. Reported: parameter count, compile time, ms/step,
   tokens/s = B * T / step time, and ``memory_analysis().temp_size_in_bytes``
   of the compiled step (XLA's temporary buffers, excluding arguments and
   outputs).
2. Decode latency. Batch 1; for each context length L the model prefills L
   random tokens into ``model.init_cache(1, L + 16)`` (``model(tokens, cache)``,
   jitted), then ``model.step`` on one token is jitted once per (mixer, L) with
   the cache donated, so the attention KV buffer is updated in place as in a
   decoding loop. Every timed call gets its own copy of the prefilled cache
   (copied before the clock starts), so each one decodes position L. Reported:
   prefill time, step ms/token, and the cache size in MiB.

Functions are lowered and compiled once and the executable reused; times are
the median of the timed calls after one warm-up call, each ended by
``block_until_ready``. A training config whose step is predicted to take more
than MAX_STEP_S (extrapolated linearly in T from the same mixer's two shorter
T, as its step time at fixed B * T is about a + b * T), or whose compiled temp
memory exceeds MAX_TEMP_GIB, is skipped with a note instead of run.
"""

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time

import jax

# CPU benchmark by definition: pin the platform before any backend starts.
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import common  # noqa: E402
from experiments.benchmarking import format_table, median_ms  # noqa: E402
from lsm import layers  # noqa: E402
from lsm.models.loss import cross_entropy  # noqa: E402
from lsm.models.lm import LanguageModel, LMConfig, count_params  # noqa: E402
from lsm.parallel import sequence  # noqa: E402

SIZE = "20m"
VOCAB_SIZE = 256  # byte level; see the module docstring
IMPL = "chunked"
TOKENS_PER_STEP = 8192  # B * T of every training step, unless --tokens
DECODE_SLACK = 16  # cache max_len = L + DECODE_SLACK
SEED = 0
# Training steps: with --repeats 0 (default) the number of timed calls comes from
# the warm-up time, about TRAIN_BUDGET_S per config, clipped to
# [TRAIN_MIN_REPEATS, TRAIN_MAX_REPEATS]. A step takes seconds on 2 cores, so
# this is usually the minimum.
TRAIN_BUDGET_S = 6.0
TRAIN_MIN_REPEATS = 2
TRAIN_MAX_REPEATS = 10
# Decode steps take milliseconds: many timed calls, about DECODE_BUDGET_S each.
DECODE_BUDGET_S = 2.0
DECODE_MIN_REPEATS = 20
DECODE_MAX_REPEATS = 200
PREFILL_REPEATS = 3
# Skip rules, so that no config hangs the run or exhausts the 24 GiB machine.
MAX_STEP_S = 60.0
MAX_TEMP_GIB = 16.0


def build_model(mixer: str) -> LanguageModel:
  """The SIZE preset LM with ``mixer`` in every layer (see module docstring)."""
  shape = common.check_size(SIZE)
  cfg = LMConfig(vocab_size=VOCAB_SIZE, mixer=mixer, impl=IMPL,
                 mixer_kwargs=common.head_shapes([mixer], shape["d_model"]),
                 **shape)
  return LanguageModel(cfg, rngs=nnx.Rngs(SEED))


@contextlib.contextmanager
def head_gates_broadcast():
  """Within: a per-head GLA gate ([B, T, H]: Mamba-2, RetNet, Lightning) reaches
  the gla op broadcast to float32 [B, T, H, K], as every gla call took it before
  2026-12-06 (``lsm.ops.gla.api._gate`` broadcast it; the chunked op then ran
  its per-channel form, stable sub-chunks included past 20 nats per chunk), and
  key groups (Mamba-2's B and C, shared by the heads) repeated to every head,
  as the Mamba-2 layer did. The baseline of ``--broadcast-head-gates``: same
  model, same head shapes, the old gate and key path."""
  op = sequence._gla_op

  def broadcast(q, k, v, log_g=None, **kwargs):
    H = v.shape[2]
    if q.shape[2] != H:  # key groups (Mamba-2's B, C) were per head too
      q, k = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (q, k))
    if log_g is not None and jnp.ndim(log_g) == jnp.ndim(q) - 1:
      log_g = jnp.broadcast_to(log_g.astype(jnp.float32)[..., None], q.shape)
    return op(q, k, v, log_g, **kwargs)

  sequence._gla_op = broadcast
  try:
    yield
  finally:
    sequence._gla_op = op


# -- 1. training throughput ----------------------------------------------------


def train_tokens(T: int, n_tokens: int):
  """(inputs, labels): int32 [B, T] each, B = n_tokens // T, fixed key."""
  B = n_tokens // T
  tokens = jax.random.randint(jax.random.key(SEED), (B, T + 1), 0, VOCAB_SIZE,
                              jnp.int32)
  return tokens[:, :-1], tokens[:, 1:]


def make_train_step(graphdef):
  """(params, rest, inputs, labels) -> (loss, grads w.r.t. params)."""
  def loss_fn(params, rest, inputs, labels):
    model = nnx.merge(graphdef, params, rest)
    logits, _ = model(inputs)
    loss, _ = cross_entropy(logits, labels, jnp.ones(labels.shape, jnp.float32))
    return loss

  return jax.value_and_grad(loss_fn)


def predict_step_s(history: list[tuple[int, float]], T: int) -> float | None:
  """Step time at T extrapolated from (T, seconds) of shorter T, same mixer.

  At fixed B * T, a step costs about a + b * T: the T-independent per-token work
  plus attention's quadratic term. The line needs two shorter T, so there is no
  prediction (None: run it) with fewer.
  """
  if len(history) < 2:
    return None
  (t0, s0), (t1, s1) = history[-2:]
  slope = max(0.0, (s1 - s0) / (t1 - t0))
  return s1 + slope * (T - t1)


def bench_train(mixer: str, T: int, n_tokens: int, repeats: int,
                history: list[tuple[int, float]], memory_only: bool = False
                ) -> dict:
  """Times one training step of ``mixer`` at length T, B = n_tokens // T (or
  records a skip). ``memory_only``: compile it and stop (no step runs).

  Returns:
    dict with params, compile_s, step_ms, tok_s, temp_mib (without step_ms
    and tok_s when ``memory_only``); or with skip (a reason) instead of the
    timings.
  """
  model = build_model(mixer)
  out = dict(params=count_params(model))
  predicted = predict_step_s(history, T)
  if predicted is not None and predicted > MAX_STEP_S:
    out["skip"] = (f"predicted {predicted:.0f} s/step from shorter T, over the "
                   f"{MAX_STEP_S:.0f} s limit")
    return out
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  inputs, labels = train_tokens(T, n_tokens)
  args = (params, rest, inputs, labels)
  start = time.perf_counter()
  compiled = jax.jit(make_train_step(graphdef)).lower(*args).compile()
  out["compile_s"] = time.perf_counter() - start
  mem = compiled.memory_analysis()
  out["temp_mib"] = None if mem is None else mem.temp_size_in_bytes / 2**20
  if out["temp_mib"] is not None and out["temp_mib"] > MAX_TEMP_GIB * 1024:
    out["skip"] = (f"compiled temp memory {out['temp_mib'] / 1024:.1f} GiB, over "
                   f"the {MAX_TEMP_GIB:.0f} GiB limit")
    return out
  if memory_only:
    return out
  out["step_ms"] = median_ms(compiled, repeats, TRAIN_BUDGET_S, TRAIN_MIN_REPEATS,
                             TRAIN_MAX_REPEATS, prepare=lambda: args)
  out["tok_s"] = n_tokens / (out["step_ms"] / 1e3)
  history.append((T, out["step_ms"] / 1e3))
  return out


TRAIN_COLUMNS = ("mixer", "T", "B", "params", "compile (s)", "ms/step", "tokens/s",
                 "temp (MiB)")


def train_row(mixer: str, T: int, n_tokens: int, res: dict) -> list[str]:
  B = n_tokens // T
  head = [mixer, str(T), str(B), f"{res['params'] / 1e6:.2f}M"]
  if "skip" in res:
    return head + ["skipped"] * 4
  mib = "n/a" if res["temp_mib"] is None else f"{res['temp_mib']:.0f}"
  if "step_ms" not in res:  # --memory-only
    return head + [f"{res['compile_s']:.1f}", "-", "-", mib]
  return head + [f"{res['compile_s']:.1f}", f"{res['step_ms']:.0f}",
                 f"{res['tok_s']:.0f}", mib]


# -- 2. decode latency ----------------------------------------------------------


def cache_mib(cache) -> float:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / 2**20


def bench_decode(mixer: str, L: int, repeats: int) -> dict:
  """Prefill L tokens at batch 1, then time one ``model.step``.

  Returns:
    dict with prefill_ms, step_ms and cache_mib.
  """
  model = build_model(mixer)
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(SEED + 1), (1, L), 0, VOCAB_SIZE,
                              jnp.int32)
  token = jnp.zeros((1,), jnp.int32)
  empty = model.init_cache(1, L + DECODE_SLACK)

  def prefill(state, tokens, cache):
    return nnx.merge(graphdef, state)(tokens, cache)[1]

  def step(state, token, cache):
    return nnx.merge(graphdef, state).step(token, cache)

  prefill_c = jax.jit(prefill).lower(state, tokens, empty).compile()
  prefill_ms = median_ms(prefill_c, PREFILL_REPEATS, 0.0, 1, 1,
                         prepare=lambda: (state, tokens, empty))
  cache = jax.block_until_ready(prefill_c(state, tokens, empty))
  # Donating the cache lets XLA update attention's KV buffer in place, as a
  # decoding loop does; without it every step would also copy the buffer.
  step_c = jax.jit(step, donate_argnums=2).lower(state, token, cache).compile()
  fresh = lambda: (state, token, jax.tree.map(jnp.copy, cache))
  step_ms = median_ms(step_c, repeats, DECODE_BUDGET_S, DECODE_MIN_REPEATS,
                      DECODE_MAX_REPEATS, prepare=fresh)
  return dict(prefill_ms=prefill_ms, step_ms=step_ms, cache_mib=cache_mib(cache))


DECODE_COLUMNS = ("mixer", "L", "prefill (ms)", "step (ms/token)",
                  "step / step at min L", "cache (MiB)")


def decode_row(mixer: str, L: int, res: dict, first_ms: float) -> list[str]:
  return [mixer, str(L), f"{res['prefill_ms']:.1f}", f"{res['step_ms']:.2f}",
          f"{res['step_ms'] / first_ms:.2f}x", f"{res['cache_mib']:.2f}"]


# -- output -----------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(
      description="Training throughput and decode latency of every mixer's LM "
      "on CPU.")
  parser.add_argument("--T", type=int, nargs="*", default=[512, 2048, 8192],
                      help="training sequence lengths (B = tokens // T); none "
                      "skips part 1")
  parser.add_argument("--tokens", type=int, default=TOKENS_PER_STEP,
                      help="B * T of every training step")
  parser.add_argument("--mixers", nargs="+", choices=list(layers.MIXERS),
                      default=list(layers.MIXERS), help="mixers to benchmark")
  parser.add_argument("--contexts", type=int, nargs="*", default=[128, 512, 2048],
                      help="decode context lengths L; none skips part 2")
  parser.add_argument("--repeats", type=int, default=0,
                      help="timed calls per measurement after one warm-up; 0 "
                      f"(default): {TRAIN_MIN_REPEATS}-{TRAIN_MAX_REPEATS} per "
                      f"training step (about {TRAIN_BUDGET_S:g} s), "
                      f"{DECODE_MIN_REPEATS}-{DECODE_MAX_REPEATS} per decode step "
                      f"(about {DECODE_BUDGET_S:g} s)")
  parser.add_argument("--broadcast-head-gates", action="store_true",
                      help="training part: also run every mixer with its "
                      "per-head gates broadcast to [B, T, H, K] (the gla path "
                      "before 2026-12-06; ``head_gates_broadcast``), a row "
                      "'<mixer> [broadcast]' after each of its rows")
  parser.add_argument("--memory-only", action="store_true",
                      help="training part: compile each step and report its "
                      "temp memory without running it (no timings; "
                      "independent of the machine's load)")
  parser.add_argument("--markdown", action="store_true",
                      help="print Markdown tables (for BENCHMARKS.md)")
  args = parser.parse_args()
  for T in args.T:
    if T < 1 or args.tokens % T:
      parser.error(f"--T {T}: expected a divisor of --tokens {args.tokens}")

  device = jax.devices()[0]
  now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
  shape = common.check_size(SIZE)
  print(f"jax {jax.__version__}, device {device.platform}:{device.device_kind} "
        f"({os.cpu_count()} CPU cores visible, {platform.machine()}), {now}")
  print(f"preset {SIZE} ({', '.join(f'{k}={v}' for k, v in shape.items())}), "
        f"vocab_size={VOCAB_SIZE}, impl={IMPL}, float32; "
        f"repeats={args.repeats or 'auto'}")

  t0 = time.perf_counter()
  if args.T:
    rows, notes = [], []
    variants = [("", contextlib.nullcontext)]
    if args.broadcast_head_gates:
      variants.append((" [broadcast]", head_gates_broadcast))
    for mixer in args.mixers:
      histories = {tag: [] for tag, _ in variants}
      for T in sorted(args.T):
        for tag, context in variants:
          with context():
            res = bench_train(mixer, T, args.tokens, args.repeats,
                              histories[tag], args.memory_only)
          name = mixer + tag
          if "skip" in res:
            notes.append(f"skipped {name} T={T}: {res['skip']}")
            print(notes[-1], file=sys.stderr, flush=True)
          # Progress on stderr, so that stdout is only the headers and tables.
          print(f"train {name} T={T} done ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr, flush=True)
          rows.append(train_row(name, T, args.tokens, res))
    print()
    print(f"1. Training step (fwd+bwd), B*T = {args.tokens} tokens")
    print()
    print(format_table(TRAIN_COLUMNS, rows, args.markdown))
    if notes:
      print()
      print("\n".join(notes))

  if args.contexts:
    rows = []
    for mixer in args.mixers:
      first_ms = None
      for L in sorted(args.contexts):
        res = bench_decode(mixer, L, args.repeats)
        first_ms = first_ms or res["step_ms"]
        print(f"decode {mixer} L={L} done ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        rows.append(decode_row(mixer, L, res, first_ms))
    print()
    print(f"2. Decode, batch 1: prefill L tokens, then model.step for one token "
          f"(cache max_len L + {DECODE_SLACK})")
    print()
    print(format_table(DECODE_COLUMNS, rows, args.markdown))
  print(f"\ntotal {time.perf_counter() - t0:.0f} s", file=sys.stderr)

if __name__ == "__main__":
  main()
