"""Sampling and ``generate``: prefill with the parallel path, then one token at a
time through every mixer's ``step`` (O(1) memory per linear layer)."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(key, logits, *, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None):
  """Next tokens from float32 logits [B, V].

  temperature 0 is greedy (argmax). Otherwise logits / temperature, restricted to
  the top_k most likely tokens and/or the smallest set whose probability reaches
  top_p (nucleus; the most likely token always stays), then sampled.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
  if temperature < 0:
    raise ValueError(f"generate: temperature={temperature!r}; expected >= 0")
  if top_k is not None and top_k < 1:
    raise ValueError(f"generate: top_k={top_k!r}; expected None or >= 1")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p={top_p!r}; expected None or in (0, 1]")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}; expected >= 1")


def generate(model, prompt, *, max_new_tokens: int, key=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None):
  """Continues ``prompt`` by ``max_new_tokens`` tokens.

  Args:
    model: a LanguageModel (or anything with __call__(tokens, cache), step and
      init_cache).
    prompt: int [B, P] token ids, P >= 1.
    max_new_tokens: tokens to add.
    key: PRNG key; needed unless temperature is 0.
    temperature, top_k, top_p: as in ``sample_logits``.

  Returns:
    int32 [B, P + max_new_tokens]: the prompt followed by the new tokens.
  """
  _check_sampling(temperature, top_k, top_p, max_new_tokens)
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"generate: prompt has shape {prompt.shape}; expected [B, P] "
                     "with P >= 1")
  if key is None:
    if temperature != 0.0:
      raise ValueError("generate: key is None; a PRNG key is needed when "
                       f"temperature={temperature} > 0")
    key = jax.random.key(0)
  B, P = prompt.shape
  graphdef, state = nnx.split(model)
  run = _runner(graphdef, B, P, max_new_tokens, temperature, top_k, top_p)
  return run(state, prompt, key)


@functools.lru_cache(maxsize=32)
def _runner(graphdef, B: int, P: int, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None):
  """The jitted prefill + decode loop, built once per model structure, shapes
  and sampling settings, so repeated ``generate`` calls do not recompile."""

  def sample(k, logits):
    if top_k is not None and top_k > logits.shape[-1]:
      raise ValueError(f"generate: top_k={top_k}; expected at most the vocabulary "
                       f"size {logits.shape[-1]}")
    return sample_logits(k, logits, temperature=temperature, top_k=top_k,
                         top_p=top_p)

  @jax.jit
  def run(state, prompt, key):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(B, P + max_new_tokens)
    logits, cache = m(prompt, cache)
    keys = jax.random.split(key, max_new_tokens)
    first = sample(keys[0], logits[:, -1])

    def body(carry, k):
      tok, cache = carry
      logits, cache = m.step(tok, cache)
      return (sample(k, logits), cache), tok

    (last, _), toks = jax.lax.scan(body, (first, cache), keys[1:])
    return jnp.concatenate([prompt, toks.T, last[:, None]], axis=1)

  return run
