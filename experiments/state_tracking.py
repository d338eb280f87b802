r"""State-tracking grid: model x eigenvalue range x task x seed x learning rate,
trained with lsm's trainer and evaluated far beyond the training lengths.

PYTHONPATH=. .venv/bin/python experiments/state_tracking.py --tasks parity \
  --models deltanet:1 deltanet:2 mamba:positive mamba:signed --seeds 0 1 2 \
  --lrs 1e-3 3e-3 --steps 1500 --out runs/state_tracking

Each cell trains ``configs/state_tracking.py`` (train lengths 3-40, test 40-256
in Grazzi et al.'s units) for every learning rate and keeps the best rate (by
mean scaled accuracy over the test lengths, as the papers report their best
runs); across seeds it reports the best and the median. Writes into --out:
runs.csv (every run and test length), results.md and results.csv (one row per
model x task, published numbers beside ours) and, when matplotlib is
installed, accuracy_vs_length.png.

Models: see experiments/synthetic_grid.py (deltanet:1, deltanet:2,
mamba:positive, mamba:signed, deltaproduct:NH:RANGE, kda:2, rwkv7, ...).

The DeltaProduct paper's word problems (Siems et al. 2025: one layer, train to
length 128, test to 512) on S3, S4, A5 and S5:

PYTHONPATH=. .venv/bin/python experiments/state_tracking.py --tasks permutation \
  --extra group=S3,train_max=128,test_max=512 --models deltanet:2 \
  deltaproduct:2:1 deltaproduct:2:2 deltaproduct:3:2 deltaproduct:4:2 kda:2 \
  rwkv7 --seeds 0 1 2 --lrs 3e-3 --out runs/state_tracking_s3

with one --out per group: run directories are named by task, model, seed and
learning rate, not by the --extra args (a second group in the same --out is
refused as another config).
"""

import argparse
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import state_tracking  # noqa: E402
from experiments import synthetic_grid  # noqa: E402
from lsm.tasks import TaskConfig, make_task  # noqa: E402
from lsm.tasks.base import TaskSource  # noqa: E402
from lsm.train import loop  # noqa: E402

# Grazzi et al. 2024, Table 3 (scaled accuracy on test lengths 40-256, best run).
PUBLISHED = {
    ("parity", "mamba:positive"): 0.000, ("parity", "mamba:signed"): 1.000,
    ("parity", "deltanet:1"): 0.017, ("parity", "deltanet:2"): 1.000,
    ("modular_arithmetic", "deltanet:1"): 0.314,
    ("modular_arithmetic", "deltanet:2"): 0.971,
}
LABELS = {"deltanet:1": "DeltaNet [0, 1]", "deltanet:2": "DeltaNet [-1, 1]",
          "mamba:positive": "Mamba [0, 1]", "mamba:signed": "Mamba [-1, 1]"}
_RANGES = {1.0: "[0, 1]", 2.0: "[-1, 1]"}


def label(model: str) -> str:
  """A table label of a model name: LABELS, DeltaProduct / KDA with their
  eigenvalue range, else the name."""
  if model in LABELS:
    return LABELS[model]
  mixer, _, value = model.partition(":")
  if mixer == "deltaproduct":
    n_h, _, scale = value.partition(":")
    scale = float(scale or 1)
    rng = _RANGES.get(scale, f"beta_scale {scale:g}")
    return f"DeltaProduct n_h={n_h} {rng}"
  if mixer == "kda" and value:
    return f"KDA {_RANGES.get(float(value), f'beta_scale {value}')}"
  return {"rwkv7": "RWKV-7", "kda": "KDA [0, 1]"}.get(model, model)


def parity_pair(out: pathlib.Path, *, steps: int = 600, lr: float = 3e-3,
                seed: int = 0, smoke: bool = False) -> dict[str, tuple]:
  """DeltaNet with beta in [0, 1] and in [0, 2] on parity (the notebook's
  experiment). Returns {model: ({test size: eval metrics}, config, workdir)}."""
  pair = {}
  for model in ("deltanet:1", "deltanet:2"):
    kwargs = dict(steps=steps, batch=128, out=out, smoke=smoke)
    results = synthetic_grid.run_one(state_tracking.get_config, "parity", model,
                                     seed, lr, **kwargs)
    config, workdir = synthetic_grid.cell(state_tracking.get_config, "parity",
                                          model, seed, lr, **kwargs)
    pair[model] = (results, config, workdir)
  return pair


def _fresh_examples(config, *, size: int, n: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets), int32 [n, size] each: fresh examples of the run's task
  (a seed stream neither training nor evaluation uses)."""
  task = make_task(TaskConfig(**config.task.to_dict()))
  source = TaskSource(task, seed=seed, sizes=(size, size))
  examples = [source[i] for i in range(n)]
  return (np.stack([e["inputs"] for e in examples]),
          np.stack([e["targets"] for e in examples]))


def learned_eigenvalues(config, workdir, *, size: int = 64, n: int = 64,
                        seed: int = 12345) -> dict[str, np.ndarray]:
  """Eigenvalues of the trained layers' transitions on fresh examples.

  For DeltaNet layers, 1 - beta_t per token and head (the eigenvalue of
  I - beta_t k_t k_t^T along k_t; the others are 1); for Mamba layers, the
  decays a_t. Returns {"layer<i>/bit<b>": values} split by the input token's
  bit for parity (so the two populations the model should separate, flip on 1
  and keep on 0, show up as two clusters), else {"layer<i>": values}.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _, model = loop.load_model(config, workdir, devices=jax.devices()[:1])
  tokens, _ = _fresh_examples(config, size=size, n=n, seed=seed)
  x = model.embed(jnp.asarray(tokens))
  out = {}
  for i, block in enumerate(model.blocks):
    h = block.mixer_norm(x)
    if hasattr(block.mixer, "beta_scale"):
      eig = 1.0 - np.asarray(block.mixer.decays(h)[0])       # [n, T, H]
    else:
      eig = np.asarray(block.mixer.decays(h))                # [n, T, E, N]
    if config.task.name == "parity":
      for bit in (0, 1):
        out[f"layer{i}/bit{bit}"] = eig[tokens == 1 + bit].ravel()
    else:
      out[f"layer{i}"] = eig.ravel()
    x, _ = block(x)
  return out


