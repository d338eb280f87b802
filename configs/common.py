"""Shared pieces of the run configs: size presets, ``:arg`` parsing and
``section``, which fills a section with every field of lsm's typed config at its
default.

The config files themselves import only ml_collections and this module. This
module reads the defaults from lsm's dataclasses (``lsm.train.loop.SECTIONS``)
rather than repeating them, so a default changed there is the default of every
config (and every field can be overridden with ``--config.<section>.<field>``).
"""

import dataclasses
import json
import os
import types
import typing

import ml_collections
from ml_collections.config_dict import placeholder

_SIMPLE = (int, float, str, bool)


def _placeholder(annotation):
  """A typed None for ``T | None`` of a simple T, else None (not overridable
  from the command line, as before)."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(
      annotation) is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and args[0] in _SIMPLE:
      return placeholder(args[0])
  return None


def section(name: str, **values) -> dict:
  """Section ``name`` ("model", "data", "optim", "train", "mesh"): every field
  of its dataclass at the default, then ``values``. A None default of a simple
  type becomes a typed placeholder, so ``--config.train.keep_period=100``
  parses; other None defaults are left out."""
  from lsm.train import loop  # pylint: disable=g-import-not-at-top
  out = {}
  for field in dataclasses.fields(loop.SECTIONS[name]):
    if field.default is not dataclasses.MISSING:
      out[field.name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      out[field.name] = field.default_factory()
  out.update(values)
  hints = typing.get_type_hints(loop.SECTIONS[name])
  for key in [k for k, v in out.items() if v is None]:
    typed = _placeholder(hints.get(key))
    if typed is None:
      del out[key]
    else:
      out[key] = typed
  return out

# Model shapes. 340m and 1.3b follow the GLA / DeltaNet papers (Yang et al. 2023,
# 2024: d_model 1024 / 2048, 24 layers); 125m and 760m follow the GPT-3 / Mamba
# ladder (768 x 12, 1536 x 24); 20m is for CPU work. Each mixer's heads follow
# its paper at that width (``preset``, beside the mixer in lsm/layers), in
# model.mixer_kwargs. Parameter counts depend on the mixer and vocabulary:
# tests/models/test_lm.py checks each preset against a closed form.
SIZES = {
    "20m": dict(d_model=384, n_layers=8),
    "125m": dict(d_model=768, n_layers=12),
    "340m": dict(d_model=1024, n_layers=24),
    "760m": dict(d_model=1536, n_layers=24),
    "1.3b": dict(d_model=2048, n_layers=24),
}
# Tiny shapes that compile and run one step on a laptop CPU in seconds.
SMOKE = dict(d_model=64, n_layers=2, n_heads=2, vocab_size=256, chunk_size=16)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"size=20m,impl=chunked,smoke=True"`` over ``defaults``.

  Every key must be one of the defaults; values are converted to the default's
  type (bools accept true/false/1/0).
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config arg {item!r}: expected key=value with key one of "
                       f"{sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r}: expected true or false")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def check_size(size: str) -> dict:
  if size not in SIZES:
    raise ValueError(f"size={size!r}; expected one of {sorted(SIZES)}")
  return dict(SIZES[size])


def head_shapes(mixers, d_model: int) -> dict:
  """{mixer: its paper's head options at width ``d_model``} for each known
  name in ``mixers`` (each mixer's ``preset`` in lsm/layers)."""
  from lsm import layers  # pylint: disable=g-import-not-at-top
  return {m: layers.MIXERS[m].preset(d_model) for m in dict.fromkeys(mixers)
          if m in layers.MIXERS}


# The corpus the quick start trains on: lsm's own source and docs, read from the
# repository checkout (paths relative to the working directory). No download.
EMBEDDED_GLOBS = ("lsm/**/*.py", "configs/*.py", "experiments/*.py", "*.md")
# Byte tokenizer: 256 bytes + pad, bos, eos = 259 ids, rounded up to a multiple
# of 64 so the embedding and head shard evenly.
BYTE_VOCAB = 320
HYBRID = ("delta_net", "delta_net", "delta_net", "attention")
# The block MLP of a mixer's paper where it is not SwiGLU: RWKV-7 pairs its time
# mixing with its channel mixing (relu^2 with a token shift, hidden 4 d).
PAPER_MLP = {"rwkv7": "rwkv7"}


def data_section(spec: str, *, seq_len: int, batch_size: int) -> dict:
  """The data section for ``data=`` in a config arg.

  spec: "embedded" (EMBEDDED_GLOBS), "tfds:NAME" (a prepared tfds dataset with a
  "text" feature, e.g. tfds:lm1b), or "text:GLOB[;GLOB...]" (your text files,
  built into an array_record tfds dataset on first use).
  """
  data = section("data", seq_len=seq_len, batch_size=batch_size)
  if spec == "embedded":
    data.update(source="local_text", globs=EMBEDDED_GLOBS)
  elif spec.startswith("tfds:"):
    data.update(source="tfds", name=spec[5:])
  elif spec.startswith("text:"):
    data.update(source="local_text", globs=tuple(spec[5:].split(";")))
  else:
    raise ValueError(f"config arg data={spec!r}; expected embedded, tfds:NAME or "
                     "text:GLOB")
  return data


def lm_run(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """A complete pretraining config (model, data, optim, train, mesh sections).

  Args (``:arg``): mixer (a name in lsm.layers.MIXERS, or "hybrid": three
  delta_net layers then one attention layer, repeated), mlp (the blocks' MLP,
  "swiglu" or "rwkv7"; empty for the mixer's paper's: ``PAPER_MLP``), size
  (SIZES), impl,
  vocab_size (0: the byte tokenizer's BYTE_VOCAB), beta_scale (DeltaNet
  eigenvalue range: 2 gives [-1, 1]), eigenvalues (Mamba and Mamba-2 decays:
  positive or signed), data (see data_section), seq_len, batch_size, steps (0 for the
  preset), smoke (tiny shapes that train on a CPU in under a minute).
  """
  arg = parse_arg(arg, **{**dict(
      mixer="gla", mlp="", size="20m", impl="auto", vocab_size=0, beta_scale=1.0,
      eigenvalues="positive", data="embedded", seq_len=0, batch_size=0,
      steps=0, smoke=False), **defaults})
  c = ml_collections.ConfigDict()
  model = dict(vocab_size=arg.vocab_size or BYTE_VOCAB, impl=arg.impl,
               **check_size(arg.size))
  if arg.mixer == "hybrid":
    model["pattern"] = HYBRID
  else:
    model["mixer"] = arg.mixer
  model["mlp"] = arg.mlp or PAPER_MLP.get(arg.mixer, "swiglu")
  # beta_scale=2 lets DeltaNet transitions reach eigenvalue -1 (state tracking).
  options = mixer_kwargs(arg.beta_scale, arg.eigenvalues)
  if not arg.smoke:  # the papers' heads; smoke runs keep SMOKE's 2 small heads
    mixers = HYBRID if arg.mixer == "hybrid" else (arg.mixer,)
    for name, shape in head_shapes(mixers, model["d_model"]).items():
      options[name] = {**shape, **options.get(name, {})}
  model["mixer_kwargs"] = options
  # seq_len, batch_size, steps: 0 takes the preset (smoke or full).
  seq_len, batch_size, steps = 2048, 64, 20000
  if arg.smoke:
    model.update(SMOKE, vocab_size=arg.vocab_size or BYTE_VOCAB)
    if arg.mixer == "hybrid":
      model["n_layers"] = len(HYBRID)
    seq_len, batch_size, steps = 128, 8, 60
  seq_len = arg.seq_len or seq_len
  batch_size = arg.batch_size or batch_size
  steps = arg.steps or steps
  c.model = section("model", **model)
  c.data = data_section(arg.data, seq_len=seq_len, batch_size=batch_size)
  # GLA / DeltaNet paper recipe (AdamW 0.9/0.95, wd 0.1, clip 1, cosine to 10%),
  # with the peak rate for ~100M-400M models; smoke runs use a hotter rate.
  c.optim = section("optim", lr=1e-2 if arg.smoke else 3e-4,
                    warmup_steps=10 if arg.smoke else 1000, min_lr_ratio=0.1,
                    weight_decay=0.1, clip_norm=1.0, b1=0.9, b2=0.95)
  c.train = section("train", num_steps=steps,
                    log_every=10 if arg.smoke else 50,
                    eval_every=steps // 2 if arg.smoke else 1000, eval_steps=4,
                    checkpoint_every=steps // 2 if arg.smoke else 1000)
  # data=-1: all devices do data parallelism; raise fsdp for models whose
  # optimiser state does not fit one device, seq for long context.
  c.mesh = section("mesh", shape=dict(data=-1, fsdp=1, seq=1, tensor=1))
  return c


def task_sections(c: ml_collections.ConfigDict, *, steps: int, batch_size: int,
                  lr: float, seed: int, smoke: bool,
                  weight_decay: float = 0.1) -> ml_collections.ConfigDict:
  """data, optim, train and mesh sections of a synthetic-task run (the model
  and task sections are the caller's). One eval of every test size at the end;
  AdamW (decoupled ``weight_decay`` on matrices) with cosine decay to 0
  (Grazzi et al.'s recipe)."""
  if smoke:
    steps, batch_size = 30, 16
  # Task rows take their length from the task (task.max_tokens); data.seq_len
  # is for text.
  c.data = section("data", source="task", batch_size=batch_size, seed=seed,
                   seq_len=8, eval_split="eval")
  c.optim = section("optim", lr=lr, warmup_steps=min(100, steps // 10),
                    min_lr_ratio=0.0, weight_decay=weight_decay, clip_norm=1.0,
                    b1=0.9, b2=0.999)
  c.train = section("train", num_steps=steps, seed=seed,
                    log_every=min(100, steps), eval_every=steps,
                    eval_steps=2 if smoke else 4, checkpoint_every=steps,
                    keep_checkpoints=1)
  c.mesh = section("mesh", shape=dict(data=-1, fsdp=1, seq=1, tensor=1))
  return c


def mixer_kwargs(beta_scale: float, eigenvalues: str) -> dict:
  """Eigenvalue ranges: the delta-rule mixers' beta_scale (DeltaNet, Gated
  DeltaNet, DeltaProduct, KDA, GDN-2's erase gate; 2: [-1, 1]), Mamba and
  Mamba-2 decays. RWKV-7 has no beta_scale: its transition diag(w) -
  kk (alpha o kk)^T with alpha in (0, 1) is the paper's, left as it is."""
  return {"delta_net": {"beta_scale": beta_scale},
          "gated_delta_net": {"beta_scale": beta_scale},
          "delta_product": {"beta_scale": beta_scale},
          "kda": {"beta_scale": beta_scale},
          "gdn2": {"beta_scale": beta_scale},
          "mamba": {"eigenvalue_range": eigenvalues},
          "mamba2": {"eigenvalue_range": eigenvalues},
          # The linearised-attention mixers' softmax windows (their papers'
          # 64), here so that --config.model.mixer_kwargs.lolcats.local_window
          # overrides them.
          "lolcats": {"local_window": 64}, "liger": {"local_window": 64}}


def teacher_data(teacher: str) -> dict:
  """The data options that fit the teacher: its tokenizer.json (Hugging Face)
  or its run's tokenizer (lsm)."""
  path = os.path.join(teacher, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  if "model_type" in raw:
    tok = os.path.join(teacher, "tokenizer.json")
    return {"tokenizer": "hf", "tokenizer_path": tok} if os.path.isfile(tok) else {}
  data = raw.get("data") or {}
  return {k: data[k] for k in ("tokenizer", "tokenizer_path") if data.get(k)}
