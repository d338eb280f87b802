"""The grid runner shared by experiments/state_tracking.py and recall.py: train
every (task, model, seed, learning rate) with lsm's trainer, keep each seed's
best learning rate (a grid is only as good as its learning rates), report the
best and median over seeds per test size, and write runs.csv, results.csv,
results.md and (with matplotlib) accuracy_vs_length.png.

Models are named MIXER:VALUE: deltanet:1 (beta in [0, 1]: eigenvalues of
I - beta k k^T in [0, 1]), deltanet:2 (beta in [0, 2]: [-1, 1]),
deltaproduct:NH:RANGE (DeltaProduct with NH Householder steps per token, 1-4,
and beta_scale RANGE: deltaproduct:3:2 is n_h = 3 with eigenvalues in [-1, 1];
configs that take n_h, i.e. configs/state_tracking.py),
mamba:positive / mamba:signed (decays in (0, 1) / (-1, 1)), mamba2:positive /
mamba2:signed likewise, rwkv7 (no value: RWKV-7 has no eigenvalue range to
set), or any other lsm mixer name with an optional beta_scale (kda:2).
"""

import csv
import json
import pathlib
import statistics
import sys

from lsm.train import loop
from lsm.train import metrics as metrics_lib


def model_arg(model: str) -> str:
  """The config arg (``mixer=...`` and its options) of a model name (module
  docstring)."""
  mixer, _, value = model.partition(":")
  if mixer == "deltanet":
    return f"mixer=delta_net,beta_scale={float(value or 1)}"
  if mixer == "deltaproduct":
    n_h, _, scale = value.partition(":")
    if n_h not in ("1", "2", "3", "4") or not _is_float(scale or "1"):
      raise ValueError(f"model {model!r}: expected deltaproduct:NH:RANGE with "
                       "NH in 1-4 and RANGE the beta_scale (1: eigenvalues in "
                       "[0, 1], 2: [-1, 1]), e.g. deltaproduct:2:2")
    return f"mixer=delta_product,n_h={n_h},beta_scale={float(scale or 1)}"
  if mixer == "rwkv7" and value:
    raise ValueError(f"model {model!r}: RWKV-7 has no beta_scale (its "
                     "transition's eigenvalue range is the paper's); name it "
                     "rwkv7")
  if mixer in ("mamba", "mamba2"):
    return f"mixer={mixer},eigenvalues={value or 'positive'}"
  return f"mixer={mixer}" + (f",beta_scale={float(value)}" if value else "")


