"""Objectives that linearise a softmax-attention model (LoLCATs, Liger):
attention transfer layer by layer, and the teacher's logits for a KL term.

A converted layer's mixer (``lsm.layers.MIXERS`` entries with a ``teacher``
method: lolcats, liger) holds the teacher attention's own projections, so the
teacher needs no weights of its own: ``mixer.teacher(x)`` is the softmax
attention those weights compute. With LoRA adapters on the projections
(lsm.layers.lora), the teacher is the same parameters with the adapters zeroed
(``lsm.layers.lora.without_adapters``).

Attention transfer (LoLCATs' stage 1): the teacher runs its own forward pass;
at every converted layer the student mixer reads the same input as the
teacher's attention (the teacher's hidden state, normalised), and the loss is
the mean squared difference of the two outputs:

  L = sum over converted layers l of  sum_t w_t |y_l,t - y^_l,t|^2 / (D sum_t w_t)

with w the batch's loss mask (padding does not count). The teacher's outputs
are constants (stop_gradient), so gradients reach only the student's mixers.
"""

import jax
import jax.numpy as jnp


def is_converted(mixer) -> bool:
  """A linearised attention layer (has the softmax attention it replaces)."""
  return callable(getattr(mixer, "teacher", None))


def _walk(model, tokens, segment_ids, positions, on_layer):
  """The teacher's forward pass (converted layers as the softmax attention
  they replace), calling ``on_layer(mixer, h, y_teacher)`` at each converted
  layer. Returns the final hidden state."""
  docs = dict(segment_ids=segment_ids, positions=positions)
  x = model._embed(tokens)
  for blk in model.blocks:
    h = blk.mixer_norm(x)
    if is_converted(blk.mixer):
      y = jax.lax.stop_gradient(blk.mixer.teacher(h, **docs))
      on_layer(blk.mixer, h, y)
    else:
      y = blk.mixer(h, None, **docs)[0]
    x, _ = blk._mlp(x + y, None, segment_ids)
  return x


def attention_transfer(model, tokens, weights, *, segment_ids=None,
                       positions=None):
  """(sum over converted layers of the weighted squared error summed over
  tokens and divided by D, [per-layer mean squared error]).

  Args:
    model: a LanguageModel with converted layers.
    tokens: int [B, T].
    weights: float [B, T] per-token weights (the batch mask).
    segment_ids, positions: packed rows, as the model takes them.
  """
  sums, means = [], []
  count = jnp.maximum(jnp.sum(weights), 1.0)

  def on_layer(mixer, h, y_teacher):
    y = mixer(h, None, segment_ids=segment_ids, positions=positions)[0]
    err = jnp.mean(jnp.square(y.astype(jnp.float32)
                              - y_teacher.astype(jnp.float32)), axis=-1)
    s = jnp.sum(err * weights)
    sums.append(s)
    means.append(s / count)

  _walk(model, tokens, segment_ids, positions, on_layer)
  if not sums:
    raise ValueError("attention_transfer: the model has no converted layer "
                     "(a mixer with a teacher, e.g. lolcats); expected at least "
                     "one")
  return sum(sums), jnp.stack(means)


def teacher_logits(model, tokens, *, segment_ids=None, positions=None):
  """float32 logits [B, T, vocab] of the softmax-attention model the converted
  layers came from (pass the parameters with adapters zeroed)."""
  x = _walk(model, tokens, segment_ids, positions, lambda *a: None)
  return model._logits(x)
