r"""``lsm-eval``: a run's checkpoint on held-out data, at any length.

lsm-eval --workdir=runs/quickstart [--step=N] [--lengths=128,256,512,1024] \
  [--data=text:GLOB | tfds:NAME] [--bucket=16] [--eval_tokens=65536] [--out=DIR] \
  [--harness_tasks=hellaswag,piqa [--harness_include=DIR]] [--teacher=run|DIR]

Language-model runs: held-out loss and perplexity at each length (default 1x,
2x, 4x and 8x the training length), read as rows of that many packed tokens
(exactly as training packs them: each document starts with its start token and
the model restarts at it, as at inference), and the loss by position in the
document in buckets of ``--bucket`` tokens (default: the training length / 8):
position p is the loss of predicting a document's token p + 1 from its tokens
0..p (token 0 is the start token; a document cut by a row boundary continues in
the next row from a fresh state, so its positions there count from that row's
first token). Length extrapolation shows as the curve past the training length
on documents that long. A run trained with ``data.reset_at_boundaries=False``
reads each row as one sequence, and its positions are positions in the row.
Synthetic-task runs: loss, accuracy, sequence and scaled accuracy at each task
size (default: the run's eval sizes). Writes ``eval.json``, ``eval.csv`` and
``eval.png`` (loss vs position, one line per length; accuracy vs size for
tasks) to ``--out`` (default ``<workdir>/eval/step_<N>``).

Linearised students (lsm-linearize): ``--teacher=run`` (the run's recorded
teacher) or ``--teacher=DIR`` (a Hugging Face checkpoint or an lsm run)
evaluates the teacher on the same rows and harness tasks, side by side. Every
language-model report also gives each model's decoding cost
(``decode_profile``): cache bytes per token of context (what grows with the
context: attention's keys and values; 0 for a linear model) and the fixed
part, and greedy decoding tokens/s at batch 1.
"""

import csv
import functools
import json
import logging
import math
import sys
from pathlib import Path

from absl import flags
from absl import logging as absl_logging

from lsm.train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (lsm-train's "
                               "--workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_LENGTHS = flags.DEFINE_string(
    "lengths", None, "Comma-separated row lengths in tokens (task runs: task "
    "sizes). Default: 1x, 2x, 4x, 8x the training length (task runs: the run's "
    "eval sizes).")
_DATA = flags.DEFINE_string(
    "data", "run", "run (the run's held-out split), text:GLOB[;GLOB] (files' "
    "held-out documents; built once under --out) or tfds:NAME (a prepared tfds "
    "dataset).")
_SPLIT = flags.DEFINE_string("split", None, "Split to read (default: the run's "
                             "eval split; 'validation' for --data=text:).")
_BUCKET = flags.DEFINE_integer("bucket", 0, "Tokens per position bucket; 0: "
                               "the training length / 8.", lower_bound=0)
_EVAL_TOKENS = flags.DEFINE_integer(
    "eval_tokens", 65536, "At most this many tokens per length (fewer if the "
    "split is smaller).", lower_bound=1)
_EXAMPLES = flags.DEFINE_integer("examples", 512, "Task runs: examples per "
                                 "size.", lower_bound=1)
_BATCH_TOKENS = flags.DEFINE_integer(
    "batch_tokens", 0, "Tokens per batch; 0: the run's batch_size x seq_len.",
    lower_bound=0)
_OUT = flags.DEFINE_string("out", None, "Output directory (default "
                           "<workdir>/eval/step_<N>).")
_HARNESS_TASKS = flags.DEFINE_string(
    "harness_tasks", None, "Comma-separated lm-eval-harness tasks to run as "
    "well (needs the eval extra: pip install -e '.[eval]').")
_HARNESS_INCLUDE = flags.DEFINE_string(
    "harness_include", None, "A folder of extra lm-eval task YAML files.")
_HARNESS_LIMIT = flags.DEFINE_integer(
    "harness_limit", None, "At most this many examples per harness task.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar.")
_TEACHER = flags.DEFINE_string(
    "teacher", None, "Also evaluate a teacher on the same data: run (a "
    "linearised run's recorded linearize.teacher) or a directory (a Hugging "
    "Face checkpoint or an lsm run).")
_DECODE_TOKENS = flags.DEFINE_integer(
    "decode_tokens", 64, "Tokens decoded (batch 1) to time each model; 0 "
    "skips the decoding profile.", lower_bound=0)

PROG = "lsm-eval"
log = logging.getLogger(__name__)


