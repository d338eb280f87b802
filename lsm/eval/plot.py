r"""``lsm-plot``: compare runs in one figure.

lsm-plot runs/gla runs/attention [--metric=loss] [--out=loss.png]
lsm-plot runs/gla runs/attention --positions [--out=position.png]

Default: ``--metric`` (any key of metrics.jsonl: loss, accuracy, grad_norm, lr,
tokens_per_s, ...) against the step (left) and the training tokens seen (right,
steps x batch_size x row length), one line per run, with the held-out
``eval_<metric>`` points marked. ``--positions``: each run's newest
``lsm-eval`` result (``<run>/eval/step_<N>/eval.json``, or an eval.json path),
loss against position in the document (in the row for runs that train across
documents, and for eval.json files written before lsm-eval bucketed by
document), one colour per run and one line style per length. Prints one line
per run: what was plotted.
"""

import json
import sys
from pathlib import Path

from absl import flags

from lsm.train import cli

_METRIC = flags.DEFINE_string("metric", "loss", "metrics.jsonl key to plot.")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: <metric>.png, or "
                           "position.png with --positions, in the working "
                           "directory).")
_POSITIONS = flags.DEFINE_boolean("positions", False, "Plot lsm-eval's loss by "
                                  "position instead of a training metric.")
_LABELS = flags.DEFINE_list("labels", None, "Legend labels, one per run "
                            "(default: the run directories' names).")

PROG = "lsm-plot"
STYLES = ("-", "--", ":", "-.")


def _row_len(config: dict) -> int:
  if config.get("task"):
    from lsm.tasks import TaskConfig, make_task
    task_cfg = TaskConfig(**config["task"])
    return make_task(task_cfg).max_tokens(task_cfg.train_sizes[1])
  return int(config["data"]["seq_len"])


def read_run(run: str, metric: str) -> dict:
  """A run's metric series: {steps, values, eval_steps, eval_values,
  tokens_per_step}."""
  from lsm.train.metrics import read_metrics
  from lsm.train.restore import check_workdir
  workdir = check_workdir(run, flag=f"run {run}")
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    raise cli.UsageError(f"run {run}: has no metrics.jsonl; expected a run "
                         "directory written by lsm-train")
  records = read_metrics(path)
  config = json.loads((workdir / "config.json").read_text())
  series = sorted((s, r[metric]) for s, r in records.items()
                  if r.get(metric) is not None)
  evals = sorted((s, r[f"eval_{metric}"]) for s, r in records.items()
                 if r.get(f"eval_{metric}") is not None)
  if not series and not evals:
    keys = sorted({k for r in records.values() for k in r} - {"step"})
    raise cli.UsageError(f"--metric={metric}: not in {path}; expected one of "
                         f"{keys}")
  return {"steps": [s for s, _ in series], "values": [v for _, v in series],
          "eval_steps": [s for s, _ in evals], "eval_values": [v for _, v in evals],
          "tokens_per_step": int(config["data"]["batch_size"]) * _row_len(config)}


def newest_eval(run: str) -> tuple[Path, dict]:
  path = Path(run)
  if path.is_file():
    candidates = [path]
  else:
    candidates = sorted((path / "eval").glob("step_*/eval.json"),
                        key=lambda p: int(p.parent.name.removeprefix("step_")))
  if not candidates:
    raise cli.UsageError(f"run {run}: has no eval/step_*/eval.json; expected "
                         f"lsm-eval --workdir={run} to have run")
  report = json.loads(candidates[-1].read_text())
  if report.get("kind") != "lm":
    raise cli.UsageError(f"run {run}: {candidates[-1]} is a task evaluation; "
                         "--positions needs a language-model run")
  return candidates[-1], report


def plot_metric(runs, labels, metric: str, out: Path) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
  lines = []
  for i, (run, label) in enumerate(zip(runs, labels)):
    s = read_run(run, metric)
    color = f"C{i}"
    tps = s["tokens_per_step"]
    for ax, scale in ((by_step, 1), (by_tokens, tps)):
      ax.plot([x * scale for x in s["steps"]], s["values"], color=color,
              label=label, lw=1.2)
      if s["eval_steps"]:
        ax.plot([x * scale for x in s["eval_steps"]], s["eval_values"], "o",
                color=color, ms=5, mfc="white", label=f"{label} (eval)")
    last = s["values"][-1] if s["values"] else s["eval_values"][-1]
    lines.append(f"{label}: {len(s['steps'])} points, {len(s['eval_steps'])} "
                 f"eval points, last {metric} {last:.4g}")
  by_step.set_xlabel("step")
  by_tokens.set_xlabel("training tokens")
  for ax in (by_step, by_tokens):
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  by_step.legend(fontsize=8)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  plt.close(fig)
  return lines


def plot_positions(runs, labels, out: Path) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
  lines, train_lengths, where = [], set(), set()
  for i, (run, label) in enumerate(zip(runs, labels)):
    path, report = newest_eval(run)
    train_lengths.add(report["train_length"])
    where.add("document" if report.get("by_document") else "row")
    for j, (length, r) in enumerate(report["results"].items()):
      xs = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
      ax.plot(xs, [b["loss"] for b in r["buckets"]], color=f"C{i}",
              ls=STYLES[j % len(STYLES)], lw=1.2, label=f"{label}, T={length}")
    lines.append(f"{label}: {path} (step {report['step']}), lengths "
                 f"{list(report['results'])}")
  for t in sorted(train_lengths):
    ax.axvline(t, color="0.6", ls=":", lw=1)
  ax.set_xlabel(f"position in {' or '.join(sorted(where))} (tokens); dotted: "
                "training length")
  ax.set_ylabel("held-out loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out)
  plt.close(fig)
  return lines


def main(argv):
  runs = argv[1:]
  if not runs:
    raise cli.UsageError("no runs given; expected lsm-plot RUN [RUN ...]")
  labels = _LABELS.value or [Path(r).name or r for r in runs]
  if len(labels) != len(runs):
    raise cli.UsageError(f"--labels={','.join(labels)}: {len(labels)} labels for "
                         f"{len(runs)} runs; expected one per run")
  default = "position.png" if _POSITIONS.value else f"{_METRIC.value}.png"
  out = Path(_OUT.value or default)
  if out.suffix.lower() != ".png":
    raise cli.UsageError(f"--out={out}: expected a .png path")
  if out.is_dir():
    raise cli.UsageError(f"--out={out}: is a directory; expected a .png path")
  if _POSITIONS.value:
    lines = plot_positions(runs, labels, out)
  else:
    lines = plot_metric(runs, labels, _METRIC.value, out)
  print("\n".join(lines))
  print(f"wrote {out}")


def run():
  cli.run(main, PROG)


if __name__ == "__main__":
  sys.exit(run())
