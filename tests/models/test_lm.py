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
from lsm.models.lm import (LanguageModel, LMConfig, count_params, default_mlp_hidden,
                           flops_per_token)
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
    (dict(mlp="geglu"), r"mlp='geglu'; expected one of \['rwkv7', 'swiglu'\]"),
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


# Closed-form parameter counts, written from the layer definitions. Each takes
# the width d and the mixer's options o (n_heads and the preset's head shapes).
def _gla(d, o):
  h, dk, dv = o["n_heads"], round(d * o.get("expand_k", 0.5)), round(
      d * o.get("expand_v", 1.0))
  return 2 * d * dk + 2 * d * dv + d * 16 + 16 * dk + dk + dv // h + dv * d


def _delta(d, o, gated, conv=4):
  h, dk, dv = o["n_heads"], round(d * o.get("expand_k", 1.0)), round(
      d * o.get("expand_v", 1.0))
  n = (d * (2 * dk + dv) + d * h + (conv + 1) * (2 * dk + dv) + dv // h
       + d * dv + dv * d)  # q, k, v; beta; convs; norm; output gate; o
  return n + (d * h + 2 * h if gated else 0)  # decay projection, A_log, dt_bias


def _attention(d, o):
  """q, o: d x H K; k, v: d x Hkv K; biases on q, k, v (and o); per-head
  q/k norm scales (Qwen3)."""
  h = o["n_heads"]
  kv, hd = o.get("n_kv_heads") or h, o.get("head_dim") or d // h
  n = 2 * d * h * hd + 2 * d * kv * hd
  n += (h * hd + 2 * kv * hd) * bool(o.get("qkv_bias")) + d * bool(o.get("o_bias"))
  return n + 2 * hd * bool(o.get("qk_norm"))


def _lolcats(d, o):
  """The attention's, plus two Hedgehog maps (W [H, K, F], b [H, F]) and a
  window factor per head."""
  h, hd = o["n_heads"], o.get("head_dim") or d // o["n_heads"]
  f = o.get("feature_dim") or hd
  return _attention(d, o) + 2 * (h * hd * f + h * f) + h


