"""Packed documents end to end: rows from the packing pipeline, through a hybrid
LM and the train / eval steps, equal each document run on its own.

The expected values run the model on one document's tokens at a time, with no
segment ids, so they check the resets of every layer of the stack at once.
"""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.data.packing import PackIterDataset
from lsm.data.pipeline import DataConfig
from lsm.models.lm import LMConfig
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
T, EOS = 16, 1
RTOL = numerics.TOLERANCES[("invariant", "float32")]


@functools.cache
def _rows():
  """Two rows of T tokens packed from documents of 1 to 13 tokens (EOS last),
  as the pipeline emits them: a document can continue into the next row."""
  rng = np.random.default_rng(0)
  docs = [np.append(rng.integers(2, CFG.vocab_size, n), EOS).astype(np.int32)
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
      optim.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
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

  def alone(params):
    model = nnx.merge(graphdef, params)
    out = jnp.zeros((2, T, CFG.vocab_size))
    for row, a, b in _pieces(batch):
      out = out.at[row, a:b].set(model(batch["inputs"][row:row + 1, a:b])[0][0])
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
  """The step's loss on a packed batch (padding masked, every real target
  predicted, EOS included) equals each document piece's loss run alone,
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
