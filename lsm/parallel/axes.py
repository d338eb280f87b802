"""Logical axis names. Layers annotate parameters and activations with these
constants, never with string literals; rules in ``parallel/rules.py`` map them to
mesh axes."""

BATCH = "batch"
SEQ = "seq"
HEADS = "heads"
EMBED = "embed"
MLP = "mlp"
VOCAB = "vocab"
STATE_K = "state_k"
STATE_V = "state_v"
