"""Token-level cross-entropy with a loss mask: the LM objective, and the
classification objective of synthetic tasks whose labels sit at a few positions
(answer tokens) with the mask zero elsewhere."""

import jax
import jax.numpy as jnp


def cross_entropy(logits, labels, mask=None):
  """Mean cross-entropy and accuracy over the positions where ``mask`` is set.

  Args:
    logits: float [B, T, V].
    labels: int [B, T].
    mask: optional [B, T] (bool or 0/1 weights); all positions when None.

  Returns:
    (loss, accuracy): float32 scalars, averaged over the masked positions (0
    when the mask is empty).
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"cross_entropy: labels has shape {labels.shape}; expected "
                     f"logits.shape[:-1] = {logits.shape[:-1]}")
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(
      jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(nll * mask) / denom, jnp.sum(correct * mask) / denom
