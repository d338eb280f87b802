r"""``lsm-generate``: text from a run's checkpoint.

lsm-generate --workdir=runs/quickstart --prompt="def " [--max_new_tokens=200] \
  [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0] [--step=N]
lsm-generate --workdir=runs/quickstart --prompts_file=prompts.txt --format=jsonl

Each prompt is tokenised with the run's tokenizer after its document-start token
(``Tokenizer.encode_prompt``: BOS, or EOS where the tokenizer has no BOS), so it
begins a document from a fresh state exactly as every training document does,
prefilled with the parallel forward and continued one token at a time through
every mixer's O(1) ``step`` (lsm.models.decoding.generate; the decoding lives
in lsm.eval.completion). Temperature 0 is greedy. The continuation stops at the
first EOS unless ``--stop_at_eos=False``. Prompts of one token length are
decoded as one batch.
"""

import json
import sys

from absl import flags
from absl import logging as absl_logging

from lsm.eval.completion import complete
from lsm.train import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (lsm-train's "
                               "--workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text ('' starts a "
                              "document from nothing).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file of prompts, "
                                    "one per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 for greedy decoding.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely "
                              "tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP_AT_EOS = flags.DEFINE_boolean("stop_at_eos", True, "Cut the continuation "
                                    "at the first EOS.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "jsonl"], "text: prompt "
                            "and continuation; jsonl: one {prompt, completion} "
                            "object per line.")

PROG = "lsm-generate"


def check_sampling(max_new_tokens, temperature, top_k, top_p, vocab_size):
  if max_new_tokens < 1:
    raise cli.UsageError(f"--max_new_tokens={max_new_tokens}: expected an int >= 1")
  if temperature < 0:
    raise cli.UsageError(f"--temperature={temperature}: expected a number >= 0")
  if top_k is not None and not 1 <= top_k <= vocab_size:
    raise cli.UsageError(f"--top_k={top_k}: expected an int in [1, {vocab_size}]")
  if top_p is not None and not 0 < top_p <= 1:
    raise cli.UsageError(f"--top_p={top_p}: expected a number in (0, 1]")


def main(argv):
  cli.check_args(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)
  from lsm.train import restore
  workdir = restore.check_workdir(_WORKDIR.value)
  _, config = restore.read_config(workdir)
  if config.data.source == "task":
    raise cli.UsageError(f"--workdir={workdir}: trains a synthetic task (no "
                         "tokenizer); expected a text run")
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise cli.UsageError("--prompt / --prompts_file: expected exactly one of them")
  if _PROMPTS_FILE.value is not None:
    try:
      with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
      raise cli.UsageError(f"--prompts_file={_PROMPTS_FILE.value}: "
                           f"{e.strerror}; expected a text file") from None
    if not prompts:
      raise cli.UsageError(f"--prompts_file={_PROMPTS_FILE.value}: no prompts; "
                           "expected one per line")
  else:
    prompts = [_PROMPT.value]
  check_sampling(_MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                 config.model.vocab_size)
  restore.check_step(workdir, _STEP.value)
  run = restore.open_run(workdir, _STEP.value)
  texts = complete(run, prompts, max_new_tokens=_MAX_NEW.value,
                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                   top_p=_TOP_P.value, seed=_SEED.value,
                   stop_at_eos=_STOP_AT_EOS.value)
  for prompt, text in zip(prompts, texts):
    if _FORMAT.value == "jsonl":
      sys.stdout.write(json.dumps({"prompt": prompt, "completion": text}) + "\n")
    else:
      sys.stdout.write(prompt + text + "\n")
  sys.stdout.flush()


def run():
  cli.run(main, PROG)


if __name__ == "__main__":
  run()
