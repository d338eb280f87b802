r"""Recall tasks: MQAR (Zoology, Arora et al. 2023), noisy in-context recall and
selective copying (MAD, Poli et al. 2024; the DeltaNet paper's synthetic
evaluations). Run:

lsm-train --config=configs/recall.py:task=mqar,mixer=delta_net --workdir=runs/mqar_dn

Args (``:arg``): task (mqar, noisy_recall, selective_copy), mixer, beta_scale,
eigenvalues, d_model, n_layers, n_heads, size (sequence length in tokens; trained
at this length, evaluated at 1x, 2x and 4x), num_pairs (MQAR), vocab (MQAR
vocabulary: 512 at CPU scale, 8192 for Zoology's grid), steps, batch_size, lr,
seed, smoke. The standard MQAR grid runs size 64-1024 and num_pairs 4-256 at
vocab 8192 (GPU scale). Short convolutions stay on (DeltaNet's conv_width 4),
as recall needs them. Any mixer of lsm.layers.MIXERS works (lightning, retnet,
based, hedgehog and mom with their defaults: Based's window is 64 tokens, all
of a size=64 sequence).
"""

import ml_collections

from configs import common

TASK_VOCAB = {"noisy_recall": 33, "selective_copy": 17}


def get_config(arg=None):
  arg = common.parse_arg(
      arg, task="mqar", mixer="delta_net", beta_scale=1.0, eigenvalues="positive",
      d_model=64, n_layers=2, n_heads=1, size=64, num_pairs=8, vocab=512,
      steps=2000, batch_size=64, lr=3e-3, seed=0, smoke=False)
  if arg.task not in ("mqar", "noisy_recall", "selective_copy"):
    raise ValueError(f"config arg task={arg.task!r}; expected mqar, noisy_recall "
                     "or selective_copy")
  c = ml_collections.ConfigDict()
  options = ({"vocab_size": arg.vocab, "num_pairs": arg.num_pairs}
             if arg.task == "mqar" else {})
  vocab = arg.vocab if arg.task == "mqar" else TASK_VOCAB[arg.task]
  c.model = common.section(
      "model",
      vocab_size=-(-vocab // 8) * 8, d_model=arg.d_model, n_layers=arg.n_layers,
      n_heads=arg.n_heads, mixer=arg.mixer, impl="auto", chunk_size=16,
      mixer_kwargs=common.mixer_kwargs(arg.beta_scale, arg.eigenvalues))
  c.task = dict(name=arg.task, train_sizes=(arg.size, arg.size),
                eval_sizes=(arg.size, 2 * arg.size, 4 * arg.size),
                options=options)
  return common.task_sections(c, steps=arg.steps, batch_size=arg.batch_size,
                              lr=arg.lr, seed=arg.seed, smoke=arg.smoke)
