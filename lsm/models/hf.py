"""Hugging Face Llama-family checkpoints in and out: config.json plus
safetensors shards <-> an lsm ``LanguageModel`` of softmax-attention blocks.

Families (``config.json``'s ``model_type``): ``llama``, ``mistral``, ``qwen2``,
``qwen3``. All are pre-norm decoders of RMSNorm, attention and a SwiGLU MLP,
which is lsm's block; they differ in what the attention carries:

=========  ==========================  ====================================
family     biases                      other
=========  ==========================  ====================================
llama      q, k, v, o when             RoPE scaling (linear, llama3, yarn)
           ``attention_bias``
mistral    none                        ``sliding_window`` on every layer
qwen2      q, k, v                     sliding window per ``layer_types``
qwen3      q, k, v, o when             RMSNorm on each head of q and k
           ``attention_bias``
=========  ==========================  ====================================

Every family has grouped-query attention (``num_key_value_heads``), an explicit
or derived ``head_dim`` and tied or untied output heads. Weights are read with
``safetensors`` (no torch), one tensor at a time; with ``shardings`` each
device reads only its own slice of each tensor (``jax.make_array_from_callback``
over ``safe_open(...).get_slice``), so a checkpoint larger than one host's memory
loads straight into a mesh. Parameters come back float32 whatever the file
holds (lsm's float32-parameter policy; bf16 -> float32 is exact).

Layout: Hugging Face stores a linear layer as weight [out, in] and lsm as
kernel [in, out]; every kernel is the transpose, nothing else changes (RoPE is
rotate-half in both, and q/k head order is the same).
"""

import json
import os
import shutil
import tempfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx

from lsm.layers.rope import rope_frequencies
from lsm.models.lm import LMConfig, LanguageModel

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def _fail(path, what: str):
  raise ValueError(f"{path}: {what}")


def read_config(path) -> dict:
  """The checkpoint directory's config.json, checked to be a supported family."""
  path = os.fspath(path)
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    _fail(path, f"no {CONFIG}; expected a Hugging Face checkpoint directory")
  try:
    with open(file, encoding="utf-8") as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    _fail(file, f"not JSON ({e})")
  family = hf.get("model_type")
  if family not in FAMILIES:
    _fail(file, f"model_type={family!r}; expected one of {sorted(FAMILIES)}")
  return hf


