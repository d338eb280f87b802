r"""What a trained MoM's routed memories contribute on MQAR (issue 27, item 7).

PYTHONPATH=. .venv/bin/python experiments/mom_routing.py \
  runs/mom27/top2/mqar-mom-s0-lr0.003

Reopens a run of experiments/mom_ablation.py (or recall.py --models mom),
draws MQAR sequences at the training length and, for every MoM layer, at the
query positions (where the answer is predicted):

- rms shared / rms routed: the RMS of the shared memory's read and of the
  routed memories' weighted read sum_m g_t^m o_t^m, the two terms the layer
  adds before its output norm;
- write-read overlap: sum_m g_t^m [m chosen at the pair's value token], the
  read weight a query puts on memories its pair was written to. A key-value
  pair is written where the value token is (the short convolution brings the
  key to it), routed by that token; the query is routed by the key token.
  Uniform random top-2 of 4 gives 0.5;
- load: the share of (token, choice) pairs each memory gets.
"""

import argparse
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lsm.layers.mom import MoM  # noqa: E402
from lsm.parallel import sequence  # noqa: E402
from lsm.tasks.recall import MQAR  # noqa: E402
from lsm.train import restore  # noqa: E402


def mqar_batch(task: MQAR, size: int, batch: int, seed: int):
  rng = np.random.default_rng(seed)
  rows = [task._generate(rng, size) for _ in range(batch)]
  return (np.stack([r[0] for r in rows]), np.stack([r[2] for r in rows]))


def layer_stats(layer: MoM, x, inputs, query_mask, num_pairs: int) -> dict:
  q, k, v, _ = layer._qkv(x, None, step=False)
  probs, chosen, weights, mask = layer._routing(x)
  beta, log_g = layer._gates(x, mask)
  o, _ = sequence.delta_rule(q, k, v, beta, log_g=log_g,
                             chunk_size=layer.chunk_size, impl=layer.impl)
  S, H = layer.n_slots, layer.n_heads
  o = np.asarray(o, np.float32).reshape(*o.shape[:2], S, H, o.shape[-1])
  w = np.asarray(weights)  # [B, T, S]: routed g_t^m, then 1 for the shared
  shared = o[:, :, S - 1]
  routed = np.sum(o[:, :, :S - 1] * w[:, :, :S - 1, None, None], axis=2)
  qm = np.asarray(query_mask)
  rms = lambda a: float(np.sqrt(np.mean(a[qm] ** 2)))  # noqa: E731
  # The pair of a query: its key's position j in the pair region (2j), whose
  # value token sits at 2j + 1.
  chosen = np.asarray(chosen)
  overlaps = []
  for b, t in zip(*np.nonzero(qm)):
    j = int(np.nonzero(inputs[b, :2 * num_pairs:2] == inputs[b, t])[0][0])
    overlaps.append(float(np.sum(w[b, t, :S - 1] * chosen[b, 2 * j + 1])))
  load = chosen.reshape(-1, chosen.shape[-1]).mean(0) / layer.top_k
  return {"rms shared": rms(shared), "rms routed": rms(routed),
          "write-read overlap": float(np.mean(overlaps)),
          "load": " ".join(f"{x:.2f}" for x in load)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdirs", nargs="+", type=pathlib.Path)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seed", type=int, default=1234)
  args = p.parse_args(argv)
  for workdir in args.workdirs:
    run = restore.open_run(workdir)
    opts = dict(run.config.task.options)
    task = MQAR(**opts)
    size = run.config.task.train_sizes[0]
    inputs, query_mask = mqar_batch(task, size, args.batch, args.seed)
    captured = []
    call = MoM.__call__

    def recording(self, x, *a, **kw):
      captured.append((self, x))
      return call(self, x, *a, **kw)

    MoM.__call__ = recording
    try:
      run.model(jnp.asarray(inputs))
    finally:
      MoM.__call__ = call
    print(f"{workdir} (step {run.step}):")
    for i, (layer, x) in enumerate(captured):
      stats = layer_stats(layer, x, inputs, query_mask, task.num_pairs)
      print(f"  MoM layer {i}: " + ", ".join(
          f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
          for k, v in stats.items()))


if __name__ == "__main__":
  main()
