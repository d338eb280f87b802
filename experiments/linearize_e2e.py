r"""Linearisation end to end on the embedded corpus, no download (issue:
"Start from a pretrained Transformer"): a softmax-attention teacher trained by
lsm, linearised into LoLCATs (attention transfer, then LoRA), Liger (LoRA)
and an mmMamba-style Gated DeltaNet (transfer, then LoRA),
against the same students trained from scratch; every model evaluated with
lsm-eval at 1x-8x the training length, with decoding memory per token.

python experiments/linearize_e2e.py --out=runs/linearize_e2e \
  [--teacher_steps=800 --transfer_steps=200 --finetune_steps=200]

Every stage is the command a user would run (lsm-train, lsm-linearize,
lsm-eval) in a subprocess; each is printed before it runs. A stage whose
workdir already holds a finished run resumes (so the script can be rerun
after an interruption). The from-scratch students train twice: for the
teacher's steps plus both stages' (the whole budget behind a linearised
student) and for the stages' steps alone (the conversion's budget, "short").
Writes ``<out>/table.md`` and ``<out>/results.json``. ``--dry-run`` prints the
commands only.
"""

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _model_overrides(args):
  return [f"--config.model.d_model={args.d_model}",
          f"--config.model.n_layers={args.n_layers}",
          f"--config.model.n_heads={args.n_heads}",
          f"--config.data.seq_len={args.seq_len}",
          f"--config.data.batch_size={args.batch_size}",
          "--config.train.progress=False", "--config.train.log_every=50"]


def plan(args) -> list[tuple[str, list[str]]]:
  """(name, command) of every stage, in order."""
  out = pathlib.Path(args.out)
  teacher = out / "teacher"
  steps = args.teacher_steps
  total = steps + args.transfer_steps + args.finetune_steps
  common = _model_overrides(args)
  train = lambda mixer, workdir, n, lr: [  # noqa: E731
      str(BIN / "lsm-train"), f"--config={ROOT}/configs/lm.py:mixer={mixer},smoke=True",
      f"--workdir={workdir}", *common, f"--config.train.num_steps={n}",
      f"--config.train.eval_every={n}", f"--config.train.checkpoint_every={n}",
      f"--config.optim.lr={lr}", f"--config.optim.warmup_steps={max(1, n // 20)}",
      *([f"--config.model.mixer_kwargs.{mixer}.local_window={args.window}"]
        if mixer in ("lolcats", "liger") else [])]
  lin = lambda arg, workdir, n: [  # noqa: E731
      str(BIN / "lsm-linearize"),
      f"--config={ROOT}/configs/linearize.py:teacher={teacher},local_window="
      f"{args.window},seq_len={args.seq_len},batch_size={args.batch_size},"
      f"steps={n},{arg}",
      f"--workdir={workdir}", "--config.train.progress=False",
      "--config.train.log_every=50"]
  stages = [
      ("teacher", train("attention", teacher, steps, args.lr)),
      ("lolcats_transfer", lin("stage=transfer", out / "lolcats_1",
                               args.transfer_steps)),
      ("lolcats_finetune", lin(f"stage=finetune,init={out / 'lolcats_1'}",
                               out / "lolcats_2", args.finetune_steps)),
      ("liger_finetune", lin("student=liger,stage=finetune", out / "liger_2",
                             args.transfer_steps + args.finetune_steps)),
      ("gdn_transfer", lin("student=gdn_attention,stage=transfer", out / "gdn_1",
                           args.transfer_steps)),
      ("gdn_finetune", lin(f"student=gdn_attention,stage=finetune,"
                           f"init={out / 'gdn_1'}", out / "gdn_2",
                           args.finetune_steps)),
      ("lolcats_scratch", train("lolcats", out / "lolcats_scratch", total, args.lr)),
      ("liger_scratch", train("liger", out / "liger_scratch", total, args.lr)),
      ("gdn_scratch", train("gdn_attention", out / "gdn_scratch", total, args.lr)),
  ]
  # The same students from scratch for the conversion's steps alone.
  convert = args.transfer_steps + args.finetune_steps
  stages += [(f"{m}_scratch_short", train(m, out / f"{m}_scratch_short", convert,
                                           args.lr))
             for m in ("lolcats", "liger", "gdn_attention")]
  lengths = ",".join(str(args.seq_len * k) for k in (1, 2, 4, 8))
  evals = {"teacher": teacher, "lolcats (after stage 1)": out / "lolcats_1",
           "lolcats (after stage 2)": out / "lolcats_2" / "merged",
           "liger (LoRA)": out / "liger_2" / "merged",
           "gdn (after stage 1)": out / "gdn_1",
           "gdn (after stage 2)": out / "gdn_2" / "merged",
           "lolcats from scratch": out / "lolcats_scratch",
           "liger from scratch": out / "liger_scratch",
           "gdn from scratch": out / "gdn_scratch",
           "lolcats from scratch short": out / "lolcats_scratch_short",
           "liger from scratch short": out / "liger_scratch_short",
           "gdn from scratch short": out / "gdn_attention_scratch_short"}
  for name, workdir in evals.items():
    stages.append((f"eval: {name}", [
        str(BIN / "lsm-eval"), f"--workdir={workdir}", f"--lengths={lengths}",
        f"--eval_tokens={args.eval_tokens}", "--progress=False",
        f"--out={out / 'eval' / name.replace(' ', '_').replace('(', '').replace(')', '')}"]))
  return stages