def _rope_scaling(hf: Mapping):
  """(rope_theta, scaling or None) from either config format: transformers 4's
  ``rope_theta`` + ``rope_scaling``, or 5's ``rope_parameters``."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
  scaling.update(params)
  kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
  if kind == "default":
    return float(theta), None
  scaling["rope_type"] = kind
  if kind in ("llama3", "yarn"):
    scaling.setdefault("original_max_position_embeddings",
                       hf.get("original_max_position_embeddings")
                       or hf.get("max_position_embeddings"))
  return float(theta), scaling


def _window(hf: Mapping, path):
  """The attention window of every layer, or None; one value for all layers."""
  family = hf["model_type"]
  n = hf["num_hidden_layers"]
  window = hf.get("sliding_window")
  if family == "mistral":
    return window
  if family in ("qwen2", "qwen3"):
    kinds = hf.get("layer_types")
    if kinds is None:
      sliding = bool(hf.get("use_sliding_window"))
      first = hf.get("max_window_layers", n)
      kinds = ["sliding_attention" if sliding and i >= first else "full_attention"
               for i in range(n)]
    if len(set(kinds)) > 1:
      _fail(path, f"layer_types mixes {sorted(set(kinds))}; expected one kind for "
                  "every layer (lsm gives all attention layers one window)")
    return window if kinds and kinds[0] == "sliding_attention" else None
  return None


def lm_config(hf: Mapping, path="config.json") -> LMConfig:
  """The ``LMConfig`` of a checked Hugging Face config (``read_config``)."""
  family = hf["model_type"]
  for key in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads"):
    if not isinstance(hf.get(key), int) or hf[key] < 1:
      _fail(path, f"{key}={hf.get(key)!r}; expected a positive int")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    _fail(path, f"hidden_act={act!r}; expected 'silu' (SwiGLU MLP)")
  if hf.get("mlp_bias"):
    _fail(path, "mlp_bias=true; expected false (lsm's SwiGLU has no biases)")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  theta, scaling = _rope_scaling(hf)
  try:
    rope_frequencies(head_dim, theta, scaling)
  except ValueError as e:
    _fail(path, str(e))
  bias = bool(hf.get("attention_bias", False))
  attention = dict(
      n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      rope_base=theta, rope_scaling=scaling,
      qkv_bias=True if family == "qwen2" else bias,
      o_bias=False if family in ("qwen2", "mistral") else bias,
      qk_norm=family == "qwen3", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      window=_window(hf, path))
  return LMConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                  n_layers=hf["num_hidden_layers"], n_heads=heads,
                  mixer="attention", mlp="swiglu",
                  mlp_hidden=hf["intermediate_size"],
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  mixer_kwargs={"attention": attention})


def hf_config(cfg: LMConfig, base: Mapping | None = None) -> dict:
  """A Hugging Face config.json dict for ``cfg``, a stack of attention blocks
  with SwiGLU MLPs. ``base`` (the imported checkpoint's config) keeps the
  fields lsm does not model (token ids, max_position_embeddings, ...)."""
  if cfg.layer_mixers != ("attention",) * cfg.n_layers or cfg.mlp != "swiglu" \
      or not cfg.mlp_width:
    raise ValueError(f"hf_config: layers {sorted(set(cfg.layer_mixers))} with mlp="
                     f"{cfg.mlp!r}, mlp_hidden={cfg.mlp_width}; expected attention "
                     "in every layer and a SwiGLU MLP (the Llama family)")
  a = {"n_kv_heads": cfg.n_heads, "head_dim": cfg.d_model // cfg.n_heads,
       "rope_base": 10000.0, "rope_scaling": None, "qkv_bias": False,
       "o_bias": False, "qk_norm": False, "norm_eps": 1e-6, "window": None,
       **cfg.mixer_kwargs.get("attention", {})}
  a["n_heads"] = a.get("n_heads", cfg.n_heads)
  fits = [f for f in FAMILIES if _fits(f, a)]
  if not fits:
    raise ValueError(f"hf_config: attention options {a} fit no family of "
                     f"{sorted(FAMILIES)} (e.g. o_bias without qkv_bias)")
  # The base checkpoint's family where the model still fits it.
  family = (base or {}).get("model_type")
  if family not in fits:
    family = fits[0]
  if a["norm_eps"] != cfg.norm_eps:
    raise ValueError(f"hf_config: attention norm_eps={a['norm_eps']} != the "
                     f"model's norm_eps={cfg.norm_eps}; the families share one "
                     "rms_norm_eps")
  out = dict(base or {})
  if out.get("model_type") not in (None, family):
    out = {k: v for k, v in out.items()
           if k in ("bos_token_id", "eos_token_id", "pad_token_id",
                    "max_position_embeddings")}
  for key in ("rope_parameters", "rope_scaling", "layer_types",
              "use_sliding_window", "max_window_layers", "sliding_window",
              "attention_bias", "mlp_bias", "torch_dtype", "dtype"):
    out.pop(key, None)
  out.update(
      architectures=[FAMILIES[family]], model_type=family,
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.n_layers,
      num_attention_heads=a["n_heads"], num_key_value_heads=a["n_kv_heads"],
      head_dim=a["head_dim"], hidden_act="silu", rms_norm_eps=cfg.norm_eps,
      rope_theta=a["rope_base"], tie_word_embeddings=cfg.tie_embeddings,
      torch_dtype="float32")
  out.setdefault("max_position_embeddings", 4096)
  if a["rope_scaling"] is not None:
    out["rope_scaling"] = dict(a["rope_scaling"])
  if family in ("llama", "qwen3"):
    out["attention_bias"] = a["qkv_bias"]
  if family == "llama":
    out["mlp_bias"] = False
  if family == "mistral":
    out["sliding_window"] = a["window"]
  if family in ("qwen2", "qwen3"):
    kind = "full_attention" if a["window"] is None else "sliding_attention"
    out.update(use_sliding_window=a["window"] is not None,
               sliding_window=a["window"], max_window_layers=0,
               layer_types=[kind] * cfg.n_layers)
  return out


def _fits(family: str, a: Mapping) -> bool:
  """Whether attention options ``a`` are expressible in ``family``'s config."""
  same_bias = a["qkv_bias"] == a["o_bias"]
  return {"llama": same_bias and not a["qk_norm"] and a["window"] is None,
          "mistral": not a["qkv_bias"] and not a["o_bias"] and not a["qk_norm"],
          "qwen2": a["qkv_bias"] and not a["o_bias"] and not a["qk_norm"],
          "qwen3": same_bias and a["qk_norm"]}[family]


def _hf_name(path: tuple) -> tuple[str, bool]:
  """(Hugging Face tensor name, transposed?) of an lsm parameter path."""
  keys = tuple(getattr(p, "key", p) for p in path)
  match keys:
    case ("embed", "embedding"):
      return "model.embed_tokens.weight", False
    case ("norm", "scale"):
      return "model.norm.weight", False
    case ("head", "kernel"):
      return "lm_head.weight", True
    case ("blocks", i, "mixer_norm", "scale"):
      return f"model.layers.{i}.input_layernorm.weight", False
    case ("blocks", i, "mlp_norm", "scale"):
      return f"model.layers.{i}.post_attention_layernorm.weight", False
    case ("blocks", i, "mixer", proj, "kernel"):
      return f"model.layers.{i}.self_attn.{proj}.weight", True
    case ("blocks", i, "mixer", proj, "bias"):
      return f"model.layers.{i}.self_attn.{proj}.bias", False
    case ("blocks", i, "mixer", norm, "scale"):
      return f"model.layers.{i}.self_attn.{norm}.weight", False
    case ("blocks", i, "mlp", proj, "kernel"):
      return f"model.layers.{i}.mlp.{proj}_proj.weight", True
  raise ValueError(f"no Hugging Face name for the lsm parameter {'.'.join(map(str, keys))}")


def abstract_params(cfg: LMConfig) -> dict:
  """The model's parameters as a pure dict of ShapeDtypeStructs."""
  _, params = nnx.eval_shape(
      lambda: nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  return nnx.to_pure_dict(params)


class _Shards:
  """Open safetensors files of a checkpoint, by tensor name."""

  def __init__(self, path):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._open = safe_open
    self.path = path
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        self.where = dict(json.load(f)["weight_map"])
      for file in sorted(set(self.where.values())):
        if not os.path.isfile(os.path.join(path, file)):
          _fail(path, f"shard {file} (named in {INDEX}) is missing")
    elif os.path.isfile(os.path.join(path, SINGLE)):
      self.where = None
    else:
      _fail(path, f"no {SINGLE} or {INDEX}; expected the safetensors weights")
    self._files = {}

  def _file(self, name):
    file = SINGLE if self.where is None else self.where.get(name)
    if file is None:
      _fail(self.path, f"tensor {name} is not in {INDEX}")
    if file not in self._files:
      self._files[file] = self._open(os.path.join(self.path, file),
                                     framework="numpy")
    handle = self._files[file]
    if name not in handle.keys():
      _fail(os.path.join(self.path, file), f"has no tensor {name}")
    return handle

  def slice(self, name):
    return self._file(name).get_slice(name)


def check_weights(path) -> None:
  """Raises (naming the file) unless the checkpoint's safetensors files, and
  every shard its index names, are there. Reads only the index."""
  _Shards(os.fspath(path))


def load_params(path, cfg: LMConfig | None = None, *, shardings=None,
                dtype=jnp.float32) -> dict:
  """The checkpoint's weights as lsm parameters (a pure dict, the layout of
  the trainer's ``state["params"]``).

  Args:
    path: the checkpoint directory.
    cfg: the model config; ``lm_config(read_config(path))`` when None.
    shardings: optional pure dict of ``jax.sharding.Sharding`` in the same
      layout (the trainer's ``Setup.shardings["params"]``): each device reads
      only its slice of each tensor.
    dtype: the parameters' dtype (float32: the trainer's policy).
  """
  path = os.fspath(path)
  if cfg is None:
    cfg = lm_config(read_config(path), os.path.join(path, CONFIG))
  shards = _Shards(path)
  abstract = abstract_params(cfg)
  flat_sh = None
  if shardings is not None:
    flat_sh = dict(jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))

  def read(key_path, leaf):
    name, transposed = _hf_name(key_path)
    tensor = shards.slice(name)
    want = tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape)
    have = tuple(tensor.get_shape())
    if have != want:
      _fail(path, f"tensor {name} has shape {list(have)}; expected {list(want)} "
                  "from config.json")

    def block(index=None):
      index = tuple(index or (slice(None),) * len(want))
      if transposed:
        return np.asarray(tensor[index[::-1]]).T.astype(dtype)
      return np.asarray(tensor[index]).astype(dtype)

    if flat_sh is None:
      return jnp.asarray(block())
    return jax.make_array_from_callback(leaf.shape, flat_sh[key_path], block)

  return jax.tree_util.tree_map_with_path(read, abstract)


