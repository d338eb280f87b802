"""Linearising a pretrained softmax-attention model (the ``linearize`` section
of a run config; ``lsm-linearize``).

The teacher is a Hugging Face Llama-family checkpoint directory
(lsm.models.hf) or an lsm run directory whose model is softmax attention. The
student is the teacher with its attention layers (all, or all but every
``keep_every``-th) replaced by a linearised mixer that keeps the attention's
projections (``student``: lolcats or liger, lsm.layers). The recipes run as
stages, each its own run and workdir, the stage recorded in its checkpoints:

* ``transfer`` (LoLCATs' stage 1, attention transfer): the teacher's weights
  frozen; only the student mixers' new parameters (feature maps, window
  factors) train, to match each converted layer's output to the teacher
  layer's on the teacher's own hidden states (lsm.models.distill).
  Starts from the teacher.
* ``finetune`` (stage 2): the next-token loss, optionally plus ``kl_weight``
  times KL(teacher || student), with LoRA adapters (``lora``: rank, alpha,
  targets) on the attention projections, or every parameter when ``lora`` is
  None. Starts from ``init`` (a transfer run's workdir) or, for students with
  nothing to transfer (liger), from the teacher. At the end the adapters are
  merged into the kernels and the merged student is written as an lsm run,
  ``<workdir>/merged`` (lsm-eval, lsm-generate and lsm-train read it).

Parameters follow the trainer's policy: float32 masters whatever the
checkpoint stores; adapters float32.
"""

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lsm import layers
from lsm.layers import lora as lora_lib
from lsm.models import hf
from lsm.models.lm import LMConfig

STAGES = ("transfer", "finetune")
STUDENTS = tuple(sorted(n for n, cls in layers.MIXERS.items()
                        if callable(getattr(cls, "teacher", None))))
MERGED = "merged"


@dataclasses.dataclass(frozen=True)
class LinearizeConfig:
  """The ``linearize`` section.

  Attributes:
    teacher: a Hugging Face checkpoint directory (config.json + safetensors)
      or an lsm run directory (config.json + checkpoints) of softmax attention.
    student: the linearised mixer replacing attention: one of STUDENTS.
    student_options: the student mixer's own options (e.g. local_window,
      feature_dim); the teacher's attention options are added to them.
    keep_every: 0 converts every attention layer; n keeps every n-th (layers
      n-1, 2n-1, ...) as softmax attention (a hybrid).
    stage: "transfer" or "finetune".
    init: a transfer run's workdir to start a finetune from (its newest
      checkpoint); None starts from the teacher.
    lora: adapters for finetune ({"rank", "alpha", "targets"}); None fine-tunes
      every parameter.
    kl_weight: weight of KL(teacher || student) per token in finetune (needs
      lora: the teacher is the base weights with the adapters zeroed).
    train_student_params: finetune also trains the student mixers' new
      parameters (with lora; without lora everything trains).
  """
  teacher: str = ""
  student: str = "lolcats"
  student_options: Mapping = dataclasses.field(default_factory=dict, hash=False)
  keep_every: int = 0
  stage: str = "transfer"
  init: str | None = None
  lora: Mapping | None = dataclasses.field(
      default_factory=lambda: {"rank": 8, "alpha": 16.0}, hash=False)
  kl_weight: float = 0.0
  train_student_params: bool = False

  def __post_init__(self):
    if not self.teacher:
      raise ValueError("linearize.teacher is empty; expected a Hugging Face "
                       "checkpoint directory or an lsm run directory")
    if self.student not in STUDENTS:
      raise ValueError(f"linearize.student={self.student!r}; expected one of "
                       f"{list(STUDENTS)}")
    if self.stage not in STAGES:
      raise ValueError(f"linearize.stage={self.stage!r}; expected one of "
                       f"{list(STAGES)}")
    if not isinstance(self.keep_every, int) or self.keep_every < 0:
      raise ValueError(f"linearize.keep_every={self.keep_every!r}; expected an "
                       "int >= 0")
    if self.init is not None and self.stage != "finetune":
      raise ValueError(f"linearize.init={self.init!r} with stage="
                       f"{self.stage!r}; expected init only for finetune")
    if self.lora is not None:
      object.__setattr__(self, "lora", lora_lib.check_options(dict(self.lora)))
    if not isinstance(self.kl_weight, (int, float)) or self.kl_weight < 0:
      raise ValueError(f"linearize.kl_weight={self.kl_weight!r}; expected >= 0")
    if self.kl_weight and (self.lora is None or self.stage != "finetune"):
      raise ValueError(f"linearize.kl_weight={self.kl_weight} with lora="
                       f"{self.lora} at stage {self.stage!r}; expected it only "
                       "for a LoRA finetune (its teacher is the base weights)")
    object.__setattr__(self, "student_options", dict(self.student_options))


