"""Outcomes that split across runs. In some populations a type cooperates in some runs and defects in the others (in
`1xS_1xUT_1xaUT_1xDE_1xmDE`, UT cooperates in about half of the runs), so a mean with an interval across runs
describes no run at all. These metrics keep one value per run:

- `final_cooperation`: each run's cooperation rate per type (or per agent) over the last part of the run
  (default the last 10% of iterations), pooled over that type's agents and both roles;
- `cooperation_modes`: how many runs end in each mode, with the thresholds below;
- `plot_final_cooperation`: a strip plot of those per-run values, one panel per population, types on x.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.metrics import agent_games
from simulator.errors import MoralsimError
from simulator.population import parse_population

FINAL_FRACTION = 0.1  # the last 10% of iterations: 3,000 of 30,000, long after the rates settle in the AIES runs
DEFECT_BELOW = 0.2  # a run whose final cooperation rate is < 0.2 "defects" ...
COOPERATE_ABOVE = 0.8  # ... > 0.8 "cooperates", and 0.2 to 0.8 (both included) is "mixed"
MODES = ("defect", "mixed", "cooperate")
_MODE_COLOURS = {"defect": "#d62728", "mixed": "#7f7f7f", "cooperate": "#2ca02c"}


def final_window_start(num_iterations: int, fraction: float = FINAL_FRACTION) -> int:
    """First iteration of the final window: the last ceil(fraction x num_iterations) iterations, at least one."""
    if not isinstance(num_iterations, int) or num_iterations < 1:
        raise MoralsimError(f"num_iterations must be a positive integer, got {num_iterations!r}")
    if not 0 < fraction <= 1:
        raise MoralsimError(f"the final fraction must be in (0, 1], got {fraction!r}")
    return num_iterations - max(1, math.ceil(fraction * num_iterations))


def final_cooperation(
    lf: pl.LazyFrame, num_iterations: int, fraction: float = FINAL_FRACTION, by: Sequence[str] = ("type",)
) -> pl.LazyFrame:
    """Each run's cooperation rate over the final window (`final_window_start`), per type (by=("type",)) or per agent
    (by=("agent", "type")): the share of C among every move the type's agents made in the window, as selector and as
    selected. Columns: run, *by, cooperation (Float64), moves. Sorted by run, then by."""
    if tuple(by) not in (("type",), ("agent", "type")):
        raise MoralsimError(f"final_cooperation groups by ('type',) or ('agent', 'type'), got {tuple(by)!r}")
    start = final_window_start(num_iterations, fraction)
    return (
        agent_games(lf.filter(pl.col("iteration") >= start))
        .group_by("run", *by)
        .agg(cooperation=(pl.col("action") == 0).mean().cast(pl.Float64), moves=pl.len().cast(pl.Int64))
        .sort("run", *by)
    )


def mode_of(value: pl.Expr) -> pl.Expr:
    """The mode name of a final cooperation rate: defect (< 0.2), mixed (0.2 to 0.8), cooperate (> 0.8)."""
    return (
        pl.when(value < DEFECT_BELOW).then(pl.lit("defect"))
        .when(value > COOPERATE_ABOVE).then(pl.lit("cooperate"))
        .otherwise(pl.lit("mixed"))
    )


def cooperation_modes(final: pl.LazyFrame, keys: Sequence[str] = ("type",)) -> pl.LazyFrame:
    """How many runs end in each mode, per `keys` (e.g. ("population", "type")), from a `final_cooperation` frame:
    defect (final cooperation < 0.2), mixed (0.2 to 0.8), cooperate (> 0.8), the total n_runs, and the median of the
    per-run rates. Columns: *keys, defect, mixed, cooperate, n_runs (UInt32), median (Float64)."""
    mode = mode_of(pl.col("cooperation"))
    return (
        final.group_by(list(keys))
        .agg(
            *[(mode == m).sum().cast(pl.UInt32).alias(m) for m in MODES],
            n_runs=pl.len().cast(pl.UInt32),
            median=pl.col("cooperation").median().cast(pl.Float64),
        )
        .sort(list(keys))
    )


def type_order(population: str) -> tuple[str, ...]:
    """The types in the order the population string names them; () for a folder name that is not a population."""
    try:
        codes = parse_population(population).codes
    except MoralsimError:
        return ()
    return tuple(dict.fromkeys(codes))


def plot_final_cooperation(
    frames: Mapping[str, pl.DataFrame], title: str = "", order: Sequence[str] = (), seed: int = 0
) -> Figure:
    """Strip plot of each run's final cooperation per type, one panel per population (a `final_cooperation` frame
    each, keyed by its label), types on x in `order` (then any others, sorted). Points are jittered sideways and
    coloured by mode; a bar marks the median; dashed lines mark the mode thresholds."""
    rng = np.random.default_rng(seed)  # fixed jitter: the same data give the same picture
    n = len(frames)
    cols = 1 if n == 1 else 3
    fig = Figure(figsize=(7.5 if n == 1 else 5.2 * cols, 3.6 * math.ceil(n / cols) + 0.4), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, (label, df) in zip(axes, frames.items(), strict=False):
        present = set(df["type"].unique().to_list())
        types = [t for t in order if t in present] + sorted(present - set(order))
        for x, typ in enumerate(types):
            values = df.filter(pl.col("type") == typ)["cooperation"].to_numpy()
            modes = pl.Series(values).to_frame("v").select(mode_of(pl.col("v"))).to_series().to_list()
            jitter = rng.uniform(-0.28, 0.28, len(values))
            ax.scatter(x + jitter, values, s=14, alpha=0.75, c=[_MODE_COLOURS[m] for m in modes], linewidths=0)
            if len(values):
                ax.hlines(float(np.median(values)), x - 0.35, x + 0.35, color="black", linewidth=1.2)
        for y in (DEFECT_BELOW, COOPERATE_ABOVE):
            ax.axhline(y, color="#999999", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(types)), types, rotation=45 if len(types) > 6 else 0)
        ax.set_ylim(-0.04, 1.04)
        ax.set_ylabel("final cooperation rate")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(label, fontsize=10)
    handles = [
        Line2D([], [], marker="o", linestyle="", color=c, label=f"{m} ({_mode_rule(m)})")
        for m, c in _MODE_COLOURS.items()
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(title or f"Cooperation per run and type, last {FINAL_FRACTION:.0%} of iterations "
                 "(one point per run; bar: median)")
    return fig


def _mode_rule(mode: str) -> str:
    return {"defect": f"< {DEFECT_BELOW}", "mixed": f"{DEFECT_BELOW}-{COOPERATE_ABOVE}",
            "cooperate": f"> {COOPERATE_ABOVE}"}[mode]