def load(path, *, shardings=None) -> tuple[LanguageModel, dict]:
  """(a ``LanguageModel`` holding the checkpoint, its config.json dict)."""
  path = os.fspath(path)
  hf = read_config(path)
  cfg = lm_config(hf, os.path.join(path, CONFIG))
  params = load_params(path, cfg, shardings=shardings)
  graphdef, state = nnx.eval_shape(
      lambda: nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state), hf


def save(path, cfg: LMConfig, params, *, base_config: Mapping | None = None,
         dtype=np.float32, max_shard_bytes: int = 5 * 2**30,
         tokenizer_dir=None):
  """Writes ``params`` (a pure dict, or a ``LanguageModel``) as a Hugging Face
  checkpoint directory ``path``: config.json, safetensors shards of at most
  ``max_shard_bytes`` (with an index when there are several) and, from
  ``tokenizer_dir``, the tokenizer files it has. ``path`` must not exist or be
  empty: nothing already there is overwritten. Written to a temporary sibling
  and renamed, so a failed save leaves nothing behind."""
  path = os.fspath(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    _fail(path, "exists and is not an empty directory; expected a new path "
                "(save never overwrites)")
  config = hf_config(cfg, base_config)
  if isinstance(params, nnx.Module):
    params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
  expected = abstract_params(cfg)
  if jax.tree.structure(expected) != jax.tree.structure(params):
    raise ValueError("save: params do not have the layout of cfg's model")
  tensors = {}
  for key_path, x in jax.tree_util.tree_leaves_with_path(params):
    name, transposed = _hf_name(key_path)
    x = np.asarray(jax.device_get(x))
    tensors[name] = np.ascontiguousarray(x.T if transposed else x).astype(dtype)
  if cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)
  config["torch_dtype"] = np.dtype(dtype).name

  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".hf-save-", dir=parent)
  try:
    groups, size = [[]], 0
    for name in sorted(tensors):
      nbytes = tensors[name].nbytes
      if groups[-1] and size + nbytes > max_shard_bytes:
        groups.append([])
        size = 0
      groups[-1].append(name)
      size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
      file = SINGLE if len(groups) == 1 else (
          f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
      save_file({n: tensors[n] for n in names}, os.path.join(tmp, file),
                metadata={"format": "pt"})
      weight_map.update(dict.fromkeys(names, file))
    if len(groups) > 1:
      total = sum(t.nbytes for t in tensors.values())
      with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                  f, indent=2)
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    if tokenizer_dir is not None:
      for file in TOKENIZER_FILES:
        src = os.path.join(os.fspath(tokenizer_dir), file)
        if os.path.isfile(src):
          shutil.copyfile(src, os.path.join(tmp, file))
    if os.path.isdir(path):
      os.rmdir(path)  # empty (checked above)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path
