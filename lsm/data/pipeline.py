"""Input pipelines: random-access records -> per-host, shuffled, packed batches.

``DataConfig(**config.data)`` is the one place data options are read, so an
unknown key raises. ``make_dataset(cfg, split)`` returns a ``grain.IterDataset``
whose elements are per-host batches, dicts of numpy arrays::

  inputs       int32 [b, T]    targets  int32 [b, T]    mask  bool [b, T]
  segment_ids  int32 [b, T]    positions int32 [b, T]       (text sources)

with ``b = cfg.batch_size // process_count``. The split named
``cfg.train_split`` is shuffled (a new order each epoch), repeated forever and
batched with the remainder dropped; any other split is read once in order and its
last batch is padded to ``b`` rows with fully masked rows, so every batch has the
same shape (one jit compilation).

Record order: host ``i`` of ``n`` reads records ``i, i + n, ...`` of the split
(disjoint shards that together cover it), shuffles its shard with ``cfg.seed``
(epoch ``e`` uses seed + e), tokenizes each document as inference reads one
(``Tokenizer.encode_document``: the document-start token, BOS or else EOS, then
the text, then EOS where the tokenizer has both) and packs (lsm.data.packing:
each document is its own segment, and the target that crosses into the next
document is masked). Training rows are then shuffled within windows of
``cfg.row_shuffle_window`` rows (by default several global batches), so a batch
mixes documents rather than holding consecutive rows of one long document.
Given the config and host, batches are deterministic.

Checkpointing: ``iter(ds)`` is a grain ``DatasetIterator``; save and restore it
with Orbax through ``iterator_save_args`` / ``iterator_restore_args`` (see
their docstrings), or as JSON bytes with ``iterator_state`` /
``restore_iterator_state``.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from lsm.data import text_builder
from lsm.data.packing import PackIterDataset
from lsm.data.tokenizers import KINDS as TOKENIZER_KINDS
from lsm.data.tokenizers import make_tokenizer

SOURCES = ("local_text", "tfds", "task")
EXAMPLE_KEYS = ("inputs", "targets", "mask")
# The layout of packed text rows, for run records to compare on resume (a data
# position saved under one layout points elsewhere under another). 1: each
# document's tokens then EOS, every target counted. 2: the document-start token,
# the tokens, EOS where the tokenizer has a BOS; the target crossing into the
# next document masked.
ROW_LAYOUT = 2
# The default row-shuffle window: this many global batches, and at least this
# many rows (rows are small: 1024 rows of 2048 tokens hold about 35 MB), so
# a batch draws from many documents, not from one book's consecutive rows.
ROW_SHUFFLE_BATCHES = 4
ROW_SHUFFLE_MIN_WINDOW = 1024


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Data options.

  Attributes:
    source: "local_text" (the user's files, via lsm.data.text_builder), "tfds"
      (a prepared tfds dataset) or "task" (records passed to make_dataset, e.g.
      a synthetic task from lsm.tasks).
    globs: for local_text: glob(s) of text files (a single str is one glob).
    name: for tfds: the dataset name, with config/version if needed ("lm1b").
    data_dir: tfds data directory (local_text builds there too); None for tfds'
      default, ~/tensorflow_datasets.
    text_key: the record field holding the document text.
    train_split: the split read as training data (shuffled, repeated forever).
    eval_split: the split used for evaluation (one ordered pass). tfds splits
      may be sliced, e.g. "train[:1%]"; lm1b has "test", not "validation".
    document: local_text: "file" (one document per file) or "paragraph".
    validation_fraction: local_text: share of documents held out, in (0, 1).
    tokenizer: "byte", "sentencepiece" or "hf" (Hugging Face tokenizers).
    tokenizer_path: the SentencePiece .model file or the tokenizer.json (hf).
    seq_len: T, tokens per row of inputs/targets.
    batch_size: global batch in rows, split evenly over processes.
    seed: shuffling seed.
    shuffle: shuffle training records (and rows, see row_shuffle_window).
    row_shuffle_window: text sources, training: shuffle packed rows within
      windows of this many rows, so a batch mixes documents and a long
      document's consecutive rows spread over several batches. None (the
      default): ``row_window()``, max(ROW_SHUFFLE_MIN_WINDOW,
      ROW_SHUFFLE_BATCHES * batch_size); the trainer resolves it when a run
      starts (a resumed run keeps the value it recorded) and config.json
      records the number. 0 turns it off;
      otherwise it must be at least batch_size (a window no larger than a
      batch only reorders the batch's own rows). Task examples are shuffled
      as records and ignore it.
    download: tfds: download and prepare a dataset that is not prepared yet. Off
      by default so a wrong data_dir fails loudly instead of downloading.
    num_threads: threads reading and tokenizing records (0: in the caller).
    prefetch_buffer_size: records read ahead by those threads.
    prefetch_batches: batches assembled ahead in a background thread; 0: none.
    reset_at_boundaries: text sources: the model sees each packed row's
      segment_ids and positions, so every mixer restarts at each document start
      (recurrent states, short convolutions, attention, RoPE positions), as at
      inference on one document; False trains across the boundaries as if the
      row were one sequence. Task rows hold one example each and carry none.
    shards: record shards, each read by its own pipeline into
      batch_size // shards rows of every batch; process i of n reads shards
      i * shards / n .. (i + 1) * shards / n - 1 and stacks their rows. A
      fixed count fixes the global batches whatever the process count (1
      process with shards=2 sees what 2 processes see), so a run resumes on
      any process count that divides it. None: ``default_shards(batch_size)``,
      resolved when a run starts and recorded with it (the trainer), or one
      shard per process when the pipeline is used on its own.
  """
  source: str = "tfds"
  globs: Sequence[str] = ()
  name: str = "lm1b"
  data_dir: str | None = None
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  document: str = "file"
  validation_fraction: float = 0.05
  tokenizer: str = "byte"
  tokenizer_path: str | None = None
  seq_len: int = 512
  batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  row_shuffle_window: int | None = None
  download: bool = False
  num_threads: int = 4
  prefetch_buffer_size: int = 64
  prefetch_batches: int = 2
  reset_at_boundaries: bool = True
  shards: int | None = None

  def __post_init__(self):
    _check_choice("source", self.source, SOURCES)
    _check_choice("tokenizer", self.tokenizer, TOKENIZER_KINDS)
    _check_choice("document", self.document, text_builder.DOCUMENT_MODES)
    globs = (self.globs,) if isinstance(self.globs, str) else tuple(self.globs)
    if not all(isinstance(g, str) and g for g in globs):
      raise ValueError(f"DataConfig: globs={self.globs!r}; expected non-empty str globs")
    object.__setattr__(self, "globs", globs)
    if self.source == "local_text" and not globs:
      raise ValueError("DataConfig: globs=() with source='local_text'; expected at "
                       "least one glob of text files")
    for field in ("name", "text_key", "train_split", "eval_split"):
      value = getattr(self, field)
      if not isinstance(value, str) or not value:
        raise ValueError(f"DataConfig: {field}={value!r}; expected a non-empty str")
    for field in ("data_dir", "tokenizer_path"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"DataConfig: {field}={value!r}; expected None or a path")
    if self.tokenizer != "byte" and self.tokenizer_path is None:
      what = {"hf": "tokenizer.json"}.get(self.tokenizer, ".model")
      raise ValueError(f"DataConfig: tokenizer_path=None with tokenizer="
                       f"{self.tokenizer!r}; expected the {what} file path")
    if self.tokenizer == "byte" and self.tokenizer_path is not None:
      raise ValueError(f"DataConfig: tokenizer_path={self.tokenizer_path!r} with "
                       "tokenizer='byte'; expected None")
    v = self.validation_fraction
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
      raise ValueError(f"DataConfig: validation_fraction={v!r}; expected a number "
                       "in (0, 1)")
    for field, low in (("seq_len", 1), ("batch_size", 1), ("seed", 0),
                       ("num_threads", 0), ("prefetch_buffer_size", 0),
                       ("prefetch_batches", 0)):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DataConfig: {field}={value!r}; expected an int >= {low}")
    self.row_window()  # checks the value
    if self.shards is not None and (isinstance(self.shards, bool) or not
                                    isinstance(self.shards, int) or self.shards < 1
                                    or self.batch_size % self.shards):
      raise ValueError(f"DataConfig: shards={self.shards!r}; expected None or a "
                       f"positive int dividing batch_size={self.batch_size}")
    for field in ("shuffle", "download", "reset_at_boundaries"):
      value = getattr(self, field)
      if not isinstance(value, bool):
        raise ValueError(f"DataConfig: {field}={value!r}; expected a bool")

  def row_window(self) -> int:
    """row_shuffle_window, None resolved (see the class docstring), checked."""
    w = self.row_shuffle_window
    if w is None:
      return max(ROW_SHUFFLE_MIN_WINDOW, ROW_SHUFFLE_BATCHES * self.batch_size)
    if isinstance(w, bool) or not isinstance(w, int) or w < 0 or (
        0 < w < self.batch_size):
      raise ValueError(
          f"DataConfig: row_shuffle_window={w!r}; expected None (auto: "
          f"max({ROW_SHUFFLE_MIN_WINDOW}, {ROW_SHUFFLE_BATCHES} x batch_size)), "
          f"0 (off) or an int >= batch_size={self.batch_size} (a smaller window "
          "cannot mix a batch)")
    return w