def _ssm(d, o, n=64):
  # Per channel: log dt, skip D; per (channel, complex mode), N / 2 modes: log -Re A,
  # Im A, Re/Im B, Re/Im C; then the d x d output map.
  return 2 * d + 6 * d * (n // 2) + d * d


def _mamba(d, o, n=16, expand=2, width=4):
  e, r = expand * d, -(-d // 16)
  return (2 * d * e + (width + 1) * e + 2 * e * n + 2 * e * r + e + e * n + e
          + e * d)  # in_proj, conv, B/C, low-rank dt, dt_bias, A, D, out_proj


def _mamba2(d, o, width=4):
  h, n, e = o["n_heads"], o.get("state_size", 64), o.get("expand", 2) * d
  return (d * (2 * e + 2 * n + h) + (width + 1) * (e + 2 * n)  # in_proj, conv
          + 3 * h + e // h + e * d)  # dt_bias, A_log, D; norm; out_proj


def _lightning(d, o):
  return 5 * d * d  # q, k, v, u, o; SRMSNorm has no parameters


def _retnet(d, o):
  dv = round(d * o.get("expand_v", 2.0))
  return 2 * d * d + 3 * d * dv + 2 * dv  # q, k; v, g, o; GroupNorm scale, bias


def _based(d, o):
  h, f = o["n_heads"], o.get("feature_dim", 16)
  return 2 * d * h * f + 2 * d * d + _attention(d, o)  # q, k; v, o; window branch


def _hedgehog(d, o):
  h = o["n_heads"]
  k = d // h
  return 4 * d * d + 2 * (h * k * k + h * k)  # q, k, v, o; two maps W, b


def _mom(d, o, m=4, conv=4):
  h, dk, dv = o["n_heads"], round(d * o.get("expand_k", 1.0)), round(
      d * o.get("expand_v", 1.0))
  s = m + 1  # routed memories + the shared one
  return (d * m + d * dk + s * d * (dk + dv)  # router, q, per-memory k and v
          + (conv + 1) * (dk + s * (dk + dv))  # short convs on q, k, v
          + 2 * d * s * h + 2 * s * h  # beta and decay projections, A_log, dt_bias
          + dv // h + d * dv + dv * d)  # norm scale, output gate, output projection


def _delta_product(d, o, conv=4):
  h, dk, dv = o["n_heads"], round(d * o.get("expand_k", 1.0)), round(
      d * o.get("expand_v", 1.0))
  n = o.get("n_householder", 2)
  out = (d * (dk + n * dk + n * dv) + d * h * n  # q, n_h keys and values; betas
         + (conv + 1) * (dk + n * dk + n * dv)  # short convs
         + dv // h + d * dv + dv * d)  # norm, output gate, output projection
  return out + (d * h + 2 * h if o.get("gated", True) else 0)  # a, A_log, dt_bias


def _kda(d, o, gdn2=False, conv=4):
  h, dk, dv = o["n_heads"], round(d * o.get("expand_k", 1.0)), round(
      d * o.get("expand_v", 1.0))
  r = o.get("gate_rank") or dv // h
  gates = d * (dk + dv) if gdn2 else d * h  # e and w, or beta
  return (d * (2 * dk + dv) + (conv + 1) * (2 * dk + dv)  # q, k, v; convs
          + d * r + r * dk + h + dk + gates  # low-rank decay, A_log, dt_bias
          + d * r + r * dv + dv  # low-rank output gate with its bias
          + dv // h + dv * d)  # norm, output projection


def _rwkv7(d, o):
  # RWKV-7's LoRA ranks (flash-linear-attention's defaults) for heads of N.
  n = d // o["n_heads"]
  rank = lambda c, f: max(32, int(round(c * d ** 0.5 * f / 32) * 32))  # noqa: E731
  r_w = r_a = rank(2.5, n / 64)
  r_g = rank(5, 1.0)
  return (6 * d + 3 * d * d  # mu (r, w, k, v, a, g); r, k, v projections
          + 2 * d * r_w + d + 2 * d * r_a + d  # decay LoRA + w0, rate LoRA + a0
          + 2 * d * r_g  # output-gate LoRA (no bias)
          + 3 * d + 2 * d + d * d)  # k_k, k_a, r_k; GroupNorm scale, bias; o


MIXER_COUNT = {"gla": _gla, "delta_net": lambda d, o: _delta(d, o, False),
               "gated_delta_net": lambda d, o: _delta(d, o, True),
               "attention": _attention, "lssl": _ssm, "s4d": _ssm, "mamba": _mamba, "mamba2": _mamba2,
               "lightning": _lightning, "retnet": _retnet, "based": _based,
               "hedgehog": _hedgehog, "mom": _mom, "delta_product": _delta_product,
               "kda": _kda, "gdn2": lambda d, o: _kda(d, o, gdn2=True),
               "rwkv7": _rwkv7, "lolcats": _lolcats, "liger": _attention,
               "gdn_attention": lambda d, o: _attention(d, o) + 2 * d * o["n_heads"]
               + 2 * o["n_heads"]}


def _mlp_count(d, mlp):
  """SwiGLU: gate, up, down at 8/3 d (rounded up to 64); RWKV-7's channel
  mixing: mu_k, key, value at 4 d (rounded up to 32)."""
  if mlp == "rwkv7":
    return d + 2 * d * (32 * -(-4 * d // 32))
  return 3 * d * default_mlp_hidden(d)


def closed_form(cfg: LMConfig) -> int:
  d, v = cfg.d_model, cfg.vocab_size
  opts = lambda m: {"n_heads": cfg.n_heads, **cfg.mixer_kwargs.get(m, {})}
  block = lambda m: 2 * d + _mlp_count(d, cfg.mlp) + MIXER_COUNT[m](d, opts(m))
  n = v * d + sum(block(m) for m in cfg.layer_mixers) + d
  return n + (0 if cfg.tie_embeddings else d * v)


def _preset(mixer: str, size: str) -> LMConfig:
  """The ``lm_run`` model section of ``mixer`` at ``size``, 32k vocabulary."""
  model = dict(common.lm_run(f"mixer={mixer},size={size}").model)
  return LMConfig(**{**model, "vocab_size": 32000})


@pytest.mark.parametrize("size", sorted(common.SIZES))
@pytest.mark.parametrize("mixer", sorted(MIXER_COUNT))
def test_preset_parameter_counts_match_closed_form(size, mixer):
  cfg = _preset(mixer, size)
  # lm_run gives each mixer its paper's block MLP (RWKV-7: its channel mixing).
  assert cfg.mlp == common.PAPER_MLP.get(mixer, "swiglu")
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  n = count_params(model)
  assert n == closed_form(cfg)
  mixing = flops_per_token(cfg, n, 2048) - 6.0 * n
  assert 0 < mixing < 6.0 * n, mixing  # the mixers' own term, below the weights'


@pytest.mark.parametrize("options", [
    dict(n_kv_heads=2, head_dim=24, qkv_bias=True, qk_norm=True),
    dict(n_kv_heads=1, qkv_bias=True, o_bias=True, feature_dim=8)])
@pytest.mark.parametrize("mixer", ["attention", "lolcats", "liger", "gdn_attention"])
def test_imported_attention_options_and_adapters_match_closed_form(mixer, options):
  """Grouped keys, explicit head dims, biases, q/k norms, and LoRA adapters
  (rank r: d_in r + r d_out per adapted projection)."""
  if mixer != "lolcats":
    options = {k: v for k, v in options.items() if k != "feature_dim"}
  cfg = LMConfig(vocab_size=50, d_model=48, n_layers=2, n_heads=4, mixer=mixer,
                 mixer_kwargs={mixer: options})
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  assert count_params(model) == closed_form(cfg)
  lora = LMConfig(**{**cfg.__dict__, "lora": {"rank": 3,
                                              "targets": ["q_proj", "o_proj"]}})
  adapted = nnx.eval_shape(lambda: LanguageModel(lora, rngs=nnx.Rngs(0)))
  h, hd = 4, options.get("head_dim", 12)
  per_layer = 3 * (48 + h * hd) + 3 * (h * hd + 48)
  assert count_params(adapted) == closed_form(cfg) + 2 * per_layer


def test_rwkv7_channel_mixing_count_and_the_swiglu_option():
  """RWKV-7's channel mixing in other mixers' blocks, and SwiGLU in RWKV-7's
  (``mlp=`` in the config arg), match the closed form."""
  for arg, mlp in (("mixer=gla,mlp=rwkv7", "rwkv7"),
                   ("mixer=rwkv7,mlp=swiglu", "swiglu")):
    cfg = LMConfig(**{**dict(common.lm_run(f"{arg},size=20m").model),
                      "vocab_size": 32000})
    assert cfg.mlp == mlp
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))  # noqa: B023
    assert count_params(model) == closed_form(cfg), arg


# The papers' per-head (K, V) at d_model 2048 (flash-linear-attention's model
# configs; Mamba-2: state N and head dim P), written from the papers, not from
# the presets.
PAPER_HEADS_2048 = {"gla": (4, 256, 512), "delta_net": (16, 128, 128),
                    "gated_delta_net": (6, 256, 512), "retnet": (8, 256, 512),
                    "mamba2": (64, 128, 64), "delta_product": (6, 256, 512),
                    "kda": (16, 128, 128), "gdn2": (16, 128, 128),
                    "rwkv7": (32, 64, 64)}


@pytest.mark.parametrize("mixer", sorted(PAPER_HEADS_2048))
def test_1_3b_presets_have_the_papers_heads(mixer):
  cfg = _preset(mixer, "1.3b")
  layer = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))).blocks[0].mixer
  if mixer == "mamba2":
    shape = (layer.n_heads, layer.state_size, layer.inner // layer.n_heads)
  elif mixer == "retnet":
    shape = (layer.n_heads, layer.d_model // layer.n_heads,
             layer.value_dim // layer.n_heads)
  else:
    shape = (layer.n_heads, layer.key_dim // layer.n_heads,
             layer.value_dim // layer.n_heads)
  assert shape == PAPER_HEADS_2048[mixer]


def test_flops_per_token_reads_the_head_shapes():
  """Two GLA configs with the same parameters but other head counts differ in
  their recurrence FLOPs by the ratio of their H K V (12 H K V per token)."""
  base = dict(vocab_size=64, d_model=128, n_layers=1, mixer="gla")
  four = LMConfig(**base, n_heads=4)
  one = LMConfig(**base, n_heads=1)
  n = 10 ** 6
  # K = 64 and V = 128 in total: H K V = 64 * 128 / H.
  assert flops_per_token(one, n, 512) - flops_per_token(four, n, 512) == (
      12 * 64 * 128 * (1 - 1 / 4))
  attn = LMConfig(**{**base, "mixer": "attention"}, n_heads=2)
  assert flops_per_token(attn, n, 512) - 6.0 * n == 12 * 128 * 256


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
