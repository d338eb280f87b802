"""A tfds dataset built from the user's own text files (array_record, no TensorFlow).

``build_local_text(globs, data_dir)`` expands the globs, prepares the dataset
once under ``data_dir/lsm_local_text/<config>/1.0.0`` and returns the builder;
``builder.as_data_source(split="train")`` then gives a random-access source of
``{"text": bytes, "source": bytes}`` records for grain.

Identity: the config name is ``{document}-{digest}``, the digest covering the
sorted absolute paths, sizes and modification times of the files, the document
mode and the validation fraction. Editing, adding or removing a file gives a new
config, so a stale build is never read; an unchanged file set reuses the
prepared data without reading the files.

Splits: a document goes to "validation" when a stable hash of (its file's path
relative to the files' common directory, its index in the file) falls below
``validation_fraction``; the split therefore does not depend on where the corpus
is mounted or on the order of the globs. With two or more documents both splits
are made non-empty.
"""

import dataclasses
import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

DOCUMENT_MODES = ("file", "paragraph")
# Blank line: a newline, optional spaces or tabs, another newline.
_PARAGRAPH_BREAK = re.compile(rb"\r?\n[ \t\r]*\n")


def expand_globs(globs: str | Sequence[str]) -> tuple[str, ...]:
  """Sorted, de-duplicated absolute paths of the files the globs match.

  Raises:
    ValueError: a glob matches no file, or ``globs`` is empty.
  """
  globs = (globs,) if isinstance(globs, (str, os.PathLike)) else tuple(globs)
  if not globs:
    raise ValueError("build_local_text: globs is empty; expected at least one glob "
                     "of text files")
  paths = set()
  for g in globs:
    g = os.path.expanduser(os.fspath(g))
    matched = [p for p in glob.glob(g, recursive=True) if os.path.isfile(p)]
    if not matched:
      raise ValueError(f"build_local_text: glob {g!r} matches no files; expected "
                       "at least one text file")
    paths.update(os.path.abspath(p) for p in matched)
  return tuple(sorted(paths))


def _digest(paths: Sequence[str], document: str, validation_fraction: float) -> str:
  """Hex digest naming a build: file set + metadata + split options."""
  h = hashlib.sha256()
  h.update(f"{document}\0{validation_fraction!r}\0".encode())
  for p in paths:
    st = os.stat(p)
    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
  return h.hexdigest()[:16]


def _read_documents(path: str, document: str) -> list[bytes]:
  """The non-blank documents of one file, as raw bytes (any encoding survives)."""
  with open(path, "rb") as f:
    data = f.read()
  if document == "file":
    return [data] if data.strip() else []
  return [block.strip() for block in _PARAGRAPH_BREAK.split(data) if block.strip()]


def _hash_unit(key: str) -> float:
  """A stable pseudo-uniform number in [0, 1) for ``key``."""
  return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
  """Which files, how they become documents, and the validation share."""
  # Out of the repr: tfds logs the config, and a corpus may have many files.
  paths: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  document: str = "file"
  validation_fraction: float = 0.05


class LocalTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local text files -> splits "train" and "validation" of {"text", "source"}.

  Kept out of tfds' global registry: it is always constructed with an explicit
  ``LocalTextConfig`` by ``build_local_text``.
  """

  name = "lsm_local_text"
  # Bump when the generation logic changes, so older builds are not reused.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Documents from local text files."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    """None: no checksums or metadata files live beside this code.

    tfds' default looks the package up with importlib resources and, for an
    editable install, reaches for the ``importlib_resources`` backport, which is
    not installed (tfds 4.9.10, 2026-11).
    """
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents read from local text files by lsm.data.text_builder.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    root = os.path.commonpath(cfg.paths)
    if len(cfg.paths) == 1:
      root = os.path.dirname(root)
    keys = []  # (unit hash, path, index in file)
    for path in cfg.paths:
      rel = os.path.relpath(path, root)
      for i in range(len(_read_documents(path, cfg.document))):
        keys.append((_hash_unit(f"{rel}\0{i}"), path, i))
    if len(keys) < 2:
      raise ValueError(f"build_local_text: the files hold {len(keys)} non-blank "
                       f"document(s) with document={cfg.document!r}; expected at "
                       "least 2 (one for each split)")
    keys.sort()
    n_val = sum(u < cfg.validation_fraction for u, _, _ in keys)
    # Lowest hashes go to validation; clamp so both splits keep a document.
    n_val = min(max(n_val, 1), len(keys) - 1)
    val = sorted((p, i) for _, p, i in keys[:n_val])
    train = sorted((p, i) for _, p, i in keys[n_val:])
    return {"train": self._generate_examples(train, root),
            "validation": self._generate_examples(val, root)}

  def _generate_examples(self, keys: Sequence[tuple[str, int]],
                         root: str) -> Iterator[tuple[str, dict]]:
    cached_path, docs = None, []
    for path, i in keys:  # sorted by path: each file is read once
      if path != cached_path:
        cached_path, docs = path, _read_documents(path, self.builder_config.document)
      yield f"{os.path.relpath(path, root)}:{i}", {"text": docs[i], "source": path}


def local_text_builder(globs: str | Sequence[str], data_dir: str | None, *,
                       validation_fraction: float = 0.05,
                       document: str = "file") -> LocalTextBuilder:
  """The builder for these files and options, without preparing it."""
  if document not in DOCUMENT_MODES:
    raise ValueError(f"build_local_text: document={document!r}; expected one of "
                     f"{list(DOCUMENT_MODES)}")
  if (isinstance(validation_fraction, bool)
      or not isinstance(validation_fraction, (int, float))
      or not 0 < validation_fraction < 1):
    raise ValueError(f"build_local_text: validation_fraction={validation_fraction!r}; "
                     "expected a number in (0, 1)")
  validation_fraction = float(validation_fraction)
  paths = expand_globs(globs)
  name = f"{document}-{_digest(paths, document, validation_fraction)}"
  config = LocalTextConfig(name=name, version=LocalTextBuilder.VERSION, paths=paths,
                           document=document, validation_fraction=validation_fraction,
                           description=f"{len(paths)} files")
  return LocalTextBuilder(config=config, data_dir=data_dir, file_format="array_record")


def build_local_text(globs: str | Sequence[str], data_dir: str | None, *,
                     validation_fraction: float = 0.05,
                     document: str = "file") -> LocalTextBuilder:
  """Prepares (once) and returns the local text dataset of ``globs``.

  Args:
    globs: a glob or several globs of text files (``**`` recurses).
    data_dir: tfds data directory; None for tfds' default (~/tensorflow_datasets).
    validation_fraction: expected share of documents in "validation", in (0, 1).
    document: "file" (one document per file) or "paragraph" (blank-line
      separated blocks, stripped).

  Returns:
    The prepared builder; ``builder.as_data_source(split=...)`` gives a
    random-access source of {"text": bytes, "source": bytes} per split.

  Raises:
    ValueError: a glob matches nothing, fewer than 2 documents, bad options.
  """
  builder = local_text_builder(globs, data_dir, validation_fraction=validation_fraction,
                               document=document)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  return builder
