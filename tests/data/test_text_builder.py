"""Local text -> tfds array_record: complete disjoint splits, no rebuild of an
unchanged file set, a new build for changed files, clear errors, no TensorFlow."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from lsm.data import text_builder

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _write_corpus(d, n=12, paragraphs=1):
  d.mkdir(parents=True, exist_ok=True)
  docs = []
  for i in range(n):
    blocks = [f"file {i} paragraph {j}: héllo wörld\nsecond line {i}.{j}"
              for j in range(paragraphs)]
    (d / f"doc{i:02d}.txt").write_text("\n\n \n".join(blocks) + "\n", encoding="utf-8")
    docs.append(blocks)
  return docs


def _texts(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i]["text"] for i in range(len(source))]


def test_file_documents_split_completely(tmp_path):
  docs = _write_corpus(tmp_path / "c", n=40)
  b = text_builder.build_local_text(str(tmp_path / "c" / "*.txt"), str(tmp_path / "dd"),
                                    validation_fraction=0.2)
  train, val = _texts(b, "train"), _texts(b, "validation")
  assert train and val
  assert not set(train) & set(val)
  want = {(blocks[0] + "\n").encode() for blocks in docs}  # whole files, as written
  assert sorted(train + val) == sorted(want)
  assert 1 <= len(val) <= 20  # about 0.2 * 40
  source = b.as_data_source(split="train")[0]["source"].decode()
  assert os.path.isabs(source) and source.startswith(str(tmp_path / "c"))


def test_paragraph_documents(tmp_path):
  docs = _write_corpus(tmp_path / "c", n=3, paragraphs=4)
  b = text_builder.build_local_text([str(tmp_path / "c" / "doc0*.txt")],
                                    str(tmp_path / "dd"), document="paragraph")
  train, val = _texts(b, "train"), _texts(b, "validation")
  assert len(val) >= 1 and len(train) >= 1
  assert sorted(train + val) == sorted(p.encode() for blocks in docs for p in blocks)


def test_split_is_stable_across_locations(tmp_path):
  _write_corpus(tmp_path / "a", n=30)
  _write_corpus(tmp_path / "b" / "nested", n=30)
  val = []
  for corpus in (tmp_path / "a", tmp_path / "b" / "nested"):
    b = text_builder.build_local_text(str(corpus / "*.txt"), str(tmp_path / "dd"),
                                      validation_fraction=0.3)
    val.append(sorted(os.path.basename(s["source"].decode())
                      for s in b.as_data_source(split="validation")))
  assert val[0] == val[1]


def test_two_documents_fill_both_splits(tmp_path):
  _write_corpus(tmp_path / "c", n=2)
  for fraction in (0.01, 0.99):
    b = text_builder.build_local_text(str(tmp_path / "c" / "*"), str(tmp_path / "dd"),
                                      validation_fraction=fraction)
    assert len(_texts(b, "train")) == 1 and len(_texts(b, "validation")) == 1


def test_unchanged_files_are_not_rebuilt(tmp_path, monkeypatch):
  _write_corpus(tmp_path / "c", n=5)
  glob = str(tmp_path / "c" / "*.txt")
  first = text_builder.build_local_text(glob, str(tmp_path / "dd"))
  info = pathlib.Path(first.data_dir) / "dataset_info.json"
  mtime = info.stat().st_mtime_ns

  def _fail(*args):
    raise AssertionError("the files were read again")
  monkeypatch.setattr(text_builder, "_read_documents", _fail)
  second = text_builder.build_local_text([glob], str(tmp_path / "dd"))
  assert second.data_dir == first.data_dir
  assert info.stat().st_mtime_ns == mtime
  assert sorted(_texts(second, "train")) == sorted(_texts(first, "train"))


def test_changed_files_give_a_new_build(tmp_path):
  _write_corpus(tmp_path / "c", n=5)
  glob = str(tmp_path / "c" / "*.txt")
  first = text_builder.build_local_text(glob, str(tmp_path / "dd"))
  (tmp_path / "c" / "doc03.txt").write_text("brand new text\n")
  second = text_builder.build_local_text(glob, str(tmp_path / "dd"))
  assert second.data_dir != first.data_dir
  assert b"brand new text\n" in _texts(second, "train") + _texts(second, "validation")
  assert b"brand new text\n" not in _texts(first, "train") + _texts(first, "validation")
  (tmp_path / "c" / "doc99.txt").write_text("one more file\n")
  third = text_builder.build_local_text(glob, str(tmp_path / "dd"))
  assert third.data_dir not in (first.data_dir, second.data_dir)
  options = text_builder.build_local_text(glob, str(tmp_path / "dd"),
                                          validation_fraction=0.5)
  assert options.data_dir != third.data_dir


def test_errors(tmp_path):
  _write_corpus(tmp_path / "c", n=1)
  data_dir = str(tmp_path / "dd")
  missing = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(ValueError, match=re.escape(f"glob '{missing}' matches no files")):
    text_builder.build_local_text([str(tmp_path / "c" / "*"), missing], data_dir)
  with pytest.raises(ValueError, match="globs is empty"):
    text_builder.build_local_text([], data_dir)
  with pytest.raises(ValueError, match="1 non-blank document"):
    text_builder.build_local_text(str(tmp_path / "c" / "*"), data_dir)
  with pytest.raises(ValueError, match="document='line'"):
    text_builder.build_local_text(str(tmp_path / "c" / "*"), data_dir, document="line")
  with pytest.raises(ValueError, match="validation_fraction=1.0"):
    text_builder.build_local_text(str(tmp_path / "c" / "*"), data_dir,
                                  validation_fraction=1.0)


def test_no_tensorflow(tmp_path):
  """Build, read and batch in a fresh process: no tensorflow module is loaded."""
  _write_corpus(tmp_path / "c", n=6)
  script = textwrap.dedent(f"""
      import sys
      from lsm.data import pipeline
      cfg = pipeline.DataConfig(source="local_text", globs=({str(tmp_path / 'c' / '*')!r},),
                                data_dir={str(tmp_path / 'dd')!r}, seq_len=8,
                                batch_size=2, prefetch_batches=0)
      batch = next(iter(pipeline.make_dataset(cfg, "train")))
      assert batch["inputs"].shape == (2, 8), batch["inputs"].shape
      loaded = [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
      assert not loaded, loaded
      print("ok")
  """)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, env=env, timeout=240, check=False)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