def _check_choice(field: str, value, choices: Sequence[str]):
  if value not in choices:
    raise ValueError(f"DataConfig: {field}={value!r}; expected one of {list(choices)}")


def make_tokenizer_for(cfg: DataConfig):
  """The tokenizer that ``cfg`` names."""
  return make_tokenizer(cfg.tokenizer, cfg.tokenizer_path)


# Record shards of a run that does not choose: enough for 1, 2, 4 or 8 processes.
DEFAULT_SHARDS = 8


def default_shards(batch_size: int) -> int:
  """The record shards of a run with ``data.shards=None``: the largest divisor
  of ``batch_size`` that divides DEFAULT_SHARDS."""
  return math.gcd(batch_size, DEFAULT_SHARDS)


def host_batch_size(cfg: DataConfig, process_count: int = 1) -> int:
  """Rows per batch on each process: batch_size // process_count."""
  if cfg.batch_size % process_count:
    raise ValueError(f"DataConfig: batch_size={cfg.batch_size} is not divisible by "
                     f"process_count={process_count}; expected a multiple of it")
  return cfg.batch_size // process_count


# --- records ------------------------------------------------------------------


def _tfds_source(cfg: DataConfig, split: str):
  """Random-access source of a prepared (array_record) tfds dataset."""
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"DataConfig: name={cfg.name!r} is neither a tfds dataset nor "
                     f"prepared under data_dir={cfg.data_dir!r}; expected a tfds "
                     f"name such as 'lm1b' ({str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    if not cfg.download:
      raise ValueError(
          f"tfds dataset {cfg.name!r} is not prepared in {builder.data_dir} "
          f"(data_dir={cfg.data_dir!r}). Prepare it once, e.g. `tfds build "
          f"{cfg.name} --data_dir=<dir> --file_format=array_record`, or in Python "
          f"tfds.builder({cfg.name!r}, data_dir=<dir>).download_and_prepare("
          "file_format='array_record'); or set data.download=True; or point "
          "data.data_dir at the directory that holds it")
    builder.download_and_prepare(file_format="array_record")
  return builder.as_data_source(split=split)


