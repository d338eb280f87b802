r"""Recall grid (MQAR, noisy recall, selective copy): model x task x seed x
learning rate, trained at one sequence length and evaluated at 1x, 2x and 4x.

PYTHONPATH=. .venv/bin/python experiments/recall.py --tasks mqar \
  --models deltanet:1 gla mamba:positive --seeds 0 1 2 --lrs 1e-3 3e-3 \
  --steps 2000 --out runs/recall

The linear-attention family beside its baselines (issue 20's CPU-scale run;
the Based paper's ordering, attention >= Based > plain linear attention, is the
reference; results in BENCHMARKS.md):

PYTHONPATH=. .venv/bin/python experiments/recall.py --tasks mqar \
  --models attention based hedgehog mom retnet deltanet:1 gla --seeds 0 \
  --lrs 1e-3 3e-3 1e-2 --steps 2000 --batch 64 \
  --extra "size=64,num_pairs=8,vocab=512,n_heads=2" --out runs/recall_family

A finished cell is read back from its directory, not retrained, so a stopped
grid resumes, and parts of a grid can run as separate processes (one per core:
``taskset -c 0 ... --models mom based``, ``taskset -c 1 ... --models attention
...``) into the same --out; the same command with the whole grid then only
collects them into results.md.

CPU scale (the issue's learnability check): sequence length 64, 8 pairs,
vocabulary 512, short convolutions on (configs/recall.py defaults). Zoology's
grid (lengths 64-1024, 4-256 pairs, vocabulary 8192) is GPU scale: pass
--extra "size=256,num_pairs=64,vocab=8192". Writes the same files as
experiments/state_tracking.py (see experiments/synthetic_grid.py).
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import recall  # noqa: E402
from experiments import synthetic_grid  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", nargs="+", default=["mqar"])
  p.add_argument("--models", nargs="+", default=["deltanet:1"])
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--extra", default="", help="more configs/recall.py args")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/recall"))
  p.add_argument("--smoke", action="store_true", help="seconds-long runs")
  p.add_argument("--progress", action="store_true")
  args = p.parse_args(argv)
  synthetic_grid.run_grid(
      recall.get_config, args.tasks, args.models, args.seeds, args.lrs,
      steps=args.steps, batch=args.batch, out=args.out, smoke=args.smoke,
      progress=args.progress, extra=args.extra)


if __name__ == "__main__":
  main()