def table(args) -> str:
  out = pathlib.Path(args.out)
  rows, lengths = [], [args.seq_len * k for k in (1, 2, 4, 8)]
  results = {}
  for d in sorted((out / "eval").iterdir()):
    report = json.loads((d / "eval.json").read_text())
    results[d.name] = report
  order = ["teacher", "lolcats_after_stage_1", "lolcats_after_stage_2",
           "liger_LoRA", "gdn_after_stage_1", "gdn_after_stage_2",
           "lolcats_from_scratch", "liger_from_scratch", "gdn_from_scratch",
           "lolcats_from_scratch_short", "liger_from_scratch_short",
           "gdn_from_scratch_short"]
  head = ("| model | " + " | ".join(f"loss @{n}" for n in lengths)
          + " | cache bytes / token | cache bytes @1024 | decode tok/s |")
  rows = [head, "|" + "---|" * (len(lengths) + 4)]
  for name in order:
    r = results.get(name)
    if r is None:
      continue
    d = r["decode"]
    rows.append(f"| {name.replace('_', ' ')} | " + " | ".join(
        f"{r['results'][str(n)]['loss']:.4f}" for n in lengths)
        + f" | {d['cache_bytes_per_token']:,.0f} | {d['cache_bytes_at_context']:,}"
        f" | {d.get('decode_tokens_per_s', 0):.1f} |")
  (out / "results.json").write_text(json.dumps(results, indent=2))
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/linearize_e2e")
  parser.add_argument("--teacher_steps", type=int, default=800)
  parser.add_argument("--transfer_steps", type=int, default=200)
  parser.add_argument("--finetune_steps", type=int, default=200)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--n_layers", type=int, default=4)
  parser.add_argument("--n_heads", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--window", type=int, default=16,
                      help="the students' softmax window")
  parser.add_argument("--lr", type=float, default=3e-3,
                      help="teacher and from-scratch peak rate")
  parser.add_argument("--eval_tokens", type=int, default=16384)
  parser.add_argument("--dry-run", action="store_true")
  args = parser.parse_args()
  for name, cmd in plan(args):
    print(f"# {name}\n{' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    if args.dry_run:
      continue
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
      sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    tail = [l for l in proc.stdout.splitlines() if l.strip()][-3:]
    print("\n".join(tail), f"\n({time.time() - start:.0f} s)", flush=True)
  if not args.dry_run:
    text = table(args)
    (pathlib.Path(args.out) / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
  main()
