"""Tokenizers: byte-level (no files), SentencePiece and Hugging Face ``tokenizers``
(``tokenizer.json``, the format pretrained tokenizers ship in), the last two
trained locally or loaded.

All share one interface: ``vocab_size, pad_id, bos_id, eos_id`` attributes,
``encode(text) -> int32 [n]`` (no specials added) and ``decode(ids) -> str``
(special ids skipped). ``pad_id`` is only what fills padding: padding is masked
by position (the packer's segment ids and loss mask, the eval rows' weights),
never by its id, so a tokenizer's pad may be any id, or its EOS where it has
none (Llama, Mistral, Qwen and SmolLM tokenizers).

Documents, as training packs them and inference prompts them (``Tokenizer``):
each starts with ``doc_start_id``, the tokenizer's BOS, or its EOS where it has
no BOS (as GPT-2-style pretrained tokenizers do), so a document's first token is
predicted from that token alone, in training as in generation. Where the
tokenizer has both, EOS also ends each document (``eos_at_end``), so the model
learns where a document stops. ``encode_document`` gives a training document,
``encode_prompt`` the start of one (what lsm-generate, lsm-eval's harness
adapter and the trainer's sample feed the model).
"""

import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

# The special ids of lsm's own tokenizers (byte, and those trained here).
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# SentencePiece needs an unk id; the byte tokenizer never produces one.
SP_UNK_ID = 3

KINDS = ("byte", "sentencepiece", "hf")
# Special tokens of train_hf_bpe, at the shared ids.
HF_SPECIALS = ("<pad>", "<bos>", "<eos>")


def _as_ids(ids) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"decode: ids has shape {ids.shape} and dtype {ids.dtype}; "
                     "expected a 1-D integer sequence")
  return ids


class Tokenizer:
  """What every tokenizer adds to ``encode``: documents and prompts.

  Subclasses set ``doc_start_id`` (BOS, or EOS without a BOS) and
  ``eos_at_end`` (True where the tokenizer has both BOS and EOS).
  """

  doc_start_id: int
  eos_at_end: bool

  def encode_document(self, text: str | bytes) -> np.ndarray:
    """A training document: doc_start, the text's ids, then EOS if
    ``eos_at_end``; int32 [n + 1] or [n + 2]."""
    ids = self.encode(text)
    end = [self.eos_id] if self.eos_at_end else []
    return np.concatenate([np.asarray([self.doc_start_id], np.int32), ids,
                           np.asarray(end, np.int32)])

  def encode_prompt(self, text: str | bytes = "") -> np.ndarray:
    """The start of a document whose text begins with ``text``: doc_start,
    then the text's ids; int32 [n + 1]. ``""`` gives the lone start token,
    from which an unconditional sample begins."""
    return np.concatenate([np.asarray([self.doc_start_id], np.int32),
                           self.encode(text)])