def parity_mechanism(config, workdir, *, size: int = 255, n: int = 256,
                     seed: int = 12345) -> dict[str, np.ndarray]:
  """How a trained parity run computes parity, and where it stops.

  A model trained in the final-answer format must answer at every position
  (any prefix is a valid training sequence), so one pass over n fresh strings
  of ``size`` bits gives its accuracy at every length up to ``size``.

  Returns:
    "position_accuracy": float [size], the accuracy at position t against the
      parity of bits[:t + 1].
    "layer<i>/key_cos": float [H] (DeltaNet layers), the cosine between the
      mean key of bit-0 tokens and the mean key of bit-1 tokens per head. Exact
      parity in one layer: bit 1 reflects along k1 (beta = 2) and bit 0 leaves
      that direction alone (beta = 0, or keys orthogonal to k1: cosine 0).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if config.task.name != "parity":
    raise ValueError(f"parity_mechanism: config.task.name="
                     f"{config.task.name!r}; expected 'parity'")
  _, model = loop.load_model(config, workdir, devices=jax.devices()[:1])
  tokens, _ = _fresh_examples(config, size=size, n=n, seed=seed)
  bits = tokens - 1
  out = {}
  # One pass: the keys of each DeltaNet layer on the way, the logits at the end.
  x = model.embed(jnp.asarray(tokens))
  for i, block in enumerate(model.blocks):
    if hasattr(block.mixer, "beta_scale"):
      _, k, _, _ = block.mixer._qkv(block.mixer_norm(x), None, step=False)
      k = np.asarray(k)                                      # [n, T, H, K]
      m0, m1 = k[bits == 0].mean(0), k[bits == 1].mean(0)    # [H, K]
      out[f"layer{i}/key_cos"] = (m0 * m1).sum(-1) / (
          np.linalg.norm(m0, axis=-1) * np.linalg.norm(m1, axis=-1))
    x, _ = block(x)
  logits = np.asarray(model._logits(x))
  # The answer token (1 + parity) against the argmax over the whole vocabulary,
  # as the trainer's eval accuracy counts it.
  answer = 1 + np.cumsum(bits, 1) % 2
  out["position_accuracy"] = (logits.argmax(-1) == answer).mean(0)
  return out


def permutation_sign(config, workdir, *, size: int = 256, n: int = 128,
                     seed: int = 12345) -> dict[str, np.ndarray]:
  """Whether a trained permutation run tracks the element or only its sign.

  The sign of a permutation is a homomorphism onto Z2, so tracking it is a
  parity problem (a negative eigenvalue is needed); with the sign exact and the
  rest guessed, S3 accuracy is 1/3.

  Returns float [size] arrays over n fresh examples of ``size`` elements:
  "position_accuracy" (the predicted element is the running product) and
  "sign_agreement" (the predicted element has the running product's sign).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lsm.tasks.permutation import ELEMENT0, element_is_even  # pylint: disable=g-import-not-at-top
  if config.task.name != "permutation":
    raise ValueError(f"permutation_sign: config.task.name="
                     f"{config.task.name!r}; expected 'permutation'")
  even = element_is_even(config.task.options.get("group", "S5"))
  _, model = loop.load_model(config, workdir, devices=jax.devices()[:1])
  tokens, targets = _fresh_examples(config, size=size, n=n, seed=seed)
  truth = targets - ELEMENT0
  logits = np.asarray(model(jnp.asarray(tokens))[0])
  # Argmax over the element tokens only, so every prediction has a sign.
  pred = logits[..., ELEMENT0:ELEMENT0 + len(even)].argmax(-1)
  return {"position_accuracy": (pred == truth).mean(0),
          "sign_agreement": (even[pred] == even[truth]).mean(0)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", nargs="+", default=["parity"])
  p.add_argument("--models", nargs="+", default=list(LABELS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--extra", default="", help="more configs/state_tracking.py "
                 "args, e.g. group=A5 for --tasks permutation")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(
      "runs/state_tracking"))
  p.add_argument("--smoke", action="store_true", help="seconds-long runs")
  p.add_argument("--progress", action="store_true")
  args = p.parse_args(argv)
  synthetic_grid.run_grid(
      state_tracking.get_config, args.tasks, args.models, args.seeds, args.lrs,
      steps=args.steps, batch=args.batch, out=args.out, smoke=args.smoke,
      progress=args.progress, published=PUBLISHED,
      labels={m: label(m) for m in args.models},
      extra=args.extra)


if __name__ == "__main__":
  main()
