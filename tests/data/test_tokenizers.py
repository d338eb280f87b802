"""Tokenizers: lossless round trips, id ranges, a deterministic locally trained
SentencePiece model, and clear errors."""

import os
import pickle

import numpy as np
import pytest

from lsm.data import tokenizers
from lsm.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

TEXTS = ["héllo wörld", "日本語のテキスト 😀", "  two  spaces\nnew line\ttab ", "", "x"]
# A pretrained-style tokenizer.json (tests/models/hf_fixtures/make_fixtures.py):
# byte-level BPE, <|begin_of_text|> 262 and <|end_of_text|> 263, no pad token.
LLAMA_TOKENIZER = os.path.join(os.path.dirname(__file__), os.pardir, "models",
                               "hf_fixtures", "llama", "tokenizer.json")
WORDS = ["alpha", "beta", "gamma", "delta", "über", "naïve", "日本", "the", "a",
         "of", "model", "state", "linear", "attention", "recurrent"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert len(ids) == len(text.encode())
  assert np.all((ids >= 3) & (ids < tok.vocab_size))
  assert tok.decode(ids) == text
  np.testing.assert_array_equal(tok.encode(text.encode()), ids)


def test_byte_ids_and_specials():
  tok = ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  np.testing.assert_array_equal(tok.encode(bytes([0, 255])), [3, 258])
  ids = tok.encode("ab")
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "ab"
  # A truncated UTF-8 sequence is replaced, not an exception.
  assert tok.decode(tok.encode("é".encode()[:1])) == "\ufffd"
  with pytest.raises(ValueError, match="text is a int"):
    tok.encode(3)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  rng = np.random.default_rng(0)
  corpus = d / "corpus.txt"
  syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po"]
  words = WORDS + ["".join(rng.choice(syllables, size=3)) for _ in range(60)]
  corpus.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 12)))
                              for _ in range(500)) + "\n")
  return corpus, tokenizers.train_sentencepiece([str(corpus)], str(d / "m"),
                                                vocab_size=340)


def test_sentencepiece_round_trip(sp_model):
  _, path = sp_model
  tok = SentencePieceTokenizer(path)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (340, 0, 1, 2)
  # "€" and the emoji never occur in the corpus: they go through byte fallback.
  for text in [*TEXTS, "alpha über model €", "naïve state 😀\n"]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert np.all((ids > tok.eos_id) & (ids < tok.vocab_size)), text
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode(text.encode()), ids)
  ids = tok.encode("alpha beta")
  assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "alpha beta"
  # Subword pieces were learned: frequent words are shorter than their bytes.
  assert len(tok.encode("attention")) < len("attention")


def test_sentencepiece_reload_and_retrain_are_identical(sp_model, tmp_path):
  corpus, path = sp_model
  text = "linear attention über recurrent state 日本"
  a, b = SentencePieceTokenizer(path), pickle.loads(pickle.dumps(
      SentencePieceTokenizer(path)))
  np.testing.assert_array_equal(a.encode(text), b.encode(text))
  again = tokenizers.train_sentencepiece([str(corpus)], str(tmp_path / "again"),
                                         vocab_size=340)
  # The model files differ only in the recorded trainer paths; compare the vocab.
  c = SentencePieceTokenizer(again)
  pieces = lambda t: [t._sp.id_to_piece(i) for i in range(t.vocab_size)]
  assert pieces(a) == pieces(c), "training is not deterministic"
  np.testing.assert_array_equal(a.encode(text), c.encode(text))


def test_make_tokenizer(sp_model):
  _, path = sp_model
  assert isinstance(tokenizers.make_tokenizer("byte"), ByteTokenizer)
  assert tokenizers.make_tokenizer("sentencepiece", path).vocab_size == 340
  with pytest.raises(ValueError, match="kind='bpe'"):
    tokenizers.make_tokenizer("bpe")
  with pytest.raises(ValueError, match="needs path"):
    tokenizers.make_tokenizer("sentencepiece")
  with pytest.raises(ValueError, match="kind='byte'"):
    tokenizers.make_tokenizer("byte", path)
  with pytest.raises(ValueError, match="model_path='/nonexistent.model'"):
    tokenizers.make_tokenizer("sentencepiece", "/nonexistent.model")


def test_train_sentencepiece_errors(sp_model, tmp_path):
  corpus, _ = sp_model
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizers.train_sentencepiece([str(corpus)], str(tmp_path / "m"), vocab_size=100)
  with pytest.raises(ValueError, match="vocab_size=100000"):
    tokenizers.train_sentencepiece([str(corpus)], str(tmp_path / "m"), vocab_size=100000)
  with pytest.raises(ValueError, match="does not exist"):
    tokenizers.train_sentencepiece([str(tmp_path / "no.txt")], str(tmp_path / "m"),
                                   vocab_size=340)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, sp_model):
  corpus, _ = sp_model
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  return corpus, tokenizers.train_hf_bpe([str(corpus)], 400, path=str(path))


