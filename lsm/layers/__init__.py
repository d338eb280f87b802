"""Flax (nnx) modules: one file per sequence mixer, plus norm, MLP and short conv.

Every mixer follows one protocol, so models can stack any of them and decode
with any of them:

  mixer = Mixer(d_model, n_heads=..., impl=..., <mixer options>, rngs=rngs)
  y, _ = mixer(x)                         # x: [B, T, D] -> y: [B, T, D]; training
  cache = mixer.init_cache(batch, max_len)  # empty-context cache (a dict of arrays)
  y, cache = mixer(x, cache)              # parallel over T from ``cache``: prefill
  y_t, cache = mixer.step(x_t, cache)     # x_t: [B, D], one token: decoding
  y, _ = mixer(x, segment_ids=ids, positions=pos)  # packed rows (see below)

``__call__`` returns the updated cache when it was given one and None
otherwise. Packed rows (lsm.data.packing): ``segment_ids`` (int [B, T]; a token
starts a document where its id differs from the previous token's) make every
mixer run each document on its own: recurrent states restart (the ops'
``segment_ids``), short convolutions read no token of an earlier document,
attention attends within the document, and RoPE takes ``positions`` (int
[B, T], restarting per document). Mixers without positions accept and ignore
them. The state in a given cache enters the row's first document. Linear mixers' caches are O(1) in the context length (recurrent state,
conv window); attention's is a KV buffer of ``max_len``. Mixers call the ops in
lsm.ops with the ``impl`` from the config and never reimplement a recurrence.
Each mixer class also has ``preset(d_model)`` (its paper's head shapes at that
width: the size presets' ``mixer_kwargs``) and ``flops_per_token(seq_len)`` (its
sequence mixing's training FLOPs beyond the projections, for MFU). Every parameter carries logical axis names (lsm.parallel.axes) as sharding
metadata; the trainer maps them to mesh axes. Parameters that stay float32 in a
low-precision step and are never weight-decayed (decay rates, step sizes, SSM
parameters, skip gains, norms, biases) are created as
``lsm.layers.precision.Float32Param`` (``sharding.param(..., float32=True)``). A mixer with an auxiliary loss
(MoM's load balancing) sows it as the ``nnx.Intermediate`` ``aux_loss`` inside
``nnx.capture``; lsm.models.lm.logits_and_aux_loss sums them for the trainer.

Feed-forward blocks are in lsm.layers.mlp: SwiGLU, and RWKV-7's channel mixing
(``RWKV7ChannelMix``), whose token shift keeps a cache (the previous input)
with the same ``init_cache`` / ``__call__(x, cache, segment_ids=)`` / ``step``
shape as a mixer's.
"""

from lsm.layers.attention import Attention
from lsm.layers.based import Based
from lsm.layers.delta_net import DeltaNet, GatedDeltaNet
from lsm.layers.delta_product import DeltaProduct
from lsm.layers.gdn2 import GDN2
from lsm.layers.gdn_attention import GDNAttention
from lsm.layers.gla import GLA
from lsm.layers.hedgehog import Hedgehog
from lsm.layers.kda import KDA
from lsm.layers.liger import LigerAttention
from lsm.layers.lightning import Lightning
from lsm.layers.lolcats import LolcatsAttention
from lsm.layers.mamba import Mamba
from lsm.layers.mamba2 import Mamba2
from lsm.layers.mom import MoM
from lsm.layers.retnet import RetNet
from lsm.layers.rwkv7 import RWKV7
from lsm.layers.ssm import LSSL, S4D

# Mixer name (as written in configs) -> class. An explicit dict, no registry.
MIXERS = {
    "gla": GLA,
    "delta_net": DeltaNet,
    "gated_delta_net": GatedDeltaNet,
    "lssl": LSSL,
    "s4d": S4D,
    "mamba": Mamba,
    # Mamba-2 (SSD): scalar decay per head, on the gla op.
    "mamba2": Mamba2,
    "attention": Attention,
    # The rest of the linear-attention family, on the gla and delta_rule ops.
    "lightning": Lightning,
    "retnet": RetNet,
    "based": Based,
    "hedgehog": Hedgehog,
    "mom": MoM,
    # Diagonal-plus-low-rank transitions, on the dplr op.
    "delta_product": DeltaProduct,
    "kda": KDA,
    "gdn2": GDN2,
    # Linearised attention: a softmax attention layer's projections (same
    # options and parameter names as "attention") with a linear mixer
    # (lsm.models.distill converts them).
    "lolcats": LolcatsAttention,
    "liger": LigerAttention,
    "gdn_attention": GDNAttention,  # mmMamba-style, on the delta_rule op
    # RWKV-7 time mixing (its channel mixing is an MLP: lsm.layers.mlp).
    "rwkv7": RWKV7,
}
