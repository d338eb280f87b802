r"""lm-eval-harness on lsm checkpoints.

lsm-eval --workdir=RUN --harness_tasks=lambada_openai,hellaswag,piqa
python -m lsm.eval.harness --model lsm --model_args workdir=RUN --tasks piqa

(``pip install -e '.[eval]'``). lm_eval 0.4 finds models only in its own
registry, which has no plugin hook, so the bare ``lm_eval`` command cannot see
lsm; ``python -m lsm.eval.harness`` is lm_eval's command line with the ``lsm``
model registered.

``Scorer`` holds the three request types of lm_eval's ``LM`` interface over a
restored run, and needs no lm_eval itself: ``loglikelihood`` (log P of a
continuation given a context, and whether greedy decoding would produce it),
``loglikelihood_rolling`` (log P of a whole text, in windows of ``max_length``
tokens, each token predicted once with as much context as fits) and
``generate_until`` (greedy, cut at the first stop string). Every text starts
a document as the run's training documents do: after the tokenizer's
document-start token (``Tokenizer.encode_prompt``: BOS, or EOS where there is
no BOS). ``LsmLM`` is the ``LM`` subclass lm_eval calls, registered as ``lsm``
when lm_eval imports.
"""

import functools
import math

from lsm.train import cli


def require_lm_eval(what: str):
  try:
    import lm_eval  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    raise cli.UsageError(f"{what}: needs lm_eval, which is not installed; "
                         "expected pip install -e '.[eval]'") from None


def _padded_length(n: int) -> int:
  """Rows are padded on the right to a few lengths, so jit compiles a few
  shapes (padding after the scored tokens cannot change them: causal)."""
  return max(16, 1 << math.ceil(math.log2(max(n, 1))))


@functools.lru_cache(maxsize=4)
def _token_logprobs(graphdef):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  @jax.jit
  def fn(state, inputs, targets):
    logits = nnx.merge(graphdef, state)(inputs)[0].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets
  return fn


