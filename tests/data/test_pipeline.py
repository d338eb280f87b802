"""Pipelines: deterministic shuffles that change each epoch, disjoint per-host
shards covering the data, documents laid out as inference reads them, rows
shuffled across documents by default, exact iterator restore through Orbax,
finite padded eval, batch shapes and dtypes, clear config errors."""

import itertools

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lsm.data import pipeline, text_builder
from lsm.data.pipeline import DataConfig
from lsm.data.tokenizers import ByteTokenizer

T = 16
DOCS = [{"text": f"<{i}>" + "ab" * (i % 11)} for i in range(60)]


def _cfg(**kw):
  kw = {"source": "task", "seq_len": T, "batch_size": 4, "seed": 0, **kw}
  return DataConfig(**kw)


def _take(ds, n):
  it = iter(ds)
  try:
    return list(itertools.islice(it, n))
  finally:
    it.close()


def _equal(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(a, b))


def _tokens(batches):
  """The token stream of packed batches: each row's inputs + last target, unpadded
  (pad id 0 is never a real token)."""
  tokens = []
  for batch in batches:
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      row = np.append(inputs, targets[-1])
      tokens.extend(row[row != 0])
  return tokens


def _documents(batches, complete=True, tok=ByteTokenizer()):
  """The documents of a stream of packed batches, in order (EOS-split; the
  start tokens decode to nothing)."""
  tokens = _tokens(batches)
  docs, start = [], 0
  for i, t in enumerate(tokens):
    if t == tok.eos_id:
      docs.append(tok.decode(tokens[start:i]))
      start = i + 1
  assert start == len(tokens) or not complete, "the stream must end with EOS"
  return docs


def _ids(records):
  return [int(r["inputs"][0]) for r in records]


EXAMPLES = [{"inputs": np.full(5, i, np.int32), "targets": np.full(5, i + 1, np.int32),
             "mask": np.ones(5, bool)} for i in range(23)]


def test_text_batch_shapes_and_dtypes():
  batch = _take(pipeline.text_dataset(_cfg(), "train", source=DOCS), 1)[0]
  want = {"inputs": np.int32, "targets": np.int32, "mask": np.bool_,
          "segment_ids": np.int32, "positions": np.int32}
  assert {k: v.dtype.type for k, v in batch.items()} == want
  assert all(v.shape == (4, T) for v in batch.values())


def test_same_seed_same_batches_other_seed_other_order():
  a = _take(pipeline.text_dataset(_cfg(seed=3), "train", source=DOCS), 6)
  b = _take(pipeline.text_dataset(_cfg(seed=3), "train", source=DOCS), 6)
  c = _take(pipeline.text_dataset(_cfg(seed=4), "train", source=DOCS), 6)
  assert _equal(a, b)
  assert not _equal(a, c)
  unshuffled = _take(pipeline.text_dataset(_cfg(shuffle=False), "train", source=DOCS), 1)
  assert _documents(unshuffled, complete=False)[0] == DOCS[0]["text"]


def test_each_epoch_is_a_new_permutation():
  cfg = _cfg(batch_size=1, seed=5)
  records = [r for b in _take(pipeline.example_dataset(EXAMPLES, cfg, "train"), 69)
             for r in [{"inputs": b["inputs"][0]}]]
  epochs = [_ids(records[i * 23:(i + 1) * 23]) for i in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(23))
  assert epochs[0] != epochs[1] != epochs[2] != list(range(23))


def test_train_drops_remainder_eval_pads_it():
  cfg = _cfg(batch_size=5)
  train = _take(pipeline.example_dataset(EXAMPLES, cfg, "train"), 10)
  assert all(b["inputs"].shape == (5, 5) and b["mask"].all() for b in train)
  evals = list(pipeline.example_dataset(EXAMPLES, cfg, "validation"))
  assert len(evals) == 5  # 23 rows -> 4 full batches + 3 rows and 2 padding rows
  assert all(b["inputs"].shape == (5, 5) for b in evals)
  assert _ids({"inputs": r} for b in evals for r in b["inputs"])[:23] == list(range(23))
  np.testing.assert_array_equal(evals[-1]["mask"].any(1), [1, 1, 1, 0, 0])


