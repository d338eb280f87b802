"""Train state, step, loop, optimiser, checkpointing, metrics and CLI."""