def open_text_source(cfg: DataConfig, split: str):
  """The random-access text records of ``split`` for a local_text or tfds cfg.

  local_text is prepared under ``cfg.data_dir`` on first use (see
  lsm.data.text_builder). With several processes on a shared file system,
  prepare it from one process first (``text_builder.build_local_text``), then
  let every process call this: concurrent first builds of the same files race.
  """
  if cfg.source == "local_text":
    builder = text_builder.build_local_text(
        cfg.globs, cfg.data_dir, validation_fraction=cfg.validation_fraction,
        document=cfg.document)
    return builder.as_data_source(split=split)
  if cfg.source == "tfds":
    return _tfds_source(cfg, split)
  raise ValueError(f"open_text_source: cfg.source={cfg.source!r}; expected "
                   "'local_text' or 'tfds' ('task' records come from lsm.tasks)")


def _is_train(cfg: DataConfig, split: str) -> bool:
  if not isinstance(split, str) or not split:
    raise ValueError(f"split={split!r}; expected a split name such as "
                     f"{cfg.train_split!r} or {cfg.eval_split!r}")
  return split == cfg.train_split


def _host_records(source, cfg: DataConfig, split: str, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This host's shard of ``source``, shuffled and repeated when training."""
  if (isinstance(process_count, bool) or not isinstance(process_count, int)
      or process_count < 1):
    raise ValueError(f"process_count={process_count!r}; expected an int >= 1")
  if (isinstance(process_index, bool) or not isinstance(process_index, int)
      or not 0 <= process_index < process_count):
    raise ValueError(f"process_index={process_index!r}; expected an int in "
                     f"[0, {process_count})")
  ds = grain.MapDataset.source(source)
  if len(ds) < process_count:
    raise ValueError(f"split {split!r} has {len(ds)} records; expected at least "
                     f"process_count={process_count} (one per process)")
  # Slicing before shuffling keeps shards disjoint whatever the seed.
  ds = ds[process_index::process_count]
  if _is_train(cfg, split):
    if cfg.shuffle:
      # ShuffleMapDataset reseeds with seed + epoch for indices past one epoch.
      ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat()
  return ds


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.num_threads,
                           prefetch_buffer_size=max(cfg.prefetch_buffer_size,
                                                    cfg.num_threads))