def test_eval_is_finite_ordered_and_complete():
  cfg = _cfg(batch_size=3)
  ds = pipeline.text_dataset(cfg, "validation", source=DOCS)
  batches = list(ds)
  assert batches and all(v.shape == (3, T) for b in batches for v in b.values())
  assert _documents(batches) == [d["text"] for d in DOCS]
  assert _equal(batches, list(ds)), "a second pass must give the same batches"
  # Each document is BOS, its bytes, EOS. Targets: every token but each
  # document's BOS (the target crossing into it is masked) and the first token
  # of a row that continues a document (never a target).
  lengths = [len(d["text"]) + 2 for d in DOCS]
  n_tokens = sum(lengths)
  doc_starts = set(np.cumsum([0, *lengths[:-1]]).tolist())
  continued = [s for s in range(T + 1, n_tokens, T + 1) if s not in doc_starts]
  assert sum(int(b["mask"].sum()) for b in batches) == (
      n_tokens - len(DOCS) - len(continued))


@pytest.mark.parametrize("count", [2, 3])
def test_host_shards_are_disjoint_and_cover_the_data(count):
  cfg = _cfg(batch_size=6)
  shards = [_documents(pipeline.text_dataset(cfg, "validation", source=DOCS,
                                             process_index=i, process_count=count))
            for i in range(count)]
  flat = [d for s in shards for d in s]
  assert len(flat) == len(set(flat)) == len(DOCS)
  assert set(flat) == {d["text"] for d in DOCS}
  # Training shards: each host's first epoch is a permutation of its own shard.
  for i in range(count):
    batches = _take(pipeline.example_dataset(EXAMPLES, _cfg(batch_size=count), "train",
                                             process_index=i, process_count=count),
                    len(EXAMPLES[i::count]))
    assert sorted(_ids({"inputs": b["inputs"][0]} for b in batches)) == \
        _ids(EXAMPLES[i::count])


def test_fixed_shards_give_the_same_global_batches_on_any_process_count():
  text = dict(source="local_text", globs=("unused",), batch_size=4,
              row_shuffle_window=4)
  cfg = _cfg(shards=2, **text)
  one = _take(pipeline.make_dataset(cfg, "train", source=DOCS), 6)
  two = [_take(pipeline.make_dataset(cfg, "train", source=DOCS, process_index=i,
                                     process_count=2), 6) for i in range(2)]
  stacked = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*two)]
  assert _equal(one, stacked)
  # Without shards each process count reads its own way: the global batches differ.
  default = _take(pipeline.make_dataset(_cfg(**text), "train", source=DOCS), 6)
  assert not _equal(one, default)
  with pytest.raises(ValueError, match="shards=2 is not divisible by process_count=4"):
    pipeline.make_dataset(cfg, "train", source=DOCS, process_count=4)
  # Fewer training records than shards: the error names data.shards and a fit.
  with pytest.raises(ValueError, match=r"shards=4: split 'train' has 3 records"
                     r".*expected data.shards <= 3 .*--config.data.shards=2"):
    pipeline.make_dataset(_cfg(shards=4, **text), "train", source=DOCS[:3])


def test_stacked_shards_eval_pads_the_shorter_shard_and_state_round_trips():
  cfg = _cfg(batch_size=6, shards=2)
  evals = list(pipeline.make_dataset(cfg, "validation", source=EXAMPLES))
  # 23 rows: shard 0 holds 12 (4 batches of 3), shard 1 holds 11 (3 + 3 + 3 + 2).
  assert len(evals) == 4 and all(b["inputs"].shape == (6, 5) for b in evals)
  rows = [r for b in evals for r in b["inputs"][b["mask"].any(1)]]
  assert sorted(_ids({"inputs": r} for r in rows)) == list(range(23))
  it = iter(pipeline.make_dataset(cfg, "train", source=EXAMPLES))
  for _ in range(9):
    next(it)
  state = pipeline.iterator_state(it)
  want = [next(it) for _ in range(3)]
  fresh = iter(pipeline.make_dataset(cfg, "train", source=EXAMPLES))
  pipeline.restore_iterator_state(fresh, state)
  assert _equal([next(fresh) for _ in range(3)], want)


