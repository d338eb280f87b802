"""After training: evaluation (``lsm-eval``: loss and perplexity at any length,
per-position loss, synthetic-task accuracy at any size, lm-eval-harness tasks),
sampling (``lsm-generate``) and run comparison plots (``lsm-plot``). Runs are
reopened from their workdirs through lsm.train.restore."""
