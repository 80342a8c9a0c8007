"""The few lines `python main.py` ends with: per type, cooperation over the last 10% of iterations across runs, and how
many runs ended in each mode (analysis/modes.py), then the command that renders the figures.

    cooperation over the last 10% of iterations (3,000 of 30,000), 20 runs
    type   mean   [min, max]      runs: defect / mixed / cooperate
    UT     0.62   [0.05, 0.97]          6 / 2 / 12
    ...
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import polars as pl

from analysis.modes import FINAL_FRACTION, MODES, cooperation_modes, final_cooperation, final_window_start, type_order

if TYPE_CHECKING:
    from simulator.config import RunConfig

log = logging.getLogger("moralsim")


def summary_table(lf: pl.LazyFrame, num_iterations: int, population: str) -> pl.DataFrame:
    """Per type: mean, min and max over runs of its final cooperation, and the run count of each mode."""
    final = final_cooperation(lf, num_iterations)
    stats = final.group_by("type").agg(mean=pl.col("cooperation").mean(), min=pl.col("cooperation").min(),
                                       max=pl.col("cooperation").max())
    table = cooperation_modes(final).join(stats, on="type").collect()
    order = {t: i for i, t in enumerate(type_order(population))}
    return table.sort(pl.col("type").replace_strict(order, default=len(order), return_dtype=pl.Int64))


def format_summary(table: pl.DataFrame, num_iterations: int) -> str:
    window = num_iterations - final_window_start(num_iterations, FINAL_FRACTION)
    runs = int(table["n_runs"].max() or 0) if table.height else 0  # type: ignore[arg-type]
    lines = [f"cooperation over the last 10% of iterations ({window:,} of {num_iterations:,}), {runs} runs",
             f"{'type':<8}{'mean':>6}  {'[min, max]':<14}  runs: {' / '.join(MODES)}"]
    for row in table.iter_rows(named=True):
        modes = " / ".join(str(row[m]) for m in MODES)
        lines.append(f"{row['type']:<8}{row['mean']:>6.2f}  [{row['min']:.2f}, {row['max']:.2f}]    {modes}")
    return "\n".join(lines)


def print_summary(cfg: RunConfig) -> None:
    """Log the summary of cfg's dataset (read through a local copy when it is on an object store)."""
    from analysis.dataset import local_copy, open_dataset

    lf = open_dataset(local_copy(cfg.dataset_location)).scan()
    log.info(format_summary(summary_table(lf, cfg.num_iterations, cfg.destination_folder), cfg.num_iterations))
