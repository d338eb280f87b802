"""Flax modules: one file per mixer, plus norm, MLP and short convolution."""
