"""Timing and table printing shared by the benchmark scripts in experiments/."""

import statistics
import time

import jax


def n_repeats(repeats: int, warm_s: float, budget_s: float, lo: int, hi: int) -> int:
  """``repeats`` if positive, else the number of calls that fit ``budget_s``,
  clipped to [lo, hi]."""
  if repeats > 0:
    return repeats
  return int(min(hi, max(lo, budget_s / max(warm_s, 1e-6))))


def median_ms(fn, repeats: int, budget_s: float, lo: int, hi: int,
              prepare=None) -> float:
  """Median wall time in ms of ``fn(*prepare())`` after one warm-up call.

  Args:
    fn: a compiled executable.
    repeats: timed calls; 0 picks them from the warm-up time (see n_repeats).
    budget_s, lo, hi: the n_repeats budget and clip range.
    prepare: returns the arguments of one call; it runs (and its outputs are
      made ready) before the clock starts. Needed when ``fn`` donates inputs.

  Returns:
    The median of the timed calls, in milliseconds.
  """
  def once():
    args = jax.block_until_ready(prepare())
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start

  warm = once()
  times = [once() for _ in range(n_repeats(repeats, warm, budget_s, lo, hi))]
  return 1e3 * statistics.median(times)


def format_table(columns, rows: list[list[str]], markdown: bool,
                 left: int = 1) -> str:
  """Rows as an aligned plain-text or Markdown table; the first ``left``
  columns are left-aligned in Markdown, the rest right-aligned."""
  if markdown:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(columns) - left)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
  widths = [max(len(col), *(len(row[i]) for row in rows))
            for i, col in enumerate(columns)]
  fmt = lambda cells: "  ".join(
      cell.ljust(w) if i < 1 else cell.rjust(w)
      for i, (cell, w) in enumerate(zip(cells, widths)))
  return "\n".join([fmt(columns), fmt(["-" * w for w in widths])]
                   + [fmt(row) for row in rows])
