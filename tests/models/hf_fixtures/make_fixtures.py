"""Regenerates the tiny Hugging Face checkpoints that tests/models/test_hf.py
imports, with transformers' own float32 logits. Needs torch, transformers,
safetensors and tokenizers (not lsm's dependencies; not run in CI):

  python3 -m venv /tmp/hfgen
  /tmp/hfgen/bin/pip install torch transformers safetensors tokenizers
  /tmp/hfgen/bin/python tests/models/hf_fixtures/make_fixtures.py

Nothing comes from a model hub: each model is built from a config with random
weights (seeded), and the tokenizer is a byte-level BPE trained here on a fixed
text, with its special tokens at the end of the vocabulary (as Llama's and
Qwen's are) and no padding token.

``--check-export DIR FAMILY`` instead loads a checkpoint lsm wrote (DIR) with
transformers and prints the largest logit difference to FAMILY's fixture
(checks that lsm's export is a checkpoint transformers reads as written).
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = ("The state of a linear recurrent network is a matrix that every token "
        "updates with a rank-one write and reads with a query. Gated variants "
        "decay it; delta rules erase before they write. ") * 8
VOCAB = 272  # the model's; the tokenizer holds fewer ids, as real ones may
SEQ = 12

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
FAMILIES = {
    # GQA, untied head, biases on all four projections, Llama 3.1 RoPE scaling
    # (original length 16: all three of its frequency bands occur at head_dim 8).
    "llama": (transformers.LlamaConfig, dict(
        attention_bias=True, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    # q/k/v biases, tied head, stored in bfloat16, in two shards.
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    # q/k norms, head_dim 16 != hidden / heads, YaRN scaling.
    "qwen3": (transformers.Qwen3Config, dict(
        head_dim=16, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="yarn", factor=4.0,
                          original_max_position_embeddings=16))),
    # a sliding window shorter than the inputs.
    "mistral": (transformers.MistralConfig, dict(sliding_window=5,
                                                 tie_word_embeddings=False)),
}


def make_tokenizer(path):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=262, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator([TEXT], trainer)
  tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
  tok.save(os.path.join(path, "tokenizer.json"))
  return tok


def make(family, tok):
  cls, extra = FAMILIES[family]
  torch.manual_seed(sorted(FAMILIES).index(family))
  config = cls(**COMMON, **extra, bos_token_id=tok.token_to_id("<|begin_of_text|>"),
               eos_token_id=tok.token_to_id("<|end_of_text|>"))
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager").float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  out = os.path.join(HERE, family)
  os.makedirs(out, exist_ok=True)
  if family == "qwen2":  # stored bf16, in two shards
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
  else:
    model.save_pretrained(out)
  # The reference: transformers' float32 forward of the checkpoint as stored
  # (for qwen2 the bf16-rounded weights; its RoPE buffers rebuilt in float32).
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager", dtype=torch.float32).eval()
  tok.save(os.path.join(out, "tokenizer.json"))
  rng = np.random.default_rng(0)
  ids = np.concatenate([
      np.asarray(tok.encode(TEXT[:80]).ids[:SEQ])[None],
      rng.integers(0, VOCAB, (1, SEQ))]).astype(np.int64)
  with torch.no_grad():
    logits = model(torch.from_numpy(ids)).logits.float().numpy()
  np.savez(os.path.join(out, "reference.npz"), ids=ids.astype(np.int32),
           logits=logits)
  print(family, sorted(os.listdir(out)))


def check_export(path, family):
  ref = np.load(os.path.join(HERE, family, "reference.npz"))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(ref["ids"].astype(np.int64))).logits.numpy()
  diff = float(np.max(np.abs(logits - ref["logits"])))
  print(json.dumps({"family": family, "model": type(model).__name__,
                    "max_abs_logit_diff": diff}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check-export", nargs=2, metavar=("DIR", "FAMILY"))
  args = parser.parse_args()
  if args.check_export:
    check_export(*args.check_export)
    return
  tmp = os.path.join(HERE, ".tokenizer")
  os.makedirs(tmp, exist_ok=True)
  tok = make_tokenizer(tmp)
  for family in FAMILIES:
    make(family, tok)
  os.remove(os.path.join(tmp, "tokenizer.json"))
  os.rmdir(tmp)


if __name__ == "__main__":
  main()
