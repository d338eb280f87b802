"""The training loop: config sections to typed options, mesh, state, data,
checkpoints, metrics; then step until done, interrupted or diverged.

``train(config, workdir)`` is the whole program; ``main.py`` only parses flags.
"""

import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from tqdm import tqdm

from lsm.data import text_builder
from lsm.layers import lora as lora_lib
from lsm.data.pipeline import (ROW_LAYOUT, DataConfig, default_shards,
                                make_dataset,
                                make_tokenizer_for, masked_like,
                                open_text_source, set_shard_states)
from lsm.models.lm import LMConfig, flops_per_token
from lsm.parallel.mesh import MeshConfig, make_mesh
from lsm.tasks import TaskConfig, make_task
from lsm.tasks.base import TaskSource
from lsm.tasks.metrics import scaled_accuracy
from lsm.train import checkpoint as ckpt_lib
from lsm.train import cli
from lsm.train import distributed
from lsm.train import linearize as linearize_lib
from lsm.train import metrics as metrics_lib
from lsm.train import optim
from lsm.train import state as state_lib
from lsm.train import step as step_lib

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop options (``TrainConfig(**config.train)``).

  Attributes:
    num_steps: optimiser steps in the run.
    seed: parameter initialisation seed (the data seed is data.seed).
    log_every: steps between metric records (and divergence checks).
    eval_every: steps between evaluations on the held-out split; 0 for none.
    eval_steps: batches per evaluation (fewer if the split runs out).
    checkpoint_every: steps between checkpoints; 0 saves only at the end and on
      SIGTERM / SIGINT.
    keep_checkpoints: newest checkpoints kept.
    keep_period: also keep every checkpoint whose step is a multiple of this.
    async_checkpoints: write checkpoints in the background.
    grad_accum: micro-batches per step (data.batch_size must divide by it).
    compute_dtype: "auto" (bfloat16 on GPU and TPU, float32 on CPU; resolved
      when the run starts and recorded in config.json), "float32" or
      "bfloat16": the dtype matrices are cast to for the forward and backward
      pass. Master parameters, parameters marked float32 (decays, step sizes,
      norms, biases), recurrent states and optimiser accumulators stay float32.
    max_bad_steps: stop after this many non-finite steps in a row.
    start_fresh: archive a previous run in the workdir (nothing is deleted) and
      start from step 0 instead of resuming.
    progress: show a progress bar (process 0).
    peak_flops_per_device: for MFU on devices missing from metrics.PEAK_FLOPS.
    crash_after_step: testing only: SIGKILL this process after this step, to
      test recovery from a hard crash.
  """
  num_steps: int = 1000
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0
  eval_steps: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  keep_period: int | None = None
  async_checkpoints: bool = True
  grad_accum: int = 1
  compute_dtype: str = "auto"
  max_bad_steps: int = 10
  start_fresh: bool = False
  progress: bool = True
  peak_flops_per_device: float | None = None
  crash_after_step: int | None = None

  def __post_init__(self):
    for name in ("num_steps", "log_every", "eval_steps", "keep_checkpoints",
                 "grad_accum", "max_bad_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name}={value!r}; expected a positive int")
    for name in ("eval_every", "checkpoint_every"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ValueError(f"train.{name}={value!r}; expected an int >= 0")
    step_lib.resolve_compute_dtype(self.compute_dtype, "cpu")  # checks it


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row."""


SECTIONS = {"model": LMConfig, "data": DataConfig, "optim": optim.OptimConfig,
            "train": TrainConfig, "mesh": MeshConfig, "task": TaskConfig,
            "linearize": linearize_lib.LinearizeConfig}