def test_hf_bpe_round_trip(hf_model):
  _, tok = hf_model
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (400, 0, 1, 2)
  loaded = tokenizers.make_tokenizer("hf", tok.path)
  # Byte-level: characters never seen in training ("€", the emoji) still encode.
  for text in [*TEXTS, "alpha über model €", "naïve state 😀\n"]:
    ids = loaded.encode(text)
    assert ids.dtype == np.int32
    assert np.all((ids > tok.eos_id) & (ids < tok.vocab_size)), text
    assert loaded.decode(ids) == text
    np.testing.assert_array_equal(loaded.encode(text.encode()), ids)
  ids = loaded.encode("alpha beta")
  assert loaded.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "alpha beta"
  assert len(loaded.encode("attention model")) < len("attention model")
  again = pickle.loads(pickle.dumps(loaded))
  np.testing.assert_array_equal(again.encode("linear state"),
                                loaded.encode("linear state"))


def test_hf_bpe_training_is_deterministic(hf_model, tmp_path):
  corpus, tok = hf_model
  again = tokenizers.train_hf_bpe([str(corpus)], 400, path=str(tmp_path / "t.json"))
  assert (tmp_path / "t.json").read_text() == open(tok.path).read()
  in_memory = tokenizers.train_hf_bpe([str(corpus)], 400)
  assert in_memory.path is None
  np.testing.assert_array_equal(in_memory.encode("über recurrent"),
                                again.encode("über recurrent"))


def test_hf_errors(hf_model, tmp_path):
  corpus, _ = hf_model
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizers.train_hf_bpe([str(corpus)], 100)
  with pytest.raises(ValueError, match="does not exist"):
    tokenizers.train_hf_bpe([str(tmp_path / "no.txt")], 400)
  with pytest.raises(ValueError, match="needs path"):
    tokenizers.make_tokenizer("hf")
  with pytest.raises(ValueError, match="is not a file"):
    tokenizers.make_tokenizer("hf", str(tmp_path / "none.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not a tokenizers JSON"):
    tokenizers.HFTokenizer(str(bad))
  import tokenizers as hf
  t = hf.Tokenizer(hf.models.BPE())
  t.add_special_tokens(["<pad>"])
  t.save(str(tmp_path / "no_eos.json"))
  with pytest.raises(ValueError, match="has no eos token"):
    tokenizers.HFTokenizer(str(tmp_path / "no_eos.json"))


def test_hf_special_ids_are_taken_where_the_file_puts_them(tmp_path):
  """Pretrained tokenizers keep their own ids: a pad at 1 stays 1, and a
  Llama-style file (BOS and EOS at the end of the vocabulary, no pad) pads with
  its EOS (padding is masked by position)."""
  import tokenizers as hf
  t = hf.Tokenizer(hf.models.BPE())
  t.add_special_tokens(["<eos>", "<pad>"])
  t.save(str(tmp_path / "pad1.json"))
  tok = tokenizers.HFTokenizer(str(tmp_path / "pad1.json"))
  assert (tok.pad_id, tok.eos_id) == (1, 0)
  llama = tokenizers.HFTokenizer(LLAMA_TOKENIZER)
  assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id) == (
      264, 262, 263, 263)
  ids = llama.encode("a linear recurrent network")
  assert ids.max() < 262 and llama.decode([262, *ids, 263]) == (
      "a linear recurrent network")


def test_documents_start_with_bos_and_end_with_eos(sp_model, hf_model):
  """Tokenizers with BOS and EOS: a training document is BOS, text, EOS; a
  prompt is BOS, text (lsm.data.pipeline and lsm.eval read these)."""
  _, sp_path = sp_model
  _, hf_tok = hf_model
  for tok in (ByteTokenizer(), SentencePieceTokenizer(sp_path), hf_tok):
    assert (tok.doc_start_id, tok.eos_at_end) == (tok.bos_id, True), tok
    ids = tok.encode("alpha beta")
    doc = tok.encode_document("alpha beta")
    assert doc.dtype == np.int32
    np.testing.assert_array_equal(doc, [tok.bos_id, *ids, tok.eos_id])
    np.testing.assert_array_equal(tok.encode_prompt("alpha beta"), [tok.bos_id, *ids])
    np.testing.assert_array_equal(tok.encode_prompt(), [tok.bos_id])
    assert tok.decode(doc) == "alpha beta"


def test_eos_only_tokenizers_start_documents_with_eos(sp_model, tmp_path):
  """Without a BOS (GPT-2's <|endoftext|> alone; SentencePiece with bos_id=-1)
  EOS starts each document and nothing is appended at its end."""
  import tokenizers as hf
  t = hf.Tokenizer(hf.models.WordLevel({"<pad>": 0, "<|endoftext|>": 1, "a": 2,
                                        "b": 3}, unk_token="<pad>"))
  t.pre_tokenizer = hf.pre_tokenizers.Whitespace()
  t.add_special_tokens(["<pad>", "<|endoftext|>"])
  t.save(str(tmp_path / "eos_only.json"))
  corpus, _ = sp_model
  sp_path = tokenizers.train_sentencepiece([str(corpus)], str(tmp_path / "nobos"),
                                           vocab_size=340, bos_id=-1)
  for tok, text in ((tokenizers.HFTokenizer(str(tmp_path / "eos_only.json")), "a b"),
                    (SentencePieceTokenizer(sp_path), "alpha beta")):
    assert (tok.doc_start_id, tok.eos_at_end) == (tok.eos_id, False), tok
    ids = tok.encode(text)
    assert len(ids)
    np.testing.assert_array_equal(tok.encode_document(text), [tok.eos_id, *ids])
    np.testing.assert_array_equal(tok.encode_prompt(text), [tok.eos_id, *ids])
