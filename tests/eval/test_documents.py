"""lsm-generate, the harness adapter and lsm-eval read documents as training
packs them: a prompt starts with the tokenizer's document-start token, and
held-out loss is bucketed by position in the document. A tiny attention-only
model, no checkpoint: the end-to-end commands are in test_commands.py."""

import functools
import types

import grain
import jax
import numpy as np
from flax import nnx

from lsm.data.packing import PackIterDataset
from lsm.data.tokenizers import ByteTokenizer
from lsm.eval import completion, evaluate, harness
from lsm.models import decoding
from lsm.models.lm import LanguageModel, LMConfig
from tests import numerics

CFG = LMConfig(vocab_size=259, d_model=16, n_layers=1, n_heads=2,
               pattern=("attention",))
RTOL = numerics.TOLERANCES[("invariant", "float32")]


@functools.cache
def _run():
  """A stand-in for lsm.train.restore.Run: model, tokenizer, data.seq_len."""
  return types.SimpleNamespace(
      model=LanguageModel(CFG, rngs=nnx.Rngs(0)), tokenizer=ByteTokenizer(),
      config=types.SimpleNamespace(data=types.SimpleNamespace(seq_len=16)), step=0)


@functools.cache
def _forward():
  graphdef, params = nnx.split(_run().model)
  fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  return lambda x: fn(params, x)


def _logp(rows):
  """float64 log-softmax of the model's logits for each token row (rows of up
  to 16 tokens, zero-padded on the right to 16 in one pass: causal, so the
  padding never reaches them)."""
  batch = np.zeros((len(rows), 16), np.int32)
  for i, r in enumerate(rows):
    batch[i, :len(r)] = r
  logits = np.asarray(_forward()(batch), np.float64)
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_tokenizer_prompt_is_the_start_of_a_training_document():
  tok = ByteTokenizer()
  assert (tok.doc_start_id, tok.eos_at_end) == (tok.bos_id, True)
  text = tok.encode("ab")
  np.testing.assert_array_equal(tok.encode_prompt("ab"), [tok.bos_id, *text])
  np.testing.assert_array_equal(tok.encode_document("ab"),
                                [tok.bos_id, *text, tok.eos_id])
  np.testing.assert_array_equal(tok.encode_prompt(), [tok.bos_id])
  assert tok.encode_prompt("ab").dtype == np.int32


def test_generate_prompts_start_with_the_document_start_token(monkeypatch):
  seen, real = [], decoding.generate

  def record(model, prompt, *, max_new_tokens, **kw):
    seen.append(np.asarray(prompt))
    return real(model, prompt, max_new_tokens=max_new_tokens, **kw)

  monkeypatch.setattr(decoding, "generate", record)
  tok = _run().tokenizer
  texts = completion.complete(_run(), ["one", "two"], max_new_tokens=3)
  prompts = np.asarray([[tok.bos_id, *tok.encode(t)] for t in ("one", "two")])
  assert len(seen) == 1
  np.testing.assert_array_equal(seen[0], prompts)
  # Greedy: the continuations of BOS + text under the model.
  for text, row in zip(texts, np.asarray(real(_run().model, prompts,
                                              max_new_tokens=3))[:, 4:]):
    if tok.eos_id in row:
      row = row[:list(row).index(tok.eos_id)]
    assert text == tok.decode(row)


def test_harness_scores_text_after_the_document_start_token():
  tok = _run().tokenizer
  scorer = harness.Scorer(_run(), batch_size=2)
  context, continuation = "one two", " three"
  ids = [tok.bos_id, *tok.encode(context + continuation)]
  logp = _logp([ids])[0]
  first = 1 + len(tok.encode(context))
  want = sum(logp[t - 1, ids[t]] for t in range(first, len(ids)))
  got = scorer.loglikelihood([(context, continuation)])[0][0]
  numerics.assert_close(np.float64(got), np.float64(want), rtol=RTOL,
                        what="loglikelihood")
  rolling = scorer.loglikelihood_rolling([context + continuation])[0]
  numerics.assert_close(np.float64(rolling),
                        np.float64(sum(logp[t - 1, ids[t]]
                                       for t in range(1, len(ids)))),
                        rtol=RTOL, what="loglikelihood_rolling")


def test_harness_generation_starts_with_the_document_start_token(monkeypatch):
  seen = []

  def record(model, prompt, *, max_new_tokens, **kw):
    seen.append(np.asarray(prompt))
    return np.zeros((1, prompt.shape[1] + max_new_tokens), np.int32)

  monkeypatch.setattr(decoding, "generate", record)
  tok = _run().tokenizer
  harness.Scorer(_run()).generate_until([("one", {"max_gen_toks": 2})])
  np.testing.assert_array_equal(seen[0], [[tok.bos_id, *tok.encode("one")]])


def test_context_positions_restart_at_every_segment():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0],    # two documents, then padding
                  [1, 1, 1, 1, 2, 2, 2, 2]])   # a continued document first
  np.testing.assert_array_equal(evaluate.context_positions(seg),
                                [[0, 1, 2, 0, 1, 0, 0, 1],
                                 [0, 1, 2, 3, 0, 1, 2, 3]])


def test_eval_buckets_loss_by_position_in_the_document():
  """position_sums with documents: a target counts at its input's position in
  the document as the model reads it (a row's pieces restart at 0), not at its
  column; without documents (runs that train across them), at its column."""
  tok = _run().tokenizer
  docs = [tok.encode_document(t) for t in ("ab", "cde", "fghij", "k")]
  T = 9  # rows of 10: the third document continues into the second row
  packed = list(PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(),
                                seq_len=T))
  batch = {k: np.stack([r[k] for r in packed]) for k in packed[0]}
  seg = batch["segment_ids"]
  ctx = np.zeros_like(seg)
  for r in range(len(seg)):
    for j in range(1, T):
      ctx[r, j] = 0 if seg[r, j] != seg[r, j - 1] else ctx[r, j - 1] + 1
  mask = batch["mask"]
  want_count = np.bincount(ctx[mask], minlength=T)
  sums = evaluate.position_sums(_run().model, [batch], documents=True)
  np.testing.assert_array_equal(sums["count"], want_count)
  by_column = evaluate.position_sums(_run().model, [batch], documents=False)
  np.testing.assert_array_equal(by_column["count"], mask.sum(0))
  assert not np.array_equal(want_count, mask.sum(0))
  # The nll sums: each piece run alone, binned by its own positions.
  pieces = [np.flatnonzero(seg[r] == s) + r * T for r in range(len(seg))
            for s in set(seg[r].tolist()) - {0}]
  logps = _logp([batch["inputs"].ravel()[cols] for cols in pieces])
  nll = np.zeros(T)
  for logp, cols in zip(logps, pieces):
    for k, c in enumerate(cols):
      if mask.ravel()[c]:
        nll[k] -= logp[k, batch["targets"].ravel()[c]]
  numerics.assert_close(sums["nll"], nll, rtol=RTOL, what="nll by position")