def _is_float(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def cell(get_config, task: str, model: str, seed: int, lr: float, *,
         steps: int, batch: int, out: pathlib.Path, smoke: bool = False,
         extra: str = ""):
  """(config, workdir) of one run of ``get_config`` (a configs/ module's)."""
  arg = (f"task={task},{model_arg(model)},seed={seed},lr={lr},steps={steps},"
         f"batch_size={batch},smoke={smoke}" + (f",{extra}" if extra else ""))
  name = f"{task}-{model.replace(':', '_')}-s{seed}-lr{lr:g}"
  return get_config(arg), pathlib.Path(out) / name


# train options that change how a run reports, not what it computes
_REPORTING = ("progress", "start_fresh", "async_checkpoints", "log_every")


def _check_same_run(config, workdir: pathlib.Path):
  """Raises if ``workdir`` holds a run of another config (loop.train would
  resume it under the new one, e.g. a longer schedule on a finished run)."""
  path = workdir / "config.json"
  if not path.exists():
    return
  stored = json.loads(path.read_text())
  now = loop.run_record(config, workdir, {"config": stored})
  diffs = []
  for section in sorted(set(stored) | set(now)):
    a, b = stored.get(section) or {}, now.get(section) or {}
    for key in sorted(set(a) | set(b)):
      if a.get(key) != b.get(key) and not (section == "train"
                                           and key in _REPORTING):
        diffs.append(f"{section}.{key}={a.get(key)!r} (this grid: "
                     f"{b.get(key)!r})")
  if diffs:
    raise ValueError(f"{workdir} holds a run of another config: "
                     f"{', '.join(diffs)}; pass another --out (or remove "
                     "that directory) to run this grid")


def final_results(config, workdir: pathlib.Path) -> dict[int, dict] | None:
  """{test size: eval metrics} logged at the run's last step in
  ``workdir/metrics.jsonl``, or None if the run has not finished."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  last = metrics_lib.read_metrics(path).get(config.train.num_steps, {})
  results = {}
  for size in config.task.eval_sizes:
    prefix = f"eval_{size}_"
    results[size] = {k[len(prefix):]: v for k, v in last.items()
                     if k.startswith(prefix)}
    if "scaled_accuracy" not in results[size]:
      return None
  return results


def run_one(get_config, task: str, model: str, seed: int, lr: float, *,
            steps: int, batch: int, out: pathlib.Path, smoke: bool = False,
            progress: bool = False, extra: str = "") -> dict[int, dict]:
  """Trains one run (see ``cell``); returns {test size: final eval metrics}.

  A run that already finished in its directory (same config, final
  evaluation logged) is read back instead of retrained, so a grid stopped
  part way resumes where it stopped, and cells run by separate processes into
  one ``out`` are collected by a last call with the whole grid. A directory
  holding another config raises (see ``_check_same_run``)."""
  config, workdir = cell(get_config, task, model, seed, lr, steps=steps,
                         batch=batch, out=out, smoke=smoke, extra=extra)
  config.train.progress = progress
  _check_same_run(config, workdir)
  results = final_results(config, workdir)
  if results is not None:
    print(f"{workdir.name}: finished earlier, read from metrics.jsonl",
          flush=True)
    return results
  loop.train(config, workdir)
  results = final_results(config, workdir)
  if results is None:
    raise RuntimeError(f"{workdir}: no final evaluation in metrics.jsonl")
  return results


def run_grid(get_config, tasks, models, seeds, lrs, *, steps, batch,
             out: pathlib.Path, smoke=False, progress=False, extra: str = "",
             published=None, labels=None) -> tuple[list[dict], list[dict]]:
  """Every (task, model, seed, lr) run; for each seed the best lr (by mean
  scaled accuracy over the test sizes); returns (per-run rows, per model x task
  summary rows) and writes them into ``out``."""
  published, labels = published or {}, labels or {}
  out.mkdir(parents=True, exist_ok=True)
  runs, summary = [], []
  for task in tasks:
    for model in models:
      per_seed = []
      for seed in seeds:
        best = None
        for lr in lrs:
          res = run_one(get_config, task, model, seed, lr, steps=steps,
                        batch=batch, out=out, smoke=smoke, progress=progress,
                        extra=extra)
          mean = statistics.fmean(r["scaled_accuracy"] for r in res.values())
          for size, r in res.items():
            runs.append({"task": task, "model": model, "seed": seed, "lr": lr,
                         "size": size, **r})
          print(f"{task} {model} seed={seed} lr={lr:g}: mean scaled accuracy "
                f"{mean:.3f} " + " ".join(f"{s}:{r['scaled_accuracy']:.3f}"
                                          for s, r in res.items()), flush=True)
          if best is None or mean > best[0]:
            best = (mean, lr, res)
        per_seed.append(best)
      means = [b[0] for b in per_seed]
      summary.append({
          "task": task, "model": model, "label": labels.get(model, model),
          "best": max(means), "median": statistics.median(means),
          "seeds": len(means), "best_lr": per_seed[means.index(max(means))][1],
          "published": published.get((task, model)),
          "by_size": per_seed[means.index(max(means))][2]})
  budget = ("smoke runs (30 steps at batch 16)" if smoke else
            f"{steps} steps at batch {batch}")
  write_outputs(runs, summary, out, budget=budget, lrs=lrs)
  return runs, summary


def write_outputs(runs, summary, out: pathlib.Path, *, budget: str, lrs):
  with open(out / "runs.csv", "w", newline="") as f:
    keys = sorted({k for r in runs for k in r})
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(runs)
  with open(out / "results.csv", "w", newline="") as f:
    keys = ["task", "model", "best", "median", "seeds", "best_lr", "published"]
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(summary)
  sizes = sorted({s for r in summary for s in r["by_size"]})
  lines = [f"Scaled accuracy on test sizes (mean over sizes {sizes}); best "
           f"learning rate of {list(lrs)} per seed; {budget}.", "",
           "| task | model | best | median | seeds | best lr | published | " + " | ".join(f"size {s}" for s in sizes)
           + " |", "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(sizes)]
  for r in summary:
    pub = "n/a" if r["published"] is None else f"{r['published']:.3f}"
    by = " | ".join(f"{r['by_size'][s]['scaled_accuracy']:.3f}" for s in sizes)
    lines.append(f"| {r['task']} | {r['label']} | {r['best']:.3f} | "
                 f"{r['median']:.3f} | {r['seeds']} | {r['best_lr']:g} | {pub} | "
                 f"{by} |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  try:
    import matplotlib  # optional: pip install matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no accuracy_vs_length.png", file=sys.stderr)
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in summary:
    xs = sorted(r["by_size"])
    ax.plot(xs, [r["by_size"][s]["scaled_accuracy"] for s in xs], marker="o",
            label=f"{r['task']}: {r['label']}")
  ax.set_xlabel("test size")
  ax.set_ylabel("scaled accuracy (best seed)")
  ax.set_xscale("log")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "accuracy_vs_length.png", dpi=120)