# --- batches ------------------------------------------------------------------


def _tokenize(record: Mapping[str, Any], *, tokenizer, text_key: str) -> np.ndarray:
  """The record's document as training packs it (``encode_document``: the
  document-start token, the text, EOS where the tokenizer has a BOS), int32."""
  try:
    text = record[text_key]
  except (KeyError, TypeError, IndexError):
    keys = list(record) if isinstance(record, Mapping) else type(record).__name__
    raise ValueError(f"DataConfig: text_key={text_key!r} is not in the records; "
                     f"expected one of {keys}") from None
  return tokenizer.encode_document(text)


def masked_like(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An all-zero (hence fully masked) batch of ``batch``'s shapes: what a source
  that has run out contributes while others still have batches."""
  return {k: np.zeros_like(v) for k, v in batch.items()}


def _pad_batch(batch: dict[str, np.ndarray], *, rows: int) -> dict[str, np.ndarray]:
  """Pads a short final eval batch with all-zero (hence fully masked) rows."""
  n = next(iter(batch.values())).shape[0]
  if n == rows:
    return batch
  return {k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)])
          for k, v in batch.items()}


def _batch(ds: grain.IterDataset, cfg: DataConfig, split: str,
           process_count: int) -> grain.IterDataset:
  rows = host_batch_size(cfg, process_count)
  if _is_train(cfg, split):
    ds = ds.batch(rows, drop_remainder=True)
  else:
    ds = ds.batch(rows, drop_remainder=False)
    ds = ds.map(functools.partial(_pad_batch, rows=rows))
  if cfg.prefetch_batches:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=cfg.prefetch_batches)
  return ds


def text_dataset(cfg: DataConfig, split: str, *, process_index: int = 0,
                 process_count: int = 1, source=None) -> grain.IterDataset:
  """Packed LM batches of ``split`` for this process.

  Args:
    cfg: data options (source "local_text" or "tfds", or any with ``source``).
    split: a split name; ``cfg.train_split`` trains, anything else evaluates.
    process_index: this process, in [0, process_count).
    process_count: processes sharing the global batch.
    source: optional random-access records (``len`` and ``[i]``) with
      ``cfg.text_key``, replacing the one cfg names.

  Returns:
    IterDataset of {inputs, targets, mask, segment_ids, positions} batches of
    ``[batch_size // process_count, seq_len]``; infinite for the train split,
    finite otherwise.
  """
  host_batch_size(cfg, process_count)  # fail before opening or building anything
  tokenizer = make_tokenizer_for(cfg)
  if source is None:
    source = open_text_source(cfg, split)
  records = _host_records(source, cfg, split, process_index, process_count)
  docs = records.map(functools.partial(_tokenize, tokenizer=tokenizer,
                                       text_key=cfg.text_key))
  ds = PackIterDataset(docs.to_iter_dataset(_read_options(cfg)),
                       seq_len=cfg.seq_len, pad_id=tokenizer.pad_id)
  if _is_train(cfg, split) and cfg.shuffle and cfg.row_window() > 1:
    # A window fills before its first row comes out: the first batch waits for
    # row_shuffle_window rows to be read and packed.
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=cfg.row_window(), seed=cfg.seed)
  return _batch(ds, cfg, split, process_count)


def _check_example(record, *, split: str):
  if not isinstance(record, Mapping) or not all(k in record for k in EXAMPLE_KEYS):
    got = list(record) if isinstance(record, Mapping) else type(record).__name__
    raise ValueError(f"example_dataset: a record of split {split!r} has {got}; "
                     f"expected a dict with {list(EXAMPLE_KEYS)}")
  return {k: np.asarray(v) for k, v in record.items()}


def example_dataset(source, cfg: DataConfig, split: str, *, process_index: int = 0,
                    process_count: int = 1) -> grain.IterDataset:
  """Batches of fixed-length example records (synthetic tasks), sharded like text.

  Args:
    source: random-access records (``len`` and ``[i]``), each a dict with at least
      inputs/targets/mask arrays of one fixed shape per key; all keys are batched.
    cfg: data options (seed, shuffle, batch_size and threads are read).
    split: ``cfg.train_split`` trains (shuffle, repeat, drop remainder); anything
      else is one ordered pass with the last batch padded by zero rows.
    process_index: this process, in [0, process_count).
    process_count: processes sharing the global batch.

  Returns:
    IterDataset of dicts of ``[batch_size // process_count, ...]`` arrays.
  """
  host_batch_size(cfg, process_count)
  records = _host_records(source, cfg, split, process_index, process_count)
  records = records.map(functools.partial(_check_example, split=split))
  return _batch(records.to_iter_dataset(_read_options(cfg)), cfg, split,
                process_count)


def make_dataset(cfg: DataConfig, split: str, *, process_index: int = 0,
                 process_count: int = 1, source=None) -> grain.IterDataset:
  """The batches of ``split`` that ``cfg`` describes, for this process.

  "local_text" builds (once) the tfds dataset of ``cfg.globs`` in ``cfg.data_dir``;
  "tfds" opens the prepared dataset ``cfg.name``; both go through
  ``text_dataset``. "task" batches ``source`` (required) with ``example_dataset``.
  """
  if cfg.source == "task" and source is None:
    raise ValueError("make_dataset: source=None with cfg.source='task'; expected "
                     "the task's random-access example records")
  shards = cfg.shards or process_count
  if source is None and cfg.source != "task":
    source = open_text_source(cfg, split)
  if _is_train(cfg, split) and cfg.shards and len(source) < shards:
    fits = max(d for d in range(1, len(source) + 1) if not shards % d) if len(
        source) else 0
    raise ValueError(
        f"DataConfig: shards={shards}: split {split!r} has {len(source)} "
        f"records, fewer than the record shards the batch is drawn from; "
        f"expected data.shards <= {len(source)} dividing batch_size="
        f"{cfg.batch_size} (e.g. --config.data.shards={fits})")
  if not _is_train(cfg, split):
    # Evaluation reads one ordered pass whatever the run's position: a short
    # split gets fewer shards (the largest divisor of data.shards it fills,
    # still independent of the process count where that count divides it).
    fits = [d for d in range(1, shards + 1) if shards % d == 0
            and d <= len(source) and d % process_count == 0]
    shards = max(fits) if fits else process_count
  if shards % process_count:
    raise ValueError(f"DataConfig: shards={cfg.shards} is not divisible by "
                     f"process_count={process_count}; expected a multiple of it")
  per_process = shards // process_count
  if per_process > 1:
    # The reading threads are shared by this process's shards.
    cfg = dataclasses.replace(cfg, num_threads=-(-cfg.num_threads // per_process))

  def shard(index: int) -> grain.IterDataset:
    # A shard is read exactly as a process of a ``shards``-process run reads.
    if cfg.source == "task":
      return example_dataset(source, cfg, split, process_index=index,
                             process_count=shards)
    return text_dataset(cfg, split, process_index=index, process_count=shards,
                        source=source)

  parts = [shard(process_index * per_process + j) for j in range(per_process)]
  return parts[0] if per_process == 1 else StackRowsIterDataset(parts)


class StackRowsIterDataset(grain.IterDataset):
  """Batches of several shard pipelines stacked row-wise, in shard order.

  Ends when every shard has ended; a shard that ends first contributes
  all-zero (fully masked) rows, as a short final eval batch does. The iterator
  state is the list of the shards' states.
  """

  def __init__(self, parents: Sequence[grain.IterDataset]):
    super().__init__(list(parents))

  def __iter__(self) -> grain.DatasetIterator:
    return _StackRowsIterator([iter(p) for p in self._parents])

  def __str__(self) -> str:
    return f"StackRowsIterDataset({len(self._parents)} shards)"


class _StackRowsIterator(grain.DatasetIterator):

  def __init__(self, parents: list[grain.DatasetIterator]):
    super().__init__(parents)
    self._last = [None] * len(parents)

  def __next__(self):
    batches = [next(p, None) for p in self._parents]
    if all(b is None for b in batches):
      raise StopIteration
    for i, b in enumerate(batches):
      if b is None:
        if self._last[i] is None:
          raise ValueError(f"record shard {i} of {len(batches)} gave no batch; "
                           "expected at least one per shard")
        batches[i] = masked_like(self._last[i])
      self._last[i] = batches[i]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {"shards": [p.get_state() for p in self._parents]}

  def set_state(self, state):
    for p, s in zip(self._parents, state["shards"], strict=True):
      p.set_state(s)


# --- iterator state -----------------------------------------------------------


def iterator_save_args(iterator: grain.DatasetIterator):
  """Orbax save args for ``iterator``'s position: one item of ocp.args.Composite.

  The state is read when ``CheckpointManager.save`` is called, even with async
  checkpointing, so the loop may keep drawing batches right after. Each process
  writes its own ``process_{i}-of-{n}.json``.
  """
  import grain.checkpoint  # pylint: disable=g-import-not-at-top  (needs orbax)
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
  """Orbax restore args that set ``iterator`` (a fresh ``iter(ds)`` of the same
  pipeline and process) to the saved position, in place; the restored item is
  the same iterator."""
  import grain.checkpoint  # pylint: disable=g-import-not-at-top  (needs orbax)
  return grain.checkpoint.CheckpointRestore(iterator)


def iterator_state(iterator: grain.DatasetIterator) -> bytes:
  """The iterator's position as JSON bytes (small: indices and offsets)."""
  return json.dumps(iterator.get_state()).encode()


def restore_iterator_state(iterator: grain.DatasetIterator, state: bytes) -> None:
  """Sets ``iterator`` to a position from ``iterator_state``."""
  iterator.set_state(json.loads(state))


def shard_states(iterator: grain.DatasetIterator) -> list:
  """The positions of this process's record shards, in shard order (JSON-able):
  with ``shard_states`` of every process in process order, the position of the
  whole pipeline, readable by any process count that divides ``cfg.shards``."""
  if isinstance(iterator, _StackRowsIterator):
    return iterator.get_state()["shards"]
  return [iterator.get_state()]


def set_shard_states(iterator: grain.DatasetIterator, states: Sequence, *,
                     process_index: int, process_count: int) -> None:
  """Moves ``iterator`` (a fresh ``iter(make_dataset(...))`` of this process)
  to the saved position ``states``: every shard's state, in shard order."""
  local = (len(iterator.get_state()["shards"])
           if isinstance(iterator, _StackRowsIterator) else 1)
  if len(states) != local * process_count:
    raise ValueError(
        f"the data position holds {len(states)} record shards; this run reads "
        f"{local * process_count} ({local} per process x {process_count} "
        "processes); expected the recorded data.shards")
  mine = list(states[process_index * local:(process_index + 1) * local])
  if isinstance(iterator, _StackRowsIterator):
    iterator.set_state({"shards": mine})
  else:
    iterator.set_state(mine[0])
