"""Packed documents end to end: rows from the packing pipeline, through a hybrid
LM and the train / eval steps, equal each document run on its own.

The expected values run the model on one document's tokens at a time, with no
segment ids, so they check the resets of every layer of the stack at once. The
text pipeline's rows (start token, masked crossing targets) give every document
that fits in a row the losses it gets alone.
"""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.data import pipeline
from lsm.data.packing import PackIterDataset
from lsm.data.pipeline import DataConfig
from lsm.models.lm import LanguageModel, LMConfig
from lsm.parallel.mesh import MeshConfig, make_mesh
from lsm.train import optim
from lsm.train import state as state_lib
from lsm.train import step as step_lib
from tests import numerics

# Every kind of layer state: recurrent (GLA, Gated DeltaNet, Mamba), short
# convolutions, and attention with RoPE.
CFG = LMConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=2,
               pattern=("gla", "gated_delta_net", "mamba", "attention"),
               chunk_size=8)
T, BOS = 16, 1
RTOL = numerics.TOLERANCES[("invariant", "float32")]


@functools.cache
def _rows():
  """Two rows of T tokens packed from documents of 1 to 13 tokens (BOS first),
  as the pipeline emits them: a document can continue into the next row."""
  rng = np.random.default_rng(0)
  docs = [np.append(BOS, rng.integers(2, CFG.vocab_size, n)).astype(np.int32)
          for n in (0, 9, 12, 4)]
  ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=T)
  rows = [next(iter_) for iter_ in [iter(ds)] for _ in range(2)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _pieces(batch):
  """(row, start, end) of every document piece in the rows."""
  out = []
  for row, ids in enumerate(batch["segment_ids"]):
    starts = [0, *np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids)]
    out += [(row, a, b) for a, b in zip(starts[:-1], starts[1:])]
  return out


@functools.cache
def _setup():
  tx, _ = optim.make_optimizer(
      optim.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10,
      state_lib.float32_mask(CFG))
  return state_lib.build(CFG, tx, make_mesh(MeshConfig(), jax.devices()[:1]), None)


def test_rows_hold_several_documents():
  batch = _rows()
  # A 1-token document, one split over the rows, and the last row's padding.
  assert len(_pieces(batch)) == 6
  assert np.all(batch["positions"][batch["segment_ids"] > 0] >= 0)


@functools.cache
def _results():
  """Logits and parameter gradients (of a fixed linear function of the logits)
  for the packed rows and for every document piece alone, one jit each."""
  batch = _rows()
  setup = _setup()
  params = state_lib.create(setup, 0)["params"]
  graphdef = setup.graphdef
  # Padding (segment 0, position 0 throughout) is not a document: it takes no
  # cotangent and its logits are not compared.
  real = jnp.asarray(batch["segment_ids"] > 0)[..., None]
  ct = jax.random.normal(jax.random.key(1), (2, T, CFG.vocab_size)) * real

  def packed(params):
    return nnx.merge(graphdef, params)(
        batch["inputs"], segment_ids=batch["segment_ids"],
        positions=batch["positions"])[0]

  # Every piece alone, in one batch: piece i left-aligned in row i of a
  # [pieces, T] batch and followed by filler tokens. The models are causal, so
  # a piece's logits never read the filler after it, and the filler's logits
  # take no cotangent (one trace instead of one per piece length).
  pieces = _pieces(batch)
  alone_inputs = np.full((len(pieces), T), BOS, np.int32)
  for i, (row, a, b) in enumerate(pieces):
    alone_inputs[i, :b - a] = batch["inputs"][row, a:b]

  def alone(params):
    y = nnx.merge(graphdef, params)(jnp.asarray(alone_inputs))[0]
    out = jnp.zeros((2, T, CFG.vocab_size))
    for i, (row, a, b) in enumerate(pieces):
      out = out.at[row, a:b].set(y[i, :b - a])
    return out

  def with_grads(f):
    return jax.jit(lambda p: (f(p), jax.grad(lambda p: jnp.sum(f(p) * ct))(p)))

  return params, with_grads(packed)(params), with_grads(alone)(params)


def test_packed_logits_and_gradients_equal_documents_alone():
  batch = _rows()
  params, (y, dp), (y_e, dp_e) = _results()
  real = batch["segment_ids"] > 0
  assert not real.all()  # the last row ends in padding
  numerics.assert_close(y[real], y_e[real], rtol=RTOL, what="logits")
  numerics.assert_pytrees_close(dp, dp_e, rtol=RTOL, what="parameter gradients")
  # Without the ids the row is one sequence: the later documents differ.
  graphdef = _setup().graphdef
  y_joined = jax.jit(lambda p: nnx.merge(graphdef, p)(batch["inputs"])[0])(params)
  assert numerics.errors(y_joined[real], y_e[real])[0] > 100 * RTOL


