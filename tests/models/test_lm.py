"""Language model: decoding equals the parallel pass, impls agree, sampling
obeys its filters, config errors are clear, presets match closed-form counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from lsm import layers
from lsm.models.decoding import generate, sample_logits
from lsm.models.lm import LanguageModel, LMConfig, count_params, default_mlp_hidden
from tests import numerics

LINEAR = ("gla", "delta_net", "gated_delta_net")
HYBRID = (*LINEAR, "lssl", "s4d", "mamba", "attention")


def tiny(impl="chunked", pattern=HYBRID, **kw):
  kw = {"chunk_size": 16, **kw}
  return LMConfig(vocab_size=61, d_model=32, n_layers=len(pattern), n_heads=4,
                  pattern=pattern, impl=impl,
                  mixer_kwargs={"delta_net": {"beta_scale": 2.0}}, **kw)


@functools.cache
def _model(impl="chunked"):
  return LanguageModel(tiny(impl), rngs=nnx.Rngs(0))


def _tokens(t=14, seed=0):
  return jax.random.randint(jax.random.key(seed), (2, t), 0, 61)


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def test_prefill_and_decode_equal_parallel_logits():
  model = _model()
  tok = _tokens()
  logits = _logits(model, tok)
  cache = model.init_cache(2, 14)
  pre, cache = nnx.jit(lambda m, t, c: m(t, c))(model, tok[:, :5], cache)
  outs = [pre]
  step = nnx.jit(lambda m, t, c: m.step(t, c))
  for t in range(5, 14):
    lt, cache = step(model, tok[:, t], cache)
    outs.append(lt[:, None])
  numerics.assert_close(jnp.concatenate(outs, axis=1), logits,
                        rtol=numerics.TOLERANCES[("invariant", "float32")],
                        what="decoded logits")


FAMILY = ("lightning", "retnet", "based", "hedgehog", "mom")


def test_linear_attention_family_decodes_the_parallel_logits():
  """A stack of every family mixer (Based with a 4-token window, so decoding
  wraps its ring): prefill + step logits equal the parallel pass's, and the
  chunked model's equal the reference model's."""
  cfg = lambda impl: LMConfig(  # noqa: E731
      vocab_size=61, d_model=32, n_layers=len(FAMILY), n_heads=4, pattern=FAMILY,
      impl=impl, chunk_size=16, mixer_kwargs={"based": {"window": 4}})
  model = LanguageModel(cfg("chunked"), rngs=nnx.Rngs(0))
  tok = _tokens(seed=4)
  logits = _logits(model, tok)
  pre, cache = nnx.jit(lambda m, t, c: m(t, c))(model, tok[:, :5],
                                                model.init_cache(2, 14))
  outs = [pre]
  step = nnx.jit(lambda m, t, c: m.step(t, c))
  for t in range(5, 14):
    lt, cache = step(model, tok[:, t], cache)
    outs.append(lt[:, None])
  numerics.assert_close(jnp.concatenate(outs, axis=1), logits,
                        rtol=numerics.TOLERANCES[("invariant", "float32")],
                        what="decoded logits")
  reference = LanguageModel(cfg("reference"), rngs=nnx.Rngs(0))
  numerics.assert_close(logits, _logits(reference, tok),
                        rtol=numerics.tolerance("chunked", jnp.float32),
                        what="chunked vs reference logits")


def test_chunked_and_reference_give_the_same_logits():
  tok = _tokens(seed=1)
  numerics.assert_close(_logits(_model("chunked"), tok),
                        _logits(_model("reference"), tok),
                        rtol=numerics.tolerance("chunked", jnp.float32),
                        what="logits")


def test_greedy_generate_follows_the_parallel_argmax():
  model = _model()
  prompt = _tokens(4, seed=2)
  out = generate(model, prompt, max_new_tokens=6)
  assert out.shape == (2, 10)
  np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(prompt))
  logits = _logits(model, out[:, :-1])
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 3:], -1)),
                                np.asarray(out[:, 4:]))


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.05, 0.6, 0.1, 0.25]] * 512))
  keys = jax.random.key(0)
  top2 = sample_logits(keys, logits, temperature=1.0, top_k=2)
  assert set(np.unique(np.asarray(top2))) == {1, 3}
  nucleus = sample_logits(keys, logits, temperature=1.0, top_p=0.5)
  assert set(np.unique(np.asarray(nucleus))) == {1}  # 0.6 alone reaches 0.5
  nucleus = sample_logits(keys, logits, temperature=1.0, top_p=0.8)
  assert set(np.unique(np.asarray(nucleus))) == {1, 3}
  free = sample_logits(keys, logits, temperature=1.0)
  counts = np.bincount(np.asarray(free), minlength=4) / 512
  assert np.all(np.abs(counts - [0.05, 0.6, 0.1, 0.25]) < 0.07), counts


@pytest.mark.parametrize("kwargs, match", [
    (dict(mixer="lstm"), r"unknown mixer 'lstm'; expected one of \["),
    (dict(pattern=("gla", "nope")), r"unknown mixer 'nope'"),
    (dict(n_layers=6, pattern=("gla",) * 4), r"pattern has length 4; expected a "
     r"length dividing n_layers=6: one of \[1, 2, 3, 6\]"),
    (dict(d_model=0), r"d_model=0; expected a positive int"),
    (dict(mixer_kwargs={"rnn": {}}), r"mixer_kwargs has unknown mixer 'rnn'"),
])
def test_bad_config_lists_valid_choices(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LMConfig(**kwargs)


def test_unknown_config_key_raises():
  with pytest.raises(TypeError, match="dropout"):
    LMConfig(dropout=0.1)


def test_invalid_size_lists_presets():
  with pytest.raises(ValueError, match=r"size='7b'; expected one of \["):
    common.check_size("7b")


# Closed-form parameter counts, written from the layer definitions.
def _gla(d, h):
  dk, dv = d // 2, d
  return 2 * d * dk + 2 * d * dv + d * 16 + 16 * dk + dk + dv // h + dv * d


def _delta(d, h, gated, conv=4):
  dk = dv = d
  n = 2 * d * dk + 2 * d * dv + d * h + (conv + 1) * (2 * dk + dv) + dv // h + dv * d
  return n + (d * h + 2 * h if gated else 0)


def _attention(d, h):
  return 4 * d * d  # q, k, v, o; n_kv_heads = n_heads, head_dim = d / h


def _ssm(d, h, n=64):
  # Per channel: log dt, skip D; per (channel, complex mode), N / 2 modes: log -Re A,
  # Im A, Re/Im B, Re/Im C; then the d x d output map.
  return 2 * d + 6 * d * (n // 2) + d * d


def _mamba(d, h, n=16, expand=2, width=4):
  e, r = expand * d, -(-d // 16)
  return (2 * d * e + (width + 1) * e + 2 * e * n + 2 * e * r + e + e * n + e
          + e * d)  # in_proj, conv, B/C, low-rank dt, dt_bias, A, D, out_proj


def _mamba2(d, h, n=64, expand=2, width=4):
  e = expand * d
  return (d * (2 * e + 2 * n + h) + (width + 1) * (e + 2 * n)  # in_proj, conv
          + 3 * h + e // h + e * d)  # dt_bias, A_log, D; norm; out_proj


def _lightning(d, h):
  return 5 * d * d  # q, k, v, u, o; SRMSNorm has no parameters


def _retnet(d, h):
  dv = 2 * d  # expand_v = 2
  return 2 * d * d + 3 * d * dv + 2 * dv  # q, k; v, g, o; GroupNorm scale, bias


def _based(d, h, f=16):
  return 2 * d * h * f + 2 * d * d + _attention(d, h)  # q, k; v, o; window branch


def _hedgehog(d, h):
  k = d // h
  return 4 * d * d + 2 * (h * k * k + h * k)  # q, k, v, o; two maps W, b


def _mom(d, h, m=4, conv=4):
  s = m + 1  # routed memories + the shared one; key and value widths d each
  return (d * m + d * d + 2 * s * d * d  # router, q, per-memory k and v
          + (conv + 1) * (d + 2 * s * d)  # short convs on q, k, v
          + 2 * d * s * h + 2 * s * h  # beta and decay projections, A_log, dt_bias
          + d // h + 2 * d * d)  # norm scale, output gate, output projection


MIXER_COUNT = {"gla": _gla, "delta_net": lambda d, h: _delta(d, h, False),
               "gated_delta_net": lambda d, h: _delta(d, h, True),
               "attention": _attention, "lssl": _ssm, "s4d": _ssm, "mamba": _mamba, "mamba2": _mamba2,
               "lightning": _lightning, "retnet": _retnet, "based": _based,
               "hedgehog": _hedgehog, "mom": _mom}


def closed_form(cfg: LMConfig) -> int:
  d, v = cfg.d_model, cfg.vocab_size
  hidden = default_mlp_hidden(d)
  block = lambda m: 2 * d + 3 * d * hidden + MIXER_COUNT[m](d, cfg.n_heads)
  n = v * d + sum(block(m) for m in cfg.layer_mixers) + d
  return n + (0 if cfg.tie_embeddings else d * v)


@pytest.mark.parametrize("size", sorted(common.SIZES))
@pytest.mark.parametrize("mixer", sorted(MIXER_COUNT))
def test_preset_parameter_counts_match_closed_form(size, mixer):
  cfg = LMConfig(vocab_size=32000, mixer=mixer, **common.SIZES[size])
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  assert count_params(model) == closed_form(cfg)


def test_untied_head_adds_one_table():
  tied = nnx.eval_shape(lambda: LanguageModel(tiny(), rngs=nnx.Rngs(0)))
  untied = nnx.eval_shape(lambda: LanguageModel(tiny(tie_embeddings=False),
                                                rngs=nnx.Rngs(0)))
  assert count_params(untied) - count_params(tied) == 61 * 32


def test_every_mixer_gets_the_configured_chunk_size():
  cfg = tiny(pattern=tuple(sorted(layers.MIXERS)), chunk_size=32)
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  for blk, name in zip(model.blocks, cfg.layer_mixers):
    if hasattr(blk.mixer, "chunk_size"):
      assert blk.mixer.chunk_size == 32, name


def test_sampled_generate_with_top_k_1_is_greedy():
  model = _model()
  prompt = _tokens(4, seed=3)
  greedy = generate(model, prompt, max_new_tokens=5)
  sampled = generate(model, prompt, max_new_tokens=5, key=jax.random.key(7),
                     temperature=0.7, top_k=1, top_p=0.9)
  np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_config_is_hashable_for_static_jit():
  assert hash(tiny()) == hash(tiny())
