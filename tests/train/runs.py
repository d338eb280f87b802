"""Tiny training runs shared by the trainer tests: a generated corpus and a
config small enough to compile and train in seconds on a CPU."""

import json
import pathlib

import ml_collections

from configs import common

# A learnable corpus: counting in words, so a byte model can drive the loss far
# below its starting value within a few dozen steps.
WORDS = "zero one two three four five six seven eight nine".split()


def write_corpus(directory: pathlib.Path, n_files: int = 8) -> str:
  directory.mkdir(parents=True, exist_ok=True)
  for f in range(n_files):
    lines = [" ".join(WORDS[(i + j) % 10] for j in range(8))
             for i in range(f, f + 40)]
    (directory / f"doc{f}.txt").write_text("\n".join(lines) + "\n")
  return str(directory / "*.txt")


def tiny_config(corpus_glob: str, data_dir: str, *, steps: int = 12,
                **sections) -> ml_collections.ConfigDict:
  """A smoke config shrunk further; ``sections`` override fields, e.g.
  ``train={"checkpoint_every": 4}``."""
  c = common.lm_run("mixer=gla,smoke=True")
  c.model.update(d_model=32, n_layers=1, n_heads=2)
  c.data.update(source="local_text", globs=(corpus_glob,), data_dir=data_dir,
                seq_len=32, batch_size=4)
  # A fixed schedule length, so runs of different lengths share their steps.
  c.optim.update(warmup_steps=2, total_steps=100)
  c.train.update(num_steps=steps, log_every=1, eval_every=0, checkpoint_every=4,
                 progress=False)
  for name, values in sections.items():
    c[name].update(values)
  return c


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