def test_eval_step_loss_is_the_token_weighted_mean_over_documents():
  """The step's loss on a packed batch (padding and the targets crossing into
  the next document masked) equals each document piece's loss run alone,
  weighted by its target count."""
  batch = _rows()
  params, _, (y_alone, _) = _results()
  got = jax.jit(step_lib.make_eval_step(_setup()))(params, batch)
  logits = np.asarray(y_alone, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  w = batch["mask"].astype(np.float64)
  nll, count = -(picked * w).sum(), w.sum()
  assert float(got["count"]) == count
  numerics.assert_close(got["loss_sum"] / got["count"], nll / count, rtol=RTOL,
                        what="packed loss")


def test_reset_at_boundaries_must_be_a_bool():
  with pytest.raises(ValueError, match="reset_at_boundaries='yes'; expected a bool"):
    DataConfig(reset_at_boundaries="yes")


# A byte-level model on the text pipeline's own rows: a recurrent state, short
# convolutions and attention with RoPE (every mixer's resets are tested in
# tests/layers/test_documents.py; this one tests the rows).
BYTES = LMConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2,
                 pattern=("gated_delta_net", "attention"), chunk_size=8)
TEXTS = ["the cat sat", "a", "on the mat, quietly", "linear recurrences restart at "
         "every document", "ok", "x y z", "mamba", "state", "", "delta rule"]
ROW = 24  # T of the text rows: documents of 2 to 20 tokens fit, one does not


def _text_rows(texts, rows: int):
  """All ``rows``-row batches of ``texts``, packed in order as evaluation packs
  them (byte tokenizer: BOS, bytes, EOS), stacked: numpy [R, ROW]."""
  cfg = DataConfig(seq_len=ROW, batch_size=rows, num_threads=0,
                   prefetch_batches=0)
  batches = list(pipeline.text_dataset(cfg, "validation",
                                       source=[{"text": t} for t in texts]))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@functools.cache
def _per_token_losses():
  """(packed rows, their nll, per-text alone rows, their nll, the packed rows'
  nll read as one sequence each): one forward pass over all rows."""
  packed = _text_rows(TEXTS, 2)
  alone = [_text_rows([t], 1) for t in TEXTS]
  # The packed rows again, each one segment from position 0: one sequence.
  joined = {**packed, "segment_ids": np.ones_like(packed["segment_ids"]),
            "positions": np.broadcast_to(np.arange(ROW, dtype=np.int32),
                                         packed["positions"].shape)}
  parts = [packed, joined, *alone]
  rows = {k: np.concatenate([p[k] for p in parts]) for k in packed}
  graphdef, params = nnx.split(LanguageModel(BYTES, rngs=nnx.Rngs(0)))
  logits = np.asarray(jax.jit(
      lambda p, x, s, q: nnx.merge(graphdef, p)(x, segment_ids=s, positions=q)[0])(
          params, rows["inputs"], rows["segment_ids"], rows["positions"]), np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
  n = len(packed["inputs"])
  return packed, nll[:n], alone, nll[2 * n:], nll[n:2 * n]


def test_documents_that_fit_in_a_row_get_their_losses_alone():
  """Every document that fits in one row gets, token for token, the losses it
  gets packed alone: its start token is not a target (the target crossing into
  it is masked), its first text token is predicted from the start token alone,
  and the rest from its own tokens only."""
  packed, nll, alone, nll_alone, joined = _per_token_losses()
  n_row = ROW + 1
  stream = np.concatenate([np.append(i, t[-1]) for i, t in
                           zip(packed["inputs"], packed["targets"])])
  start, fits = 0, 0
  nll_alone = np.split(nll_alone, np.cumsum([len(a["inputs"]) for a in alone]))
  for text, rows, losses in zip(TEXTS, alone, nll_alone):
    tokens = np.concatenate([np.append(i, t[-1]) for i, t in
                             zip(rows["inputs"], rows["targets"])])
    tokens = tokens[tokens != 0]  # pad id 0 is never a token
    n = len(tokens)
    r, offset = divmod(start, n_row)
    np.testing.assert_array_equal(stream[start:start + n], tokens)
    if (start + n - 1) // n_row == r:  # the whole document is in row r
      losses = losses[0]
      fits += 1
      # Targets k = 1 .. n - 1 of the document (k = 0, the start token, only
      # when it does not open the row), at the column before each.
      cols = np.arange(offset - 1, offset + n - 1)
      mask = np.zeros(n, bool)
      mask[cols >= 0] = packed["mask"][r, cols[cols >= 0]]
      want_mask = np.arange(n) > 0
      np.testing.assert_array_equal(mask, want_mask, err_msg=repr(text))
      np.testing.assert_array_equal(rows["mask"][0][:n - 1], want_mask[1:])
      numerics.assert_close(nll[r, cols[1:]], losses[:n - 1], rtol=RTOL,
                            what=f"losses of {text!r}")
      if offset:  # packed after another document: not the row as one sequence
        assert numerics.errors(joined[r, cols[1:]], losses[:n - 1])[0] > 100 * RTOL
    start += n
  assert start == len(stream[stream != 0])
  assert 6 <= fits < len(TEXTS), fits  # most fit; one crosses a row boundary