def test_orbax_restores_the_exact_next_batches(tmp_path):
  cfg = _cfg(row_shuffle_window=8, prefetch_batches=2)
  ds = pipeline.text_dataset(cfg, "train", source=DOCS)
  it = iter(ds)
  for _ in range(7):
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.save(7, args=ocp.args.Composite(
        params=ocp.args.StandardSave({"w": np.arange(3.0)}),
        data=pipeline.iterator_save_args(it)))
    # Drawn while the save may still be running: must not leak into the state.
    want = [next(it) for _ in range(5)]
    mngr.wait_until_finished()
  it.close()
  fresh = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore({"w": np.zeros(3)}),
        data=pipeline.iterator_restore_args(fresh)))
  assert restored["data"] is fresh
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))
  assert _equal([next(fresh) for _ in range(5)], want)
  fresh.close()


def test_json_state_round_trip_for_examples():
  ds = pipeline.example_dataset(EXAMPLES, _cfg(batch_size=2), "train")
  it = iter(ds)
  for _ in range(13):  # crosses an epoch boundary
    next(it)
  state = pipeline.iterator_state(it)
  want = [next(it) for _ in range(4)]
  fresh = iter(ds)
  pipeline.restore_iterator_state(fresh, state)
  assert _equal([next(fresh) for _ in range(4)], want)
  it.close()
  fresh.close()


def test_make_dataset_local_text_and_tfds(tmp_path):
  corpus = tmp_path / "c"
  corpus.mkdir()
  for i in range(8):
    (corpus / f"{i}.txt").write_text(f"document {i} " * (i + 1))
  cfg = _cfg(source="local_text", globs=str(corpus / "*.txt"),
             data_dir=str(tmp_path / "dd"), validation_fraction=0.3, batch_size=2)
  train = _take(pipeline.make_dataset(cfg, "train"), 3)
  assert all(b["inputs"].shape == (2, T) for b in train)
  val = _documents(pipeline.make_dataset(cfg, "validation"))
  assert val and set(val) < {f"document {i} " * (i + 1) for i in range(8)}
  # The same prepared data read back by name as a plain tfds dataset.
  builder = text_builder.local_text_builder(cfg.globs, cfg.data_dir,
                                            validation_fraction=0.3)
  by_name = _cfg(source="tfds", name=f"lsm_local_text/{builder.builder_config.name}",
                 data_dir=cfg.data_dir, batch_size=2)
  assert sorted(_documents(pipeline.make_dataset(by_name, "validation"))) == sorted(val)


