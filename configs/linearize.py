r"""Linearise a pretrained softmax-attention model (lsm.train.linearize):
LoLCATs (attention transfer, then LoRA), Liger (LoRA only) or an mmMamba-style
Gated DeltaNet (transfer of its gates, then LoRA).

lsm-linearize --config=configs/linearize.py:teacher=runs/teacher,stage=transfer \
  --workdir=runs/lolcats-1
lsm-linearize --config=configs/linearize.py:teacher=runs/teacher,stage=finetune,init=runs/lolcats-1 \
  --workdir=runs/lolcats-2

The teacher is a Hugging Face checkpoint directory (Llama, Mistral, Qwen2,
Qwen3; its tokenizer.json is used) or an lsm run directory (its data section is
used). The model section is derived from the teacher; the student is written
to the workdir like any run, and a LoRA finetune also writes
``<workdir>/merged``, the student with its adapters merged.

Args (``:arg``): teacher, student (lolcats, liger, gdn_attention), stage (transfer,
finetune), init (a transfer run's workdir, for finetune), keep_every (0: convert
every attention layer; n: keep every n-th), local_window (the student's softmax
window), feature_dim (lolcats' feature map; 0: the head dim), lora_rank (0:
full fine-tuning), lora_alpha, kl_weight, data (embedded, tfds:NAME,
text:GLOB; default: the teacher run's data), seq_len, batch_size, steps, lr.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(
      arg, teacher="", student="lolcats", stage="transfer", init="",
      keep_every=0, local_window=64, feature_dim=0, lora_rank=8, lora_alpha=16.0,
      kl_weight=0.0, data="embedded", seq_len=256, batch_size=8, steps=200,
      lr=0.0)
  c = common.lm_run("mixer=attention,smoke=True", data=arg.data,
                    seq_len=arg.seq_len, batch_size=arg.batch_size,
                    steps=arg.steps)
  c.model = {}  # derived from the teacher (lsm.train.linearize.student_config)
  c.data.update(common.teacher_data(arg.teacher))
  # The windowed students' softmax window; lolcats' feature map width.
  options = ({"local_window": arg.local_window}
             if arg.student in ("lolcats", "liger") else {})
  if arg.student == "lolcats" and arg.feature_dim:
    options["feature_dim"] = arg.feature_dim
  c.linearize = common.section(
      "linearize", teacher=arg.teacher, student=arg.student, stage=arg.stage,
      keep_every=arg.keep_every, student_options=options,
      lora={"rank": arg.lora_rank or 1, "alpha": arg.lora_alpha},
      kl_weight=arg.kl_weight)
  if arg.init:
    c.linearize.init = arg.init
  if not arg.lora_rank:
    c.linearize.lora = None
  # Attention transfer trains a few small maps: LoLCATs' 1e-2. Fine-tuning
  # moves pretrained weights: 1e-4 for adapters as LoLCATs, less for all.
  lr = arg.lr or (1e-2 if arg.stage == "transfer" else
                  (1e-3 if arg.lora_rank else 1e-4))
  c.optim.update(lr=lr, warmup_steps=max(1, arg.steps // 20), weight_decay=0.0)
  c.train.update(eval_every=arg.steps, checkpoint_every=arg.steps, eval_steps=4)
  return c