def teacher_config(path: str | Path) -> LMConfig:
  """The teacher's model config, from a Hugging Face or an lsm config.json."""
  file = Path(path, "config.json")
  if not file.is_file():
    raise ValueError(f"linearize.teacher={str(path)!r}: no config.json there; "
                     "expected a Hugging Face checkpoint directory or an lsm "
                     "run directory")
  raw = json.loads(file.read_text())
  if "model_type" in raw:
    cfg = hf.lm_config(hf.read_config(path), Path(path, "config.json"))
  else:
    try:
      cfg = LMConfig(**raw["model"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"linearize.teacher={str(path)!r}: its config.json is "
                       f"neither a Hugging Face nor an lsm run config ({e})"
                       ) from None
  if "attention" not in cfg.layer_mixers:
    raise ValueError(f"linearize.teacher={str(path)!r} has no attention layer "
                     f"(mixers {sorted(set(cfg.layer_mixers))}); expected a "
                     "softmax-attention model")
  return cfg


def student_config(lin: LinearizeConfig, teacher: LMConfig) -> LMConfig:
  """The student: the teacher's layers, attention replaced by ``lin.student``
  (but every ``keep_every``-th), with the teacher's attention options plus the
  student's, and LoRA adapters for a LoRA finetune."""
  mixers = list(teacher.layer_mixers)
  for i, m in enumerate(mixers):
    if m == "attention" and not (lin.keep_every and (i + 1) % lin.keep_every == 0):
      mixers[i] = lin.student
  if lin.student not in mixers:
    raise ValueError(f"linearize.keep_every={lin.keep_every} keeps every "
                     "attention layer; expected at least one to convert")
  attention = dict(teacher.mixer_kwargs.get("attention", {}))
  kwargs = {**teacher.mixer_kwargs,
            lin.student: {**attention, **lin.student_options}}
  use_lora = lin.stage == "finetune" and lin.lora is not None
  return dataclasses.replace(
      teacher, mixer=lin.student if len(set(mixers)) == 1 else teacher.mixer,
      pattern=None if len(set(mixers)) == 1 else tuple(mixers),
      mixer_kwargs=kwargs, lora=lin.lora if use_lora else None)


def check_sources(lin: LinearizeConfig) -> LMConfig:
  """Reads the teacher's config and checks that its weights (and ``init``'s
  run) are there, writing nothing; returns the teacher's model config."""
  teacher = teacher_config(lin.teacher)
  if "model_type" in json.loads(Path(lin.teacher, "config.json").read_text()):
    hf.check_weights(lin.teacher)
  elif not any(Path(lin.teacher, "checkpoints").glob("[0-9]*")):
    raise ValueError(f"linearize.teacher={lin.teacher!r} has no checkpoint; "
                     "expected an lsm run that saved one")
  if lin.init is not None and not any(Path(lin.init, "checkpoints").glob("[0-9]*")):
    raise ValueError(f"linearize.init={lin.init!r} has no checkpoint; expected "
                     "the workdir of a finished transfer run")
  return teacher


def _abstract(cfg: LMConfig) -> dict:
  return hf.abstract_params(cfg)


def _paths(tree) -> dict:
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def trainable_mask(lin: LinearizeConfig, student: LMConfig,
                   teacher: LMConfig) -> dict:
  """True for the parameters the stage trains (a bool tree like the
  student's parameters): transfer, the student mixers' new parameters; LoRA
  finetune, the adapters (and the new parameters with
  ``train_student_params``); full finetune, all."""
  params = _abstract(student)
  teacher_paths = set(_paths(_abstract(teacher)))

  def new(path):
    return jax.tree_util.keystr(path) not in teacher_paths

  def adapter(path):
    return str(getattr(path[-1], "key", "")) in ("lora_a", "lora_b")

  def rule(path, _):
    if lin.stage == "transfer":
      return new(path) and not adapter(path)
    if lin.lora is None:
      return True
    return adapter(path) or (lin.train_student_params and new(path))

  mask = jax.tree_util.tree_map_with_path(rule, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"linearize.stage={lin.stage!r} with student="
                     f"{lin.student!r} trains no parameter ({lin.student} adds "
                     "none to the attention it replaces); expected stage "
                     "finetune for it")
  return mask


def objective_kind(lin: LinearizeConfig) -> str:
  if lin.stage == "transfer":
    return "transfer"
  return "lm_kl" if lin.kl_weight else "lm"


def _teacher_params(lin: LinearizeConfig, teacher: LMConfig,
                    shardings: dict) -> dict:
  """The teacher's parameters; a Hugging Face checkpoint is read straight
  into the student's shardings, each device reading its own slices."""
  raw = json.loads(Path(lin.teacher, "config.json").read_text())
  if "model_type" in raw:
    flat = _paths(shardings)
    mine = jax.tree_util.tree_map_with_path(
        lambda p, _: flat[jax.tree_util.keystr(p)], _abstract(teacher))
    return hf.load_params(lin.teacher, teacher, shardings=mine)
  from lsm.train import restore  # pylint: disable=g-import-not-at-top
  run = restore.open_run(lin.teacher)
  return _model_params(run.model)


def _model_params(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def initial_params(lin: LinearizeConfig, teacher: LMConfig, params: dict,
                   shardings: dict) -> dict:
  """The student's starting parameters: ``params`` (a fresh init) with every
  parameter the source has overwritten by it. The source is ``lin.init``'s
  newest checkpoint (finetune after transfer; the adapters stay fresh) or the
  teacher."""
  if lin.init is not None:
    from lsm.train import restore  # pylint: disable=g-import-not-at-top
    source = _model_params(restore.open_run(lin.init).model)
    what = f"linearize.init={lin.init!r}"
  else:
    source = _teacher_params(lin, teacher, shardings)
    what = f"linearize.teacher={lin.teacher!r}"
  have = _paths(source)
  want = _paths(params)
  missing = sorted(set(have) - set(want))
  if missing:
    raise ValueError(f"{what} has parameters the student lacks: {missing[:4]}; "
                     "expected the student's teacher (or its transfer run)")
  for name, x in have.items():
    if tuple(x.shape) != tuple(want[name].shape):
      raise ValueError(f"{what}: parameter {name} has shape {list(x.shape)}; "
                       f"the student expects {list(want[name].shape)}")

  def pick(path, fresh, sharding):
    x = have.get(jax.tree_util.keystr(path))
    if x is None:
      return fresh
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x.astype(fresh.dtype)  # read into place
    return jax.device_put(np.asarray(jax.device_get(x)).astype(fresh.dtype),
                          sharding)

  return jax.tree_util.tree_map_with_path(pick, params, shardings)


def merged_config(config) -> dict:
  """The run config of the merged student: the model without adapters as an
  explicit model section, no linearize section (a plain lsm run)."""
  raw = json.loads(json.dumps(config))
  raw.pop("linearize", None)
  raw["model"]["lora"] = None
  return raw