def _doc_specials(tok, bos_id):
  """Sets ``tok.doc_start_id`` and ``tok.eos_at_end`` from its BOS (None or
  negative: none) and ``tok.eos_id``."""
  has_bos = bos_id is not None and bos_id >= 0 and bos_id != tok.eos_id
  tok.doc_start_id = int(bos_id) if has_bos else int(tok.eos_id)
  tok.eos_at_end = has_bos


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens: byte b -> b + 3 after pad=0, bos=1, eos=2."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  doc_start_id = BOS_ID
  eos_at_end = True
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids, int32 [n], of ``text`` (a str is encoded as UTF-8)."""
    if isinstance(text, str):
      text = text.encode("utf-8")
    elif not isinstance(text, (bytes, bytearray, memoryview)):
      raise ValueError(f"encode: text is a {type(text).__name__}; expected str or bytes")
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32) + self.offset

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
    ids = _as_ids(list(ids) if not isinstance(ids, np.ndarray) else ids)
    ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
    return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self):
    return "ByteTokenizer()"


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model file behind the ByteTokenizer interface.

  The processor is rebuilt from the model bytes when pickled, so the tokenizer
  can travel to grain worker processes.
  """

  def __init__(self, model_path: str):
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
      raise ValueError(f"SentencePieceTokenizer: model_path={model_path!r} is not "
                       "a file; expected a SentencePiece .model file (train one "
                       "with train_sentencepiece)")
    self.model_path = model_path
    with open(model_path, "rb") as f:
      self._load(f.read())

  def _load(self, proto: bytes):
    self._proto = proto
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 0:
      raise ValueError(f"SentencePieceTokenizer: model {self.model_path!r} has no "
                       "eos id; expected one (documents start with BOS, or EOS "
                       "where there is no BOS)")
    # Padding is masked by position; without a pad piece it is filled with EOS.
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else self.eos_id
    _doc_specials(self, self.bos_id)

  def __getstate__(self):
    return {"model_path": self.model_path, "proto": self._proto}

  def __setstate__(self, state):
    self.model_path = state["model_path"]
    self._load(state["proto"])

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids, int32 [n], of ``text`` (bytes are decoded as UTF-8)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
      text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
      raise ValueError(f"encode: text is a {type(text).__name__}; expected str or bytes")
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``; pad/bos/eos are skipped."""
    ids = _as_ids(list(ids) if not isinstance(ids, np.ndarray) else ids)
    special = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in special])

  def __repr__(self):
    return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def train_sentencepiece(files: Sequence[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = "unigram", seed: int = 0,
                        **options) -> str:
  """Trains a SentencePiece model on local text files; returns the .model path.

  Training is deterministic (one thread, no input sampling, a fixed seed), so the
  same files and options give the same model bytes. Text is not normalised and
  whitespace is kept, so ``decode(encode(s)) == s``; unseen characters fall back
  to byte pieces. Ids: pad 0, bos 1, eos 2, unk 3.

  Args:
    files: text files; each line is a training sentence.
    model_prefix: output path prefix; writes ``{model_prefix}.model`` and ``.vocab``.
    vocab_size: vocabulary size, including the 4 specials and 256 byte pieces.
    model_type: "unigram" or "bpe".
    seed: seed of SentencePiece's random generator.
    **options: further ``SentencePieceTrainer.train`` options, overriding these.

  Returns:
    The path of the written model file.
  """
  files = [os.fspath(f) for f in ([files] if isinstance(files, str) else files)]
  if not files:
    raise ValueError("train_sentencepiece: files is empty; expected text file paths")
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"train_sentencepiece: file {f!r} does not exist")
  minimum = 256 + 4  # byte pieces + pad/bos/eos/unk
  if not isinstance(vocab_size, int) or vocab_size <= minimum:
    raise ValueError(f"train_sentencepiece: vocab_size={vocab_size!r}; expected an "
                     f"int > {minimum} (256 byte-fallback pieces + 4 specials)")
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"train_sentencepiece: model_type={model_type!r}; expected "
                     "'unigram' or 'bpe'")
  model_prefix = os.fspath(model_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  kwargs = dict(
      input=files, model_prefix=model_prefix, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=True, character_coverage=1.0,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=SP_UNK_ID,
      # Lossless: no NFKC, keep repeated/leading spaces, so decode inverts encode.
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      # Determinism: all sentences, in file order, one thread.
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
      minloglevel=2)
  kwargs.update(options)
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(**kwargs)
  except RuntimeError as e:
    # SentencePiece says "Vocabulary size too high" etc.; keep its text, name ours.
    raise ValueError(f"train_sentencepiece: training with vocab_size={vocab_size} "
                     f"on {len(files)} file(s) failed: {e}") from e
  return model_prefix + ".model"


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizers`` file (tokenizer.json) behind the
  ByteTokenizer interface.

  An eos token must exist; specials are found by the usual names (``<pad>``,
  ``[PAD]``, ``<|endoftext|>``, ``</s>``, ``<|begin_of_text|>``, ...) at
  whatever ids the file gives them. Without a bos token, ``bos_id`` and
  ``doc_start_id`` are the eos id; without a pad token, ``pad_id`` is the eos id
  (padding is masked by position, not by id). The tokenizer is rebuilt from its
  JSON when pickled, so it can travel to grain worker processes.
  """

  PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
  BOS_NAMES = ("<bos>", "<s>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>")
  EOS_NAMES = ("<eos>", "</s>", "[EOS]", "<|endoftext|>", "<|end_of_text|>",
               "[SEP]")

  def __init__(self, path: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise ValueError(f"HFTokenizer: path={path!r} is not a file; expected a "
                       "Hugging Face tokenizer.json (train one with train_hf_bpe)")
    self.path = path
    with open(path, encoding="utf-8") as f:
      self._load(f.read())

  def _load(self, text: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # pylint: disable=broad-except  (a Rust-side error)
      raise ValueError(f"HFTokenizer: {self.path!r} is not a tokenizers JSON "
                       f"file ({' '.join(str(e).split())[:200]}); expected a "
                       "tokenizer.json") from None
    self._json = text
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    find = lambda names: next((i for i in map(self._tok.token_to_id, names)  # noqa: E731
                               if i is not None), None)
    self.pad_id, self.bos_id, self.eos_id = (find(self.PAD_NAMES),
                                             find(self.BOS_NAMES),
                                             find(self.EOS_NAMES))
    if self.eos_id is None:
      raise ValueError(f"HFTokenizer: {self.path!r} has no eos token (one of "
                       f"{list(self.EOS_NAMES)}); expected one (documents start "
                       "with BOS, or EOS where there is no BOS)")
    _doc_specials(self, self.bos_id)
    if self.bos_id is None:
      self.bos_id = self.eos_id
    if self.pad_id is None:
      self.pad_id = self.eos_id
    self._special = {self.pad_id, self.bos_id, self.eos_id}

  def __getstate__(self):
    return {"path": self.path, "json": self._json}

  def __setstate__(self, state):
    self.path = state["path"]
    self._load(state["json"])

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids, int32 [n], of ``text`` (no special tokens added)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
      text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
      raise ValueError(f"encode: text is a {type(text).__name__}; expected str or bytes")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids,
                      dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``; pad/bos/eos are skipped."""
    ids = _as_ids(list(ids) if not isinstance(ids, np.ndarray) else ids)
    return self._tok.decode([int(i) for i in ids if int(i) not in self._special],
                            skip_special_tokens=False)

  def __repr__(self):
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def train_hf_bpe(files: Sequence[str], vocab_size: int, *, path: str | None = None,
                 min_frequency: int = 2) -> "HFTokenizer":
  """Trains a byte-level BPE tokenizer (GPT-2 style) with ``tokenizers``.

  Byte-level: every string encodes (no unknown token) and ``decode(encode(s))
  == s``. Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, then the 256 byte
  symbols and the merges. Training reads the files in the given order and is
  deterministic: the same files and options give the same tokenizer.json.

  Args:
    files: text files.
    vocab_size: vocabulary size, including the 3 specials and 256 byte symbols.
    path: where to write tokenizer.json; None keeps it in memory only
      (``.path`` is None).
    min_frequency: merges need a pair seen at least this often.

  Returns:
    The HFTokenizer (``data.tokenizer=hf`` with ``data.tokenizer_path=path``
    uses the written file).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers
  files = [os.fspath(f) for f in ([files] if isinstance(files, str) else files)]
  if not files:
    raise ValueError("train_hf_bpe: files is empty; expected text file paths")
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"train_hf_bpe: file {f!r} does not exist")
  minimum = 256 + len(HF_SPECIALS)
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or (
      vocab_size <= minimum):
    raise ValueError(f"train_hf_bpe: vocab_size={vocab_size!r}; expected an int "
                     f"> {minimum} (256 byte symbols + {len(HF_SPECIALS)} specials)")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=list(HF_SPECIALS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train(files, trainer)
  text = tok.to_str()
  out = HFTokenizer.__new__(HFTokenizer)
  out.path = None
  if path is not None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    out.path = path
  out._load(text)  # pylint: disable=protected-access
  return out


def make_tokenizer(kind: str, path: str | None = None):
  """The tokenizer ``kind`` ("byte"; "sentencepiece" or "hf", which need
  ``path``: the .model file or the tokenizer.json)."""
  if kind == "byte":
    if path is not None:
      raise ValueError(f"make_tokenizer: path={path!r} with kind='byte'; expected "
                       "None (the byte tokenizer has no model file)")
    return ByteTokenizer()
  if kind == "sentencepiece":
    if path is None:
      raise ValueError("make_tokenizer: kind='sentencepiece' needs path, the "
                       ".model file; got None")
    return SentencePieceTokenizer(path)
  if kind == "hf":
    if path is None:
      raise ValueError("make_tokenizer: kind='hf' needs path, the "
                       "tokenizer.json file; got None")
    return HFTokenizer(path)
  raise ValueError(f"make_tokenizer: kind={kind!r}; expected one of {list(KINDS)}")