class Scorer:
  """Log-likelihoods and greedy continuations of text under a restored run.

  Args:
    run: an lsm.train.restore.Run of a text run.
    max_length: tokens of context per row (default: 4x the training length;
      linear mixers carry no cache, so longer rows cost only time).
    batch_size: rows per forward pass.
  """

  def __init__(self, run, *, max_length: int | None = None, batch_size: int = 16):
    if run.tokenizer is None:
      raise cli.UsageError("lm-eval: the run trains a synthetic task; expected "
                           "a text run with a tokenizer")
    self.run = run
    self.tokenizer = run.tokenizer
    self.max_length = int(max_length or 4 * run.config.data.seq_len)
    self.batch_size = int(batch_size)
    import flax.nnx as nnx
    self._graphdef, self._state = nnx.split(run.model)

  def _score_rows(self, rows):
    """rows: (tokens, first scored target index) -> [(sum logp, all greedy)]."""
    import numpy as np
    fn = _token_logprobs(self._graphdef)
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      width = _padded_length(max(len(rows[i][0]) - 1 for i in chunk))
      inputs = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      for r, i in enumerate(chunk):
        toks = rows[i][0]
        inputs[r, :len(toks) - 1] = toks[:-1]
        targets[r, :len(toks) - 1] = toks[1:]
      logp, greedy = map(np.asarray, fn(self._state, inputs, targets))
      for r, i in enumerate(chunk):
        toks, first = rows[i]
        sl = slice(first - 1, len(toks) - 1)  # targets[t] predicts toks[t + 1]
        out[i] = (float(logp[r, sl].astype(np.float64).sum()),
                  bool(greedy[r, sl].all()))
    return out

  def _encode_pair(self, context: str, continuation: str):
    # Trailing spaces of the context belong to the continuation (as lm_eval's
    # own models do), so a BPE tokenizer sees " word" whole.
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = self.tokenizer
    whole = [int(t) for t in tok.encode(context + continuation)]
    ctx = [int(t) for t in tok.encode(context)]
    if whole[:len(ctx)] != ctx:  # a merge across the boundary
      return ctx, [int(t) for t in tok.encode(continuation)]
    return ctx, whole[len(ctx):]

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """requests: (context, continuation) pairs -> (log P(continuation |
    context), whether greedy decoding gives the continuation)."""
    rows = []
    for context, continuation in requests:
      ctx, cont = self._encode_pair(context, continuation)
      if not cont:
        raise ValueError(f"loglikelihood: continuation {continuation!r} has no "
                         "tokens; expected a non-empty continuation")
      toks = [self.tokenizer.doc_start_id, *ctx, *cont][-(self.max_length + 1):]
      rows.append((toks, len(toks) - len(cont)))
    return self._score_rows(rows)

  def loglikelihood_rolling(self, requests) -> list[float]:
    """requests: texts -> log P(text | document start), windows of max_length
    tokens."""
    rows, owner = [], []
    for n, text in enumerate(requests):
      text = text[0] if isinstance(text, tuple) else text
      toks = [int(t) for t in self.tokenizer.encode_prompt(text)]
      # Predict toks[s:e] from the up-to-max_length tokens before each.
      for s in range(1, len(toks), self.max_length):
        e = min(s + self.max_length, len(toks))
        a = max(0, e - 1 - self.max_length)
        rows.append((toks[a:e], s - a))
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, self._score_rows(rows)):
      totals[n] += logp
    return totals

  def generate_until(self, requests) -> list[str]:
    """requests: (context, {"until": [...], "max_gen_toks": n}) -> greedy
    continuations, cut before the first stop string."""
    import numpy as np
    from lsm.models.decoding import generate
    out = []
    for context, kwargs in requests:
      kwargs = dict(kwargs or {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      n = int(kwargs.get("max_gen_toks", 256))
      ids = [int(t) for t in self.tokenizer.encode_prompt(context)]
      ids = ids[-self.max_length:]
      tokens = np.asarray(generate(self.run.model, np.asarray([ids], np.int32),
                                   max_new_tokens=n))[0, len(ids):]
      if self.tokenizer.eos_id in tokens:
        tokens = tokens[:list(tokens).index(self.tokenizer.eos_id)]
      text = self.tokenizer.decode(tokens)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out


def _make_adapter():
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model

  class LsmLM(LM):
    """lm_eval's LM over an lsm run: ``--model lsm --model_args
    workdir=RUN[,step=N,max_length=T,batch_size=B]``."""

    def __init__(self, workdir=None, step=None, max_length=None, batch_size=16,
                 run=None, **unused):
      super().__init__()
      del unused  # device, max_batch_size: lsm runs on the devices JAX sees
      if run is None:
        from lsm.train import restore
        run = restore.open_run(workdir, None if step in (None, "") else int(step))
      bs = 16 if batch_size in (None, "auto") else int(
          str(batch_size).split(":")[0])
      self.scorer = Scorer(run, max_length=max_length and int(max_length),
                           batch_size=bs)

    def loglikelihood(self, requests):
      return self.scorer.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests):
      return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests):
      return self.scorer.generate_until([r.args for r in requests])

  from lm_eval.api import registry
  if "lsm" not in getattr(registry, "model_registry", {}):
    register_model("lsm")(LsmLM)
  return LsmLM


@functools.lru_cache(maxsize=1)
def adapter():
  """The registered ``LsmLM`` class (imports lm_eval)."""
  require_lm_eval("lm-eval adapter")
  return _make_adapter()


def run_tasks(run, tasks, *, include_path=None, limit=None, batch_size=16) -> dict:
  """lm_eval's ``simple_evaluate`` of ``tasks`` on ``run``: {task: metrics}."""
  require_lm_eval("--harness_tasks")
  import lm_eval
  from lm_eval.tasks import TaskManager
  model = adapter()(run=run, batch_size=batch_size)
  manager = TaskManager(include_path=include_path) if include_path else None
  try:
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), limit=limit,
                                      task_manager=manager, bootstrap_iters=0)
  except (KeyError, ValueError) as e:
    raise cli.UsageError(f"--harness_tasks={','.join(tasks)}: "
                         f"{cli.one_line(e)}") from None
  return {name: {k: v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
          for name, metrics in results["results"].items()}


def main():
  """lm_eval's command line with the ``lsm`` model registered."""
  adapter()
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == "__main__":
  main()
