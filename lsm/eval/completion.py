"""Continuations of text prompts under a restored run (lsm-generate's core,
without its command-line flags, so other code and tests can import it).

Each prompt starts a document as training documents start
(``Tokenizer.encode_prompt``: the document-start token, then the text).
"""


def complete(run, prompts, *, max_new_tokens, temperature=0.0, top_k=None,
             top_p=None, seed=0, stop_at_eos=True) -> list[str]:
  """The continuation of each prompt (text), in order.

  ``run`` has ``model`` and ``tokenizer`` (lsm.train.restore.Run). Prompts of
  one token length are decoded as one batch (lsm.models.decoding.generate);
  temperature 0 is greedy; each continuation stops at its first EOS unless
  ``stop_at_eos`` is False.
  """
  import jax
  import numpy as np
  from lsm.models.decoding import generate
  tok = run.tokenizer
  encoded = [tok.encode_prompt(p) for p in prompts]
  out = [None] * len(prompts)
  groups = {}
  for i, ids in enumerate(encoded):
    groups.setdefault(len(ids), []).append(i)
  key = jax.random.key(seed)
  for n, (length, members) in enumerate(sorted(groups.items())):
    batch = np.stack([encoded[i] for i in members])
    tokens = np.asarray(generate(
        run.model, batch, max_new_tokens=max_new_tokens,
        key=jax.random.fold_in(key, n), temperature=temperature, top_k=top_k,
        top_p=top_p))[:, length:]
    for row, i in zip(tokens, members):
      if stop_at_eos and tok.eos_id in row:
        row = row[:list(row).index(tok.eos_id)]
      out[i] = tok.decode(row)
  return out
