r"""State tracking (Grazzi et al. 2024; Merrill et al. 2024; Deletang et al. 2023):
train on short sequences, evaluate far longer ones. Run:

lsm-train --config=configs/state_tracking.py:task=parity,mixer=delta_net,beta_scale=2 \
  --workdir=runs/parity_deltanet_neg

Args (``:arg``): task (parity, modular_arithmetic, modular_arithmetic_brackets,
permutation), group (permutation: S3, S4, S5, A5, Z60, S5_swaps), mixer (any
lsm.layers mixer), beta_scale (the delta-rule mixers: 1 gives eigenvalues in
[0, 1], 2 in [-1, 1]), n_h (delta_product: Householder steps per token, 1-4),
gated (delta_product: the per-head decay of Gated DeltaProduct; off by default,
as in the DeltaProduct paper's state-tracking runs, where a decay would only
fade the state), eigenvalues (Mamba decays: positive or signed), train_max and
test_max (the longest training and test lengths, below), d_model, n_layers,
n_heads, steps, batch_size, lr, weight_decay (AdamW, on matrices), seed, smoke
(seconds on a CPU), paper (the papers' budget: 100k steps at batch 1024; GPU
scale), dt_min and dt_max (Mamba's initial step-size range).

n_heads defaults to 4: each DeltaNet head is an independent chance to find the
exact one-layer parity solution (a 1 reflects the state along its key, beta = 2;
a 0 leaves that direction alone: beta = 0 or an orthogonal key). With one head,
2 of 3 seeds missed it in 3000 steps: one settled on nearly parallel keys for
both bits with eigenvalues near -0.985, which hold the parity to about 64-100
bits, and one did not fit the training lengths (BENCHMARKS.md, fourth round).

Lengths follow Grazzi et al.: train on sequence lengths 3-40 and test on 40-256,
where a sequence length counts the answer token. ``paper_sizes`` converts those
to each task's ``size`` (lsm/tasks: bits for parity, operands for modular
arithmetic, expression tokens with brackets, group elements for permutations).
``train_max`` and ``test_max`` move the ends: training on lengths 3-train_max,
testing at train_max, every power of two above it, and test_max
(``eval_lengths``). The DeltaProduct paper's word problems (Siems et al. 2025)
train to 128 and test to 512: ``train_max=128,test_max=512`` tests at 128, 256
and 512. Task rows are as long as the longest training example; data.seq_len is
unused.
"""

import ml_collections

from configs import common

TRAIN_LENGTHS = (3, 40)
TEST_LENGTHS = (40, 64, 128, 256)


def eval_lengths(train_max: int, test_max: int) -> tuple[int, ...]:
  """train_max, the powers of two above it and below test_max, and test_max:
  (40, 256) gives TEST_LENGTHS."""
  if train_max < TRAIN_LENGTHS[0]:
    raise ValueError(f"config arg train_max={train_max}; expected >= "
                     f"{TRAIN_LENGTHS[0]} (training lengths start at "
                     f"{TRAIN_LENGTHS[0]})")
  if test_max < train_max:
    raise ValueError(f"config arg test_max={test_max}; expected >= train_max="
                     f"{train_max} (tests run at and beyond the training "
                     "lengths)")
  out, p = [train_max], 1
  while p < train_max:
    p *= 2
  while p < test_max:
    out += [p] if p > train_max else []
    p *= 2
  return tuple(dict.fromkeys(out + [test_max]))


def paper_sizes(task: str, length: int) -> int:
  """Grazzi et al.'s sequence length (answer token included) -> task size."""
  if task == "parity":
    return length - 1                   # n bits + the answer token
  if task == "modular_arithmetic":
    return max((length - 1) // 2, 1)    # 2n - 1 tokens, "=", the answer
  if task == "modular_arithmetic_brackets":
    return max(length - 3, 1)           # expression, "=", the answer (+1)
  if task == "permutation":
    return length                       # one label per element
  raise ValueError(f"config arg task={task!r}; expected parity, "
                   "modular_arithmetic, modular_arithmetic_brackets or permutation")


def get_config(arg=None):
  arg = common.parse_arg(
      arg, task="parity", group="S5", mixer="delta_net", beta_scale=1.0,
      n_h=2, gated=False, eigenvalues="positive", train_max=TRAIN_LENGTHS[1],
      test_max=TEST_LENGTHS[-1], d_model=64, n_layers=1, n_heads=4, steps=1500,
      batch_size=128, lr=1e-3, weight_decay=0.1, seed=0, smoke=False,
      paper=False, dt_min=1e-3, dt_max=1e-1)
  c = ml_collections.ConfigDict()
  c.model = common.section(
      "model",
      vocab_size=0, d_model=arg.d_model, n_layers=arg.n_layers,
      n_heads=arg.n_heads, mixer=arg.mixer, impl="auto", chunk_size=16,
      mixer_kwargs=common.mixer_kwargs(arg.beta_scale, arg.eigenvalues))
  # Mamba's initial step sizes (decays start at exp(dt A), near 1 for small dt).
  c.model.mixer_kwargs["mamba"].update(dt_min=arg.dt_min, dt_max=arg.dt_max)
  c.model.mixer_kwargs["delta_product"].update(n_householder=arg.n_h,
                                               gated=arg.gated)
  options = {"group": arg.group} if arg.task == "permutation" else {}
  train = (TRAIN_LENGTHS[0], arg.train_max)
  tests = eval_lengths(arg.train_max, arg.test_max)
  c.task = dict(name=arg.task,
                train_sizes=tuple(paper_sizes(arg.task, n) for n in train),
                eval_sizes=tuple(paper_sizes(arg.task, n) for n in tests),
                options=options)
  vocab = {"parity": 3, "modular_arithmetic": 10,
           "modular_arithmetic_brackets": 12}.get(arg.task, 121)
  # The smallest multiple of 8 that holds the task's tokens (S5 and A5: 121).
  c.model.vocab_size = -(-vocab // 8) * 8
  steps, batch = (100_000, 1024) if arg.paper else (arg.steps, arg.batch_size)
  return common.task_sections(c, steps=steps, batch_size=batch, lr=arg.lr,
                              seed=arg.seed, smoke=arg.smoke,
                              weight_decay=arg.weight_decay)