def parse_ints(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or any(v < 1 for v in values):
    raise cli.UsageError(f"--{flag}={text}: expected comma-separated positive "
                         "ints, e.g. 2048,4096")
  return values


def data_config(run_data, spec: str, split: str | None, out: Path):
  """The run's DataConfig pointed at ``spec``; returns (config, split)."""
  import dataclasses
  if spec == "run":
    return run_data, split or run_data.eval_split
  if spec.startswith("text:") and spec[5:]:
    data = dataclasses.replace(run_data, source="local_text",
                               globs=tuple(spec[5:].split(";")),
                               data_dir=str(out / "tfds"), text_key="text")
    return data, split or "validation"
  if spec.startswith("tfds:") and spec[5:]:
    data = dataclasses.replace(run_data, source="tfds", name=spec[5:],
                               text_key="text")
    return data, split or run_data.eval_split
  raise cli.UsageError(f"--data={spec}: expected run, text:GLOB or tfds:NAME")


def context_positions(segment_ids):
  """Each token's position in its document as a model that restarts at every
  segment start reads it: tokens of its segment before it in the row, int32
  [B, T] (a document continued from the previous row counts from 0 again)."""
  import numpy as np
  seg = np.asarray(segment_ids)
  col = np.broadcast_to(np.arange(seg.shape[-1], dtype=np.int32), seg.shape)
  start = np.ones(seg.shape, bool)
  start[..., 1:] = seg[..., 1:] != seg[..., :-1]
  return (col - np.maximum.accumulate(np.where(start, col, 0), axis=-1)).astype(
      np.int32)


def _position_sums(graphdef, state, inputs, targets, mask, documents=None,
                   bucket_of=None):
  """Per-position sums over rows: nll [T], correct [T], count [T], where a
  target counts at ``bucket_of`` [B, T] (int, in [0, T); None: its column).
  ``documents``: {segment_ids, positions} of packed rows, for a run trained
  with data.reset_at_boundaries (each document on its own), or None."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  model = nnx.merge(graphdef, state)
  logits = model(inputs, **(documents or {}))[0]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  w = mask.astype(jnp.float32)
  right = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  seq_right = jnp.all((right > 0) | (w == 0), axis=-1) & jnp.any(w > 0, axis=-1)
  if bucket_of is None:
    per_position = lambda x: jnp.sum(x, axis=0)  # noqa: E731
  else:
    per_position = lambda x: jnp.zeros(x.shape[-1], x.dtype).at[  # noqa: E731
        bucket_of.reshape(-1)].add(x.reshape(-1))
  return {"nll": per_position(nll * w), "correct": per_position(right * w),
          "count": per_position(w),
          "seq_correct": jnp.sum(seq_right.astype(jnp.float32)),
          "seqs": jnp.sum(jnp.any(w > 0, axis=-1).astype(jnp.float32))}


@functools.lru_cache(maxsize=4)
def _jitted(graphdef):
  import jax
  return jax.jit(functools.partial(_position_sums, graphdef))


def position_sums(model, batches, bar=None, documents: bool = False) -> dict:
  """Sums of ``_position_sums`` over ``batches`` (numpy dicts), as numpy; with
  ``documents`` the model sees the rows' segment_ids and positions and the sums
  are by position in the document (``context_positions``), else by column."""
  import jax
  import numpy as np
  from flax import nnx
  graphdef, state = nnx.split(model)
  fn, total = _jitted(graphdef), None
  for batch in batches:
    docs = bucket_of = None
    if documents:
      docs = {k: batch[k] for k in ("segment_ids", "positions")}
      bucket_of = context_positions(batch["segment_ids"])
    out = jax.device_get(fn(state, batch["inputs"], batch["targets"],
                            batch["mask"], docs, bucket_of))
    out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    total = out if total is None else {k: total[k] + out[k] for k in out}
    if bar is not None:
      bar.update(1)
  return total


def _take(iterator, n_batches: int):
  for _ in range(n_batches):
    batch = next(iterator, None)
    if batch is None:
      return
    yield batch


def summarize_lm(sums: dict, length: int, bucket: int) -> dict:
  """Overall and per-bucket loss of one length's position sums."""
  count = float(sums["count"].sum())
  loss = float(sums["nll"].sum()) / max(count, 1.0)
  buckets = []
  for start in range(0, length, bucket):
    end = min(start + bucket, length)
    n = float(sums["count"][start:end].sum())
    if n:
      b_loss = float(sums["nll"][start:end].sum()) / n
      buckets.append({"start": start, "end": end, "tokens": int(n),
                      "loss": b_loss, "perplexity": math.exp(min(b_loss, 700))})
  return {"loss": loss, "perplexity": math.exp(min(loss, 700)),
          "accuracy": float(sums["correct"].sum()) / max(count, 1.0),
          "tokens": int(count), "rows": int(sums["seqs"]), "buckets": buckets}


def evaluate_lm(run, lengths, *, data, split, eval_tokens, batch_tokens, bucket,
                progress=True) -> dict:
  """Loss / perplexity and per-position buckets at each length."""
  import dataclasses
  from tqdm import tqdm
  from lsm.data.pipeline import make_dataset
  plan = []
  for length in lengths:
    rows = max(1, batch_tokens // length)
    n_batches = max(1, math.ceil(math.ceil(eval_tokens / length) / rows))
    # In order, one pass, no background threads; train_split renamed so that
    # any split (the training split too) is read once, not shuffled forever
    # (so no row shuffle either: its window need not fit the new batch size).
    cfg = dataclasses.replace(data, seq_len=length, batch_size=rows,
                              shards=None, prefetch_batches=0, num_threads=0,
                              train_split="<lsm-eval: none>",
                              row_shuffle_window=0)
    plan.append((length, cfg, n_batches))
  bar = tqdm(total=sum(p[2] for p in plan), unit="batch", disable=not progress,
             dynamic_ncols=True, desc="lsm-eval")
  results = {}
  try:
    for length, cfg, n_batches in plan:
      try:
        ds = make_dataset(cfg, split)
        batches = list(_take(iter(ds), n_batches))
      except ValueError as e:
        raise cli.UsageError(f"--data / --split={split}: {cli.one_line(e)}") from None
      if not batches:
        raise cli.UsageError(f"--split={split}: no rows of {length} tokens")
      bar.total -= n_batches - len(batches)
      sums = position_sums(run.model, batches, bar,
                           documents=data.reset_at_boundaries)
      results[str(length)] = {**summarize_lm(sums, length, bucket),
                              "batch_rows": cfg.batch_size,
                              "batches": len(batches)}
      bar.set_postfix({f"loss@{length}": f"{results[str(length)]['loss']:.3f}"})
  finally:
    bar.close()
  return results


def _tree_bytes(tree) -> int:
  import jax
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def decode_profile(model, context: int, n_tokens: int) -> dict:
  """A model's decoding cost: cache bytes per token of context (the growth
  from ``context`` to 2 ``context`` positions) and at ``context``, and greedy
  tokens/s at batch 1 over ``n_tokens`` (compiled first, then timed)."""
  import time
  import jax
  import jax.numpy as jnp
  from lsm.models.decoding import generate
  small = _tree_bytes(jax.eval_shape(lambda: model.init_cache(1, context)))
  large = _tree_bytes(jax.eval_shape(lambda: model.init_cache(1, 2 * context)))
  out = {"cache_bytes_per_token": (large - small) / context,
         "cache_bytes_at_context": small, "context": context}
  if n_tokens:
    prompt = jnp.ones((1, 1), jnp.int32)
    generate(model, prompt, max_new_tokens=n_tokens).block_until_ready()
    start = time.perf_counter()
    generate(model, prompt, max_new_tokens=n_tokens).block_until_ready()
    out["decode_tokens_per_s"] = n_tokens / (time.perf_counter() - start)
  return out


def load_teacher(spec: str, config):
  """(label, model) of ``--teacher``: "run" (the linearised run's recorded
  teacher) or a directory (Hugging Face checkpoint or lsm run)."""
  from types import SimpleNamespace
  from lsm.models import hf
  from lsm.train import restore
  if spec == "run":
    if config.linearize is None:
      raise cli.UsageError("--teacher=run: this run records no teacher (no "
                           "linearize section); expected --teacher=DIR")
    spec = config.linearize.teacher
  path = Path(spec)
  if not (path / "config.json").is_file():
    raise cli.UsageError(f"--teacher={spec}: no config.json there; expected a "
                         "Hugging Face checkpoint or an lsm run directory")
  if "model_type" in json.loads((path / "config.json").read_text()):
    try:
      model, _ = hf.load(path)
    except ValueError as e:
      raise cli.UsageError(f"--teacher={spec}: {cli.one_line(e)}") from None
    return str(path), SimpleNamespace(model=model)
  return str(path), restore.open_run(path)


def task_source(run, task, size: int, examples: int):
  """The held-out examples of ``size``: the trainer's own eval stream for its
  eval sizes, a distinct seeded stream for any other size."""
  from lsm.tasks.base import TaskSource
  sizes = list(run.config.task.eval_sizes)
  index = sizes.index(size) if size in sizes else len(sizes) + size
  return TaskSource(task, seed=run.config.data.seed + 1_000_003 * (index + 1),
                    sizes=(size, size), num_records=examples)


def evaluate_task(run, sizes, *, examples, batch_tokens, progress=True) -> dict:
  """Loss and token / sequence / scaled accuracy at each task size."""
  import dataclasses
  from tqdm import tqdm
  from lsm.data.pipeline import make_dataset
  from lsm.tasks import make_task
  from lsm.tasks.metrics import scaled_accuracy
  task = make_task(run.config.task)
  results = {}
  bar = tqdm(total=len(sizes), unit="size", disable=not progress,
             dynamic_ncols=True, desc="lsm-eval")
  try:
    for size in sizes:
      try:
        source = task_source(run, task, size, examples)
      except ValueError as e:
        raise cli.UsageError(f"--lengths: size {size}: {cli.one_line(e)}") from None
      rows = max(1, min(examples, batch_tokens // source.seq_len))
      cfg = dataclasses.replace(run.config.data, batch_size=rows, shards=None,
                                prefetch_batches=0, num_threads=0,
                                row_shuffle_window=0)
      batches = list(iter(make_dataset(cfg, cfg.eval_split, source=source)))
      sums = position_sums(run.model, batches)
      count = max(float(sums["count"].sum()), 1.0)
      acc = float(sums["correct"].sum()) / count
      results[str(size)] = {
          "loss": float(sums["nll"].sum()) / count, "accuracy": acc,
          "sequence_accuracy": float(sums["seq_correct"]) / max(
              float(sums["seqs"]), 1.0),
          "scaled_accuracy": scaled_accuracy(acc, task.chance),
          "examples": int(sums["seqs"]), "tokens": int(sums["count"].sum())}
      bar.update(1)
  finally:
    bar.close()
  return results


def write_outputs(out: Path, report: dict):
  """eval.json, eval.csv and eval.png in ``out``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  out.mkdir(parents=True, exist_ok=True)
  (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
  results = report["results"]
  with open(out / "eval.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    if report["kind"] == "lm":
      w.writerow(["length", "start", "end", "tokens", "loss", "perplexity"])
      for length, r in results.items():
        w.writerow([length, 0, length, r["tokens"], r["loss"], r["perplexity"]])
        for b in r["buckets"]:
          w.writerow([length, b["start"], b["end"], b["tokens"], b["loss"],
                      b["perplexity"]])
    else:
      keys = ["loss", "accuracy", "sequence_accuracy", "scaled_accuracy",
              "examples"]
      w.writerow(["size", *keys])
      for size, r in results.items():
        w.writerow([size, *(r[k] for k in keys)])
  fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
  if report["kind"] == "lm":
    for length, r in results.items():
      xs = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
      ax.plot(xs, [b["loss"] for b in r["buckets"]], marker=".",
              label=f"length {length} (loss {r['loss']:.3f})")
    ax.axvline(report["train_length"], color="0.6", ls=":", lw=1)
    ax.set_xlabel("position in document (tokens)" if report["by_document"]
                  else "position in row (tokens)")
    ax.set_ylabel("loss (nats / token)")
  else:
    sizes = [int(s) for s in results]
    ax.plot(sizes, [results[str(s)]["scaled_accuracy"] for s in sizes],
            marker="o", label="scaled accuracy")
    ax.plot(sizes, [results[str(s)]["accuracy"] for s in sizes], marker="s",
            label="accuracy")
    ax.set_xlabel("task size")
    ax.set_ylabel("accuracy")
  ax.set_title(f"{report['workdir']} @ step {report['step']}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "eval.png")
  plt.close(fig)


def main(argv):
  cli.check_args(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)  # tfds / orbax chatter
  logging.getLogger("lsm").setLevel(logging.INFO)
  from lsm.train import restore
  workdir = restore.check_workdir(_WORKDIR.value)
  _, config = restore.read_config(workdir)
  step = restore.check_step(workdir, _STEP.value)
  is_task = config.data.source == "task"
  if _LENGTHS.value:
    lengths = parse_ints(_LENGTHS.value, "lengths")
  elif is_task:
    lengths = list(config.task.eval_sizes) or [config.task.train_sizes[1]]
  else:
    lengths = [config.data.seq_len * k for k in (1, 2, 4, 8)]
  out = Path(_OUT.value) if _OUT.value else workdir / "eval" / f"step_{step}"
  if out.exists() and not out.is_dir():
    raise cli.UsageError(f"--out={out}: is a file; expected a directory")
  if is_task and _DATA.value != "run":
    raise cli.UsageError(f"--data={_DATA.value}: a synthetic-task run is "
                         "evaluated on its task; expected run")
  harness_tasks = [t for t in (_HARNESS_TASKS.value or "").split(",") if t]
  if harness_tasks:
    if is_task:
      raise cli.UsageError(f"--harness_tasks={_HARNESS_TASKS.value}: needs a "
                           "text run; this one trains a synthetic task")
    from lsm.eval import harness
    harness.require_lm_eval("--harness_tasks")
  data, split = (None, None) if is_task else data_config(
      config.data, _DATA.value, _SPLIT.value, out)
  bucket = _BUCKET.value or max(1, config.data.seq_len // 8)
  batch_tokens = _BATCH_TOKENS.value or config.data.batch_size * config.data.seq_len
  if _TEACHER.value and is_task:
    raise cli.UsageError(f"--teacher={_TEACHER.value}: needs a text run; this "
                         "one trains a synthetic task")
  teacher_label, teacher = (load_teacher(_TEACHER.value, config)
                            if _TEACHER.value else (None, None))
  run = restore.open_run(workdir, step)
  if teacher is not None and teacher.model.cfg.vocab_size != run.model.cfg.vocab_size:
    raise cli.UsageError(f"--teacher={_TEACHER.value}: its vocabulary differs "
                         "from the run's; expected the model it was linearised "
                         "from")
  report = {"workdir": str(workdir), "step": run.step,
            "kind": "task" if is_task else "lm",
            "train_length": config.data.seq_len}
  if is_task:
    report["task"] = config.task.name
    report["results"] = evaluate_task(run, lengths, examples=_EXAMPLES.value,
                                      batch_tokens=batch_tokens,
                                      progress=_PROGRESS.value)
  else:
    report.update(data=_DATA.value, split=split, bucket=bucket,
                  eval_tokens=_EVAL_TOKENS.value,
                  # Buckets are positions in the document (else in the row).
                  by_document=bool(data.reset_at_boundaries))
    report["results"] = evaluate_lm(
        run, lengths, data=data, split=split, eval_tokens=_EVAL_TOKENS.value,
        batch_tokens=batch_tokens, bucket=bucket, progress=_PROGRESS.value)
    report["decode"] = decode_profile(run.model, max(lengths),
                                      _DECODE_TOKENS.value)
  if harness_tasks:
    from lsm.eval import harness
    report["harness"] = harness.run_tasks(
        run, harness_tasks, include_path=_HARNESS_INCLUDE.value,
        limit=_HARNESS_LIMIT.value)
  if teacher is not None:
    side = {"model": teacher_label, "results": evaluate_lm(
        teacher, lengths, data=data, split=split, eval_tokens=_EVAL_TOKENS.value,
        batch_tokens=batch_tokens, bucket=bucket, progress=_PROGRESS.value),
            "decode": decode_profile(teacher.model, max(lengths),
                                     _DECODE_TOKENS.value)}
    if harness_tasks:
      from lsm.eval import harness
      from types import SimpleNamespace
      # The student's tokenizer and lengths: the teacher reads the same text.
      side["harness"] = harness.run_tasks(
          SimpleNamespace(model=teacher.model, tokenizer=run.tokenizer,
                          config=run.config), harness_tasks, include_path=_HARNESS_INCLUDE.value,
          limit=_HARNESS_LIMIT.value)
    report["teacher"] = side
  write_outputs(out, report)
  for key, r in report["results"].items():
    if is_task:
      print(f"size {key}: accuracy {r['accuracy']:.4f}, scaled accuracy "
            f"{r['scaled_accuracy']:.4f}, sequence accuracy "
            f"{r['sequence_accuracy']:.4f} ({r['examples']} examples)")
    else:
      t = report.get("teacher", {}).get("results", {}).get(key)
      print(f"length {key}: loss {r['loss']:.4f}, perplexity "
            f"{r['perplexity']:.2f} ({r['tokens']} tokens)"
            + (f"; teacher loss {t['loss']:.4f}, perplexity "
               f"{t['perplexity']:.2f}" if t else ""))
  for name, side in (("model", report), ("teacher", report.get("teacher"))):
    d = (side or {}).get("decode")
    if d:
      print(f"{name} decoding: {d['cache_bytes_per_token']:,.0f} cache bytes per "
            f"token of context, {d['cache_bytes_at_context']:,} at "
            f"{d['context']} tokens"
            + (f", {d['decode_tokens_per_s']:,.1f} tokens/s (batch 1)"
               if "decode_tokens_per_s" in d else ""))
  for task, metrics in report.get("harness", {}).items():
    print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                  if isinstance(v, float)))
  print(f"wrote {out / 'eval.json'}, eval.csv, eval.png")


def run():
  cli.run(main, PROG)


if __name__ == "__main__":
  sys.exit(run())