def test_tfds_errors(tmp_path):
  cfg = _cfg(source="tfds", name="mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="'mnist' is not prepared.*download=True"):
    pipeline.make_dataset(cfg, "train")
  cfg = _cfg(source="tfds", name="no_such_dataset_xyz", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="name='no_such_dataset_xyz'"):
    pipeline.make_dataset(cfg, "train")


def test_call_errors():
  with pytest.raises(ValueError, match="source=None with cfg.source='task'"):
    pipeline.make_dataset(_cfg(), "train")
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by process_count=3"):
    pipeline.text_dataset(_cfg(), "train", source=DOCS, process_count=3)
  with pytest.raises(ValueError, match="process_index=2"):
    pipeline.text_dataset(_cfg(), "train", source=DOCS, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="has 2 records; expected at least process_count=4"):
    pipeline.text_dataset(_cfg(), "train", source=DOCS[:2], process_count=4)
  with pytest.raises(ValueError, match="text_key='body'"):
    _take(pipeline.text_dataset(_cfg(text_key="body", num_threads=0), "train",
                                source=DOCS), 1)
  with pytest.raises(ValueError, match="expected a dict with"):
    _take(pipeline.example_dataset([{"inputs": 1}] * 4, _cfg(num_threads=0), "train"), 1)


def test_config_from_config_dict():
  section = ml_collections.ConfigDict(dict(source="local_text", globs=["a/*.txt", "b/*"],
                                           seq_len=64, batch_size=8))
  cfg = DataConfig(**section)
  assert cfg.globs == ("a/*.txt", "b/*") and hash(cfg)
  assert DataConfig(source="local_text", globs="x/*.txt").globs == ("x/*.txt",)
  with pytest.raises(TypeError, match="seq_length"):
    DataConfig(seq_length=3)


@pytest.mark.parametrize("kw, match", [
    (dict(source="hf"), "source='hf'"),
    (dict(source="local_text"), "globs=\\(\\)"),
    (dict(tokenizer="bpe"), "tokenizer='bpe'"),
    (dict(tokenizer="sentencepiece"), "tokenizer_path=None"),
    (dict(tokenizer_path="m.model"), "tokenizer_path='m.model'"),
    (dict(document="line"), "document='line'"),
    (dict(validation_fraction=1.0), "validation_fraction=1.0"),
    (dict(seq_len=0), "seq_len=0"),
    (dict(batch_size=True), "batch_size=True"),
    (dict(batch_size=2.0), "batch_size=2.0"),
    (dict(seed=-1), "seed=-1"),
    (dict(shuffle="yes"), "shuffle='yes'"),
    (dict(download=1), "download=1"),
    (dict(eval_split=""), "eval_split=''"),
    (dict(num_threads=-1), "num_threads=-1"),
    (dict(row_shuffle_window=-1), "row_shuffle_window=-1; expected None"),
    (dict(row_shuffle_window=True), "row_shuffle_window=True"),
    (dict(row_shuffle_window=8.0), "row_shuffle_window=8.0"),
    (dict(row_shuffle_window=3, batch_size=8),
     "row_shuffle_window=3; .*0 \\(off\\) or an int >= batch_size=8"),
    (dict(shards=3), "shards=3"),
    (dict(shards=0), "shards=0"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    DataConfig(**kw)


def test_row_shuffle_window_permutes_rows_within_windows():
  rows = lambda cfg: [r for b in _take(pipeline.text_dataset(cfg, "train", source=DOCS), 4)
                      for r in b["inputs"].tolist()]
  plain = rows(_cfg(seed=2, row_shuffle_window=0))
  windowed = rows(_cfg(seed=2, row_shuffle_window=8))
  assert windowed != plain
  for w in range(0, 16, 8):  # same rows per window of 8, in another order
    assert sorted(windowed[w:w + 8]) == sorted(plain[w:w + 8])


def test_rows_are_shuffled_across_documents_by_default():
  """The default window (several global batches) mixes documents within a
  batch; without it a batch is consecutive rows, of one or two long documents."""
  assert DataConfig().row_window() == pipeline.ROW_SHUFFLE_MIN_WINDOW
  assert DataConfig(batch_size=1024).row_window() == (
      pipeline.ROW_SHUFFLE_BATCHES * 1024)
  assert DataConfig(row_shuffle_window=0).row_window() == 0
  # Ten documents of 5 to 6 rows each, one letter each: a row's letters name
  # its documents.
  letters = "abcdefghij"
  docs = [{"text": c * (5 * (T + 1) + i)} for i, c in enumerate(letters)]
  tok = ByteTokenizer()

  def documents_per_batch(**kw):
    batches = _take(pipeline.text_dataset(_cfg(seed=1, **kw), "train", source=docs),
                    12)
    return [len(set(tok.decode(b["inputs"].ravel()))) for b in batches]

  off = documents_per_batch(row_shuffle_window=0)
  assert max(off) <= 2, off
  mixed = documents_per_batch()
  assert np.mean(mixed) >= 3, mixed


def test_documents_start_with_bos_and_end_with_eos():
  """Byte tokenizer (BOS and EOS): each document is BOS, text, EOS in its own
  segment; the target crossing into the next document (its BOS) is masked."""
  tok = ByteTokenizer()
  docs = [{"text": "ab"}, {"text": "cde"}, {"text": "f"}]
  batch = next(iter(pipeline.text_dataset(_cfg(batch_size=1, seq_len=12),
                                          "validation", source=docs)))
  b, e = tok.bos_id, tok.eos_id
  a_, b_, c_, d_, e_, f_ = tok.encode("abcdef")
  row = [b, a_, b_, e, b, c_, d_, e_, e, b, f_, e, 0]
  np.testing.assert_array_equal(batch["inputs"][0], row[:-1])
  np.testing.assert_array_equal(batch["targets"][0], row[1:])
  np.testing.assert_array_equal(batch["segment_ids"][0],
                                [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(batch["positions"][0],
                                [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2])
  # Masked: EOS -> next BOS (twice) and the padding target.
  np.testing.assert_array_equal(batch["mask"][0],
                                [1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0])


class _EosOnly(ByteTokenizer):
  """A byte tokenizer without BOS (GPT-2 style: EOS only)."""
  bos_id = None
  doc_start_id = ByteTokenizer.eos_id
  eos_at_end = False


def test_eos_only_tokenizer_starts_documents_with_eos(monkeypatch):
  monkeypatch.setattr(pipeline, "make_tokenizer_for", lambda cfg: _EosOnly())
  tok = _EosOnly()
  docs = [{"text": "ab"}, {"text": "c"}]
  batch = next(iter(pipeline.text_dataset(_cfg(batch_size=1, seq_len=6),
                                          "validation", source=docs)))
  e = tok.eos_id
  a_, b_, c_ = tok.encode("abc")
  np.testing.assert_array_equal(batch["inputs"][0], [e, a_, b_, e, c_, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 2, 2, 0])
  np.testing.assert_array_equal(batch["mask"][0], [1, 1, 0, 1, 0, 0])


def test_sentencepiece_pipeline(tmp_path):
  from lsm.data import tokenizers  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(d["text"] for d in DOCS) + "\n")
  path = tokenizers.train_sentencepiece([str(corpus)], str(tmp_path / "m"),
                                        vocab_size=300, hard_vocab_limit=False)
  cfg = _cfg(tokenizer="sentencepiece", tokenizer_path=path, batch_size=2)
  tok = pipeline.make_tokenizer_for(cfg)
  batches = list(pipeline.text_dataset(cfg, "validation", source=DOCS))
  assert _documents(batches, tok=tok) == [d["text"] for d in DOCS]
  # Subword pieces, not bytes.
  assert len(_tokens(batches)) < sum(len(d["text"]) + 1 for d in DOCS)


def test_padding_is_masked_by_position_not_by_id():
  """A tokenizer without a pad token pads with its EOS, which is also a real
  token (it ends every document): the EOS that ends a document is a counted
  target, the EOS that pads is not. The finite eval split pads its last row."""
  from tests.data.test_tokenizers import LLAMA_TOKENIZER
  cfg = _cfg(tokenizer="hf", tokenizer_path=LLAMA_TOKENIZER, batch_size=2)
  docs = [{"text": "linear state " * (1 + i % 3)} for i in range(5)]
  batches = list(pipeline.text_dataset(cfg, "test", source=docs))
  eos = 263
  mask = np.concatenate([b["mask"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  segments = np.concatenate([b["segment_ids"] for b in batches])
  padding = segments == 0
  assert padding.any() and not mask[padding].any()
  # Padding is filled with EOS, and real document-ending EOS targets count.
  np.testing.assert_array_equal(targets[padding & (targets != 0)], eos)
  assert (targets[mask] == eos).sum() == len(docs)