# Sections a config may leave out.
OPTIONAL = ("task", "linearize")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The typed sections of a run config; ``task`` only for synthetic tasks,
  ``linearize`` only for runs that linearise a teacher (lsm.train.linearize:
  the model section is then derived from the teacher when left empty)."""
  model: LMConfig
  data: DataConfig
  optim: optim.OptimConfig
  train: TrainConfig
  mesh: MeshConfig
  task: TaskConfig | None = None
  linearize: linearize_lib.LinearizeConfig | None = None

  @classmethod
  def from_config(cls, config) -> "RunConfig":
    """The typed sections of ``config`` (a ConfigDict or dict): the one place a
    run config is validated. Raises ValueError in one line naming the field,
    its value and what was expected (``model.n_heads=0: expected ...``)."""
    extra = sorted(set(config.keys()) - set(SECTIONS))
    if extra:
      raise ValueError(f"config sections {extra}: unknown; expected "
                       f"{sorted(SECTIONS)}")
    sections = {}
    derive_model = False
    for name, typ in SECTIONS.items():
      section = config.get(name)
      if section is None and name in OPTIONAL:
        continue
      section = section.to_dict() if hasattr(section, "to_dict") else (
          dict(section or {}))
      if name == "model" and not section and config.get("linearize"):
        derive_model = True  # the student of the teacher, below
      try:
        sections[name] = typ(**section)
      except (TypeError, ValueError) as e:
        raise ValueError(cli.section_message(name, e, section)) from None
    if derive_model:
      lin = sections["linearize"]
      sections["model"] = linearize_lib.student_config(
          lin, linearize_lib.teacher_config(lin.teacher))
    if sections["data"].source == "task" and "task" not in sections:
      raise ValueError("data.source='task': the config has no task section; "
                       "expected one (name, train_sizes, eval_sizes, options)")
    return cls(**sections)


def _jsonable(x):
  if dataclasses.is_dataclass(x):
    return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def run_record(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               recorded: dict | None = None) -> dict:
  """The run config of ``config`` as its config.json in ``workdir`` would
  hold it (resolved as ``resolve`` does, resuming ``recorded`` if given; JSON
  types: lists, not tuples); e.g. to check that a directory holds this run."""
  run = resolve(RunConfig.from_config(config), Path(workdir), recorded)
  return json.loads(json.dumps(_jsonable(run)))


class _StopSignal:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps; a second
  signal gets the default behaviour (an immediate stop)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signum, self._previous[signum])

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_shapes(run: RunConfig, mesh, data_vocab: int | None, what: str):
  if data_vocab is not None and data_vocab > run.model.vocab_size:
    raise ValueError(f"model.vocab_size={run.model.vocab_size}: smaller than "
                     f"the {what}'s vocabulary ({data_vocab}); expected at "
                     f"least {data_vocab}")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = run.data.batch_size // run.train.grad_accum
  if run.data.batch_size % run.train.grad_accum or rows % shards:
    raise ValueError(
        f"data.batch_size={run.data.batch_size} must split into "
        f"train.grad_accum={run.train.grad_accum} micro-batches whose rows divide "
        f"over the data x fsdp = {shards} batch shards")
  if run.data.seq_len % mesh.shape["seq"]:
    raise ValueError(f"data.seq_len={run.data.seq_len} is not divisible by "
                     f"mesh seq={mesh.shape['seq']}")
  if run.data.shards % jax.process_count():
    raise ValueError(f"data.shards={run.data.shards} is not divisible by the "
                     f"{jax.process_count()} processes; expected a multiple of "
                     "the process count (a run resumes on any count dividing it)")


def resolve(run: RunConfig, workdir: Path, recorded: dict | None = None
            ) -> RunConfig:
  """``run`` with its "decide for me" values made concrete, as config.json
  records them: the local_text build directory, ``data.shards`` and
  ``data.row_shuffle_window`` (the recorded values of the run being resumed,
  else ``pipeline.default_shards`` and ``DataConfig.row_window``) and
  ``train.compute_dtype`` ("auto": by platform).

  Args:
    run: the typed config.
    workdir: the run directory.
    recorded: the newest checkpoint's meta of the run being resumed, if any.
  """
  data, train = run.data, run.train
  old = ((recorded or {}).get("config") or {}).get("data") or {}
  if data.source == "local_text" and data.data_dir is None:
    # The built array_record copy of the user's files lives with the run.
    data = dataclasses.replace(data, data_dir=str(workdir / "tfds"))
  if data.shards is None:
    if recorded is None:
      shards = default_shards(data.batch_size)
    elif old.get("shards") is not None and not data.batch_size % old["shards"]:
      shards = old["shards"]
    elif "shards" in old or "config" not in recorded:
      # A run from before shards were fixed: one per process.
      shards = recorded.get("process_count") or jax.process_count()
    else:  # the batch changed: the restore names the difference
      shards = default_shards(data.batch_size)
    data = dataclasses.replace(data, shards=shards)
  if data.row_shuffle_window is None:
    window = old.get("row_shuffle_window")
    if window is None or (0 < window < data.batch_size):
      window = data.row_window()
    data = dataclasses.replace(data, row_shuffle_window=window)
  train = dataclasses.replace(
      train, compute_dtype=step_lib.resolve_compute_dtype(train.compute_dtype))
  return dataclasses.replace(run, data=data, train=train)


def check_inputs(run: RunConfig, source=None) -> tuple[int | None, str]:
  """The data source, tokenizer and task exist and can be read, without
  writing anything. Returns (vocabulary size the data needs, its name)."""
  data = run.data
  if run.linearize is not None:
    linearize_lib.check_sources(run.linearize)
  if data.source == "task":
    # Records passed in carry their own tokens; a named task has a vocabulary.
    return (None, "") if source is not None else (
        make_task(run.task).vocab_size, "task")
  if source is None and data.source == "local_text":
    text_builder.expand_globs(data.globs)
  elif source is None and data.source == "tfds":
    open_text_source(data, data.train_split)
  try:
    return make_tokenizer_for(data).vocab_size, "tokenizer"
  except (ValueError, OSError, RuntimeError) as e:
    raise ValueError(f"data.tokenizer_path={data.tokenizer_path!r}: "
                     f"{cli.one_line(e)}") from None


def make_optimizer(run: RunConfig):
  """(optimizer, schedule, objective) of a run: AdamW over every parameter and
  the next-token loss, or for a linearisation stage over the parameters it
  trains (the others frozen, without optimiser state) and its objective."""
  objective, trainable = step_lib.Objective(), None
  lin = run.linearize
  if lin is not None:
    trainable = linearize_lib.trainable_mask(
        lin, run.model, linearize_lib.teacher_config(lin.teacher))
    objective = step_lib.Objective(kind=linearize_lib.objective_kind(lin),
                                   kl_weight=lin.kl_weight, trainable=trainable)
  optimizer, schedule = optim.make_optimizer(
      run.optim, run.train.num_steps, state_lib.float32_mask(run.model),
      trainable)
  return optimizer, schedule, objective


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          devices=None, source=None) -> dict[int, dict]:
  """Runs (or resumes) training; returns {step: metrics} logged by this call.

  Every check (the config, the data, the mesh, the workdir's checkpoints
  against this run) comes before anything is written: a refused call leaves
  the workdir as it was.

  Args:
    config: a run config with sections model, data, optim, train, mesh.
    workdir: run directory (checkpoints, metrics, config.json).
    devices: devices for the mesh (default: all).
    source: random-access example source when data.source is "task".

  Raises:
    ValueError: bad input (one line naming the field), or the workdir's
      checkpoints do not fit this run (``checkpoint.CheckpointMismatch``, one
      line per difference) or are all damaged.
  """
  run = RunConfig.from_config(config)
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  checkpointer = ckpt_lib.Checkpointer(
      workdir, every=run.train.checkpoint_every,
      keep=run.train.keep_checkpoints, keep_period=run.train.keep_period,
      async_save=run.train.async_checkpoints)
  fresh = run.train.start_fresh or not checkpointer.steps()
  run = resolve(run, workdir, None if fresh else checkpointer.recorded())
  # Every process must run the same config (and write to the same place): a
  # mismatch stops all of them here rather than hanging in a collective later.
  distributed.check_same_config({"run": _jsonable(run),
                                 "workdir": str(workdir.absolute())})
  data_vocab, what = check_inputs(run, source)
  mesh = make_mesh(run.mesh, devices)
  # Evaluation sets: the held-out split for text; one set per eval size for a
  # synthetic task (length generalisation), each with its own seed stream.
  task, row_len = None, run.data.seq_len
  if run.data.source == "task" and source is None:
    # Task rows are as long as the longest training example
    # (task.max_tokens); data.seq_len applies to text only.
    task = make_task(run.task)
    source = TaskSource(task, seed=run.data.seed, sizes=run.task.train_sizes)
    row_len = task.max_tokens(run.task.train_sizes[1])
    log.info("task %s: sizes %d-%d, rows of %d tokens", run.task.name,
             *run.task.train_sizes, row_len)
    eval_sets = {f"eval_{size}_": TaskSource(
        task, seed=run.data.seed + 1_000_003 * (i + 1), sizes=(size, size))
        for i, size in enumerate(run.task.eval_sizes)}
  else:
    eval_sets = {"eval_": source}
  _check_shapes(run, mesh, data_vocab, what)
  lin = run.linearize
  optimizer, schedule, objective = make_optimizer(run)
  setup = state_lib.build(run.model, optimizer, mesh, run.mesh.rules)
  meta = {"model": _jsonable(run.model), "config": _jsonable(run),
          "process_count": jax.process_count(), "row_layout": ROW_LAYOUT}
  restored = None
  if not run.train.start_fresh:
    restored = checkpointer.restore(setup.abstract_state, meta,
                                    n_shards=run.data.shards)

  # The checks passed: from here on the run writes.
  if run.train.start_fresh:
    checkpointer.close()
    distributed.barrier("lsm_before_archive")
    ckpt_lib.archive_run(workdir)
    distributed.barrier("lsm_archived")
    checkpointer = ckpt_lib.Checkpointer(
        workdir, every=run.train.checkpoint_every,
        keep=run.train.keep_checkpoints, keep_period=run.train.keep_period,
        async_save=run.train.async_checkpoints)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(_jsonable(run), indent=2))
  if (distributed.is_multiprocess() and source is None
      and run.data.source in ("local_text", "tfds")):
    # One process prepares the text dataset (first builds race), then all open it.
    if is_main:
      open_text_source(run.data, run.data.train_split)
    distributed.barrier("lsm_data_prepared")
  distributed.barrier("lsm_workdir_ready")

  dtype = run.train.compute_dtype  # resolved: "float32" or "bfloat16"
  train_step = jax.jit(
      step_lib.make_train_step(setup, schedule, grad_accum=run.train.grad_accum,
                               compute_dtype=dtype, objective=objective),
      in_shardings=(setup.shardings, setup.batch_sharding),
      out_shardings=(setup.shardings, None), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(setup, compute_dtype=dtype),
                      in_shardings=(setup.shardings["params"],
                                    setup.batch_sharding))

  process = dict(process_index=jax.process_index(),
                 process_count=jax.process_count())
  data_iter = iter(make_dataset(run.data, run.data.train_split, source=source,
                                **process))
  if restored is None:
    state, start = state_lib.create(setup, run.train.seed), 0
    if lin is not None:
      state["params"] = linearize_lib.initial_params(
          lin, linearize_lib.teacher_config(lin.teacher), state["params"],
          setup.shardings["params"])
      log.info("linearize %s: %s from %s, %d of %d parameters train", lin.stage,
               lin.student, lin.init or lin.teacher,
               sum(int(x.size) for x, t in zip(
                   jax.tree.leaves(state["params"]),
                   jax.tree.leaves(objective.trainable))
                   if t), setup.n_params)
    log.info("starting from step 0 (%d parameters)", setup.n_params)
  else:
    start, state, position = restored
    set_shard_states(data_iter, position, **process)
    log.info("resumed from step %d", start)

  def put(batch):
    if not run.data.reset_at_boundaries:  # rows as single sequences
      batch = {k: v for k, v in batch.items() if k not in step_lib.DOCUMENT_KEYS}
    return {k: jax.make_array_from_process_local_data(setup.batch_sharding, v)
            for k, v in batch.items()}

  def evaluate(eval_source, prefix):
    if eval_source is None:
      # The held-out text split, opened once at the first evaluation (a run
      # that never evaluates never needs the split to exist).
      eval_source = eval_sets[prefix] = open_text_source(run.data,
                                                         run.data.eval_split)
    eval_iter = iter(make_dataset(run.data, run.data.eval_split,
                                  source=eval_source, **process))
    sums, last = None, None
    for _ in range(run.train.eval_steps):
      batch = next(eval_iter, None)
      # Processes hold different numbers of eval batches: all go on while any
      # has one, the others feed all-masked rows (every process has at least
      # one batch, since each holds at least one record).
      if not distributed.agree_any(batch is not None):
        break
      if batch is None:
        batch = masked_like(last)
      last = batch
      out = jax.device_get(eval_step(state["params"], put(batch)))
      sums = out if sums is None else {k: sums[k] + out[k] for k in out}
    if sums is None:
      log.warning("evaluation %r gave no batch; skipped", prefix)
      return None
    count = max(float(sums["count"]), 1.0)
    result = {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count,
              "sequence_accuracy": sums["seq_correct"] / max(float(sums["seqs"]),
                                                             1.0)}
    if task is not None:
      result["scaled_accuracy"] = scaled_accuracy(result["accuracy"], task.chance)
    return {k: float(v) for k, v in result.items()}

  tokens_per_step = run.data.batch_size * row_len
  flops_tok = flops_per_token(run.model, setup.n_params, row_len)
  peak = metrics_lib.peak_flops(mesh.devices.flat[0],
                                run.train.peak_flops_per_device)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, start_step=start)
  history: dict[int, dict] = {}
  pending: list = []
  step, last_time, last_step = start, time.perf_counter(), start
  stopping = False
  bar = tqdm(total=run.train.num_steps, initial=start, unit="step",
             disable=not (is_main and run.train.progress), dynamic_ncols=True)
  try:
    with _StopSignal() as stop, jax.set_mesh(mesh):
      while step < run.train.num_steps:
        state, m = train_step(state, put(next(data_iter)))
        step += 1
        pending.append((step, m))
        bar.update(1)
        if step % run.train.log_every == 0 or step == run.train.num_steps:
          now = time.perf_counter()
          elapsed, n = now - last_time, step - last_step
          last_time, last_step = now, step
          for s, values in jax.device_get(pending):
            record = {k: float(v) for k, v in values.items()}
            history[s] = record
          pending.clear()
          record = dict(history[step])
          record["step_time_s"] = elapsed / n
          record["tokens_per_s"] = tokens_per_step * n / elapsed
          if peak:
            record["mfu"] = (flops_tok * record["tokens_per_s"] /
                             (peak * mesh.devices.size))
          history[step] = record
          writer.write(step, record)
          bar.set_postfix(loss=f"{record['loss']:.4f}")
          if record["bad_steps"] >= run.train.max_bad_steps:
            raise TrainingDiverged(
                f"the loss or gradients were non-finite in the last "
                f"{int(record['bad_steps'])} steps (up to step {step}; limit "
                f"train.max_bad_steps={run.train.max_bad_steps}). Those updates "
                f"were skipped, so the checkpoints in {checkpointer.directory} "
                f"(steps {checkpointer.steps()}) hold the last good parameters.")
        if run.train.eval_every and step % run.train.eval_every == 0:
          for prefix, eval_source in list(eval_sets.items()):
            result = evaluate(eval_source, prefix)
            if result is not None:
              history.setdefault(step, {}).update(
                  {f"{prefix}{k}": v for k, v in result.items()})
              writer.write(step, result, prefix=prefix)
        stopping = stop.signum is not None
        if distributed.is_multiprocess():
          # A signal may reach the processes at different steps: they agree
          # at every log step (a collective), so all stop at the same one.
          stopping = ((step % run.train.log_every == 0
                       or step == run.train.num_steps)
                      and distributed.agree_any(stopping))
        final = step == run.train.num_steps or stopping
        checkpointer.save(step, state, data_iter, meta, force=final)
        if run.train.crash_after_step == step:
          os.kill(os.getpid(), signal.SIGKILL)
        if stopping:
          log.warning("stopping on signal %s at step %d; checkpoint saved",
                      stop.signum or "(of another process)", step)
          break
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  if stopping:
    raise SystemExit(128 + (stop.signum or signal.SIGTERM))
  # Once per final step: a resumed finished run leaves its merged run as it
  # is; a run extended to more steps replaces it with the newer one.
  if (lin is not None and run.model.lora is not None
      and step == run.train.num_steps
      and not (workdir / linearize_lib.MERGED / "checkpoints" / str(step)).exists()):
    _write_merged(run, workdir, state, data_iter, mesh)
  return history


def _write_merged(run: RunConfig, workdir: Path, state, data_iter, mesh):
  """The finished LoRA finetune's student with its adapters merged into the
  kernels, as an lsm run of its own: ``<workdir>/merged`` (config.json with
  the model section, no linearize section; one checkpoint at the final step
  with a fresh optimiser state for further training)."""
  merged_run = dataclasses.replace(
      run, model=dataclasses.replace(run.model, lora=None), linearize=None)
  optimizer, _ = optim.make_optimizer(run.optim, run.train.num_steps,
                                      state_lib.float32_mask(merged_run.model))
  setup = state_lib.build(merged_run.model, optimizer, mesh, run.mesh.rules)
  params = jax.jit(lambda p: lora_lib.merge(p, run.model.lora),
                   out_shardings=setup.shardings["params"])(state["params"])
  merged = jax.jit(lambda p: {**state_lib.init_state(merged_run.model, optimizer, 0),
                              "params": p, "step": state["step"]},
                   out_shardings=setup.shardings)(params)
  directory = workdir / linearize_lib.MERGED
  checkpointer = ckpt_lib.Checkpointer(directory, every=0, keep=1,
                                       async_save=False)
  meta = {"model": _jsonable(merged_run.model), "config": _jsonable(merged_run),
          "process_count": jax.process_count(), "row_layout": ROW_LAYOUT}
  try:
    checkpointer.save(int(state["step"]), merged, data_iter, meta, force=True)
  finally:
    checkpointer.close()
  if jax.process_index() == 0:
    (directory / "config.json").write_text(json.dumps(_jsonable(merged_run),
                                                      indent=2))
  log.info("merged the adapters: %s", directory)


def load_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
               step: int | None = None, devices=None):
  """The LanguageModel of a run's checkpoint (default: the newest step), for
  evaluation, decoding or analysis. Returns (step, model)."""
  run = RunConfig.from_config(config)
  optimizer, _, _ = make_optimizer(run)
  mesh = make_mesh(run.mesh, devices)
  setup = state_lib.build(run.model, optimizer, mesh, run.mesh.rules)
  checkpointer = ckpt_lib.Checkpointer(workdir, every=0, keep=1)
  try:
    step, state = checkpointer.restore_state(setup.abstract_state, step)
  finally:
    checkpointer.close()
  return step, nnx.merge(setup.graphdef, state["params"])
