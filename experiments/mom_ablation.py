r"""MoM on MQAR beside its own shared memory (issue 27, item 7): the recall
grid's MoM cell (configs/recall.py, experiments/recall.py's setup) with MoM
options the config has no argument for, one output directory per variant.

PYTHONPATH=. .venv/bin/python experiments/mom_ablation.py \
  --variants shared_only top2 --lrs 3e-3 --steps 2000 --batch 64 \
  --extra "size=64,num_pairs=8,vocab=512,n_heads=2" --out runs/mom27

Variants (``mixer_kwargs["mom"]``):
  top2: the defaults (4 gated-delta memories, top 2, shared memory);
  top4: every token routed to every memory (dense routing);
  shared_only: top 2 with the routed memories' reads zeroed
    (``routed_reads=False``): the layer's output is its shared memory's, a
    Gated DeltaNet (tests/layers/test_mom.py), so it must train like
    ``experiments/recall.py --models gated_delta_net`` at the same settings;
  shared_only_paired: shared_only started from the very parameters (every
    language-model parameter, the shared memory's included) and data order
    of that Gated DeltaNet run (``PairedMoM``; data.shards=1 and no row
    window, as that run had), so the two differ only by the aux loss and
    rounding.

A finished run is read back, not retrained (experiments/synthetic_grid.py).
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from configs import recall  # noqa: E402
from experiments import synthetic_grid  # noqa: E402
from lsm import layers  # noqa: E402
from lsm.layers.delta_net import GatedDeltaNet  # noqa: E402
from lsm.layers.mom import MoM  # noqa: E402

VARIANTS = {"top2": {}, "top4": {"top_k": 4},
            "shared_only": {"routed_reads": False},
            "shared_only_paired": {"routed_reads": False}}


class PairedMoM(MoM):
  """shared_only_paired: a MoM whose shared memory starts as the Gated DeltaNet
  that ``--models gated_delta_net`` builds at the same seed. The Gated DeltaNet
  is built first from the model's own Rngs (so every parameter of the language
  model gets the draws of the Gated DeltaNet run), the rest of the MoM from
  a separate Rngs, and the Gated DeltaNet's parameters are copied into the
  shared slot. With the same data order, training then differs from the Gated
  DeltaNet run only by the aux loss and rounding."""

  def __init__(self, d_model: int, *, n_heads: int, chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs, **kwargs):
    gdn = GatedDeltaNet(d_model, n_heads=n_heads, chunk_size=chunk_size,
                        impl=impl, rngs=rngs)
    super().__init__(d_model, n_heads=n_heads, chunk_size=chunk_size, impl=impl,
                     rngs=nnx.Rngs(params=12345), **kwargs)
    M, H, K, V = self.n_memories, n_heads, self.key_dim, self.value_dim
    k, v, h, all_ = (slice(M * K, None), slice(M * V, None), slice(M * H, None),
                     slice(None))
    pairs = [("q_proj.kernel", all_), ("k_proj.kernel", k),
             ("v_proj.kernel", v), ("b_proj.kernel", h), ("a_proj.kernel", h),
             ("A_log", h), ("dt_bias", h), ("g_proj.kernel", all_),
             ("o_proj.kernel", all_), ("norm.scale", all_)] + [
                 (f"convs.{i}.{w}", cols) for i, cols in enumerate((all_, k, v))
                 for w in ("kernel", "bias")]
    for path, cols in pairs:
      dst, src = self, gdn
      for name in path.split("."):
        dst = dst[int(name)] if name.isdigit() else getattr(dst, name)
        src = src[int(name)] if name.isdigit() else getattr(src, name)
      value = dst[...].at[..., cols].set(src[...])
      dst.set_value(value)


def get_config_for(variant: str):
  """configs/recall.py's get_config with the variant's MoM options."""

  def get_config(arg=None):
    c = recall.get_config(arg)
    c.model.mixer_kwargs["mom"] = dict(VARIANTS[variant])
    if variant == "shared_only_paired":
      # The data order of the Gated DeltaNet run it pairs with (written before
      # data.shards and the row window got their defaults).
      c.data.shards, c.data.row_shuffle_window = 1, 0
    return c

  return get_config


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                 default=["shared_only", "top2"])
  p.add_argument("--seeds", nargs="+", type=int, default=[0])
  p.add_argument("--lrs", nargs="+", type=float, default=[3e-3])
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--extra", default="size=64,num_pairs=8,vocab=512,n_heads=2",
                 help="more configs/recall.py args")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/mom27"))
  p.add_argument("--smoke", action="store_true", help="seconds-long runs")
  p.add_argument("--progress", action="store_true")
  args = p.parse_args(argv)
  for variant in args.variants:
    layers.MIXERS["mom"] = PairedMoM if variant == "shared_only_paired" else MoM
    synthetic_grid.run_grid(
        get_config_for(variant), ["mqar"], ["mom"], args.seeds, args.lrs,
        steps=args.steps, batch=args.batch, out=args.out / variant,
        smoke=args.smoke, progress=args.progress, extra=args.extra,
        labels={"mom": f"mom ({variant})"})


if __name__ == "__main__":
  main()
