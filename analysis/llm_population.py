"""A population of LLM agents beside the same population of DQN agents (issue 16's figure).

    row 1   cooperation per moral type over iterations, bands = 95% t interval across runs: LLM | DQN
    row 2   who picks whom over time, LLM agents: one panel per selector type, a line per selected type
    row 3   the same for the DQN agents

    python -m analysis.llm_population results/1xUT@llm_1xaUT@llm_1xDE@llm results/1xUT@dqn_1xaUT@dqn_1xDE@dqn \
        --bin 5 --out docs/llm_population_ut_aut_de.png

Types are compared by their moral code: `UT@llm` and `UT@dqn` are both `UT`. `summary()` gives the numbers the
README states (cooperation per type and selection shares, first and last fifth of the iterations).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from analysis.metrics import cooperation_by_type, selection_matrix
from analysis.plots import band, colour_map, rate_axis, save


def _windows(lf: pl.LazyFrame, fraction: float = 0.2) -> pl.LazyFrame:
    last = lf.select(pl.col("iteration").max()).collect().item()
    cut = max(1, round((last + 1) * fraction))
    return lf.with_columns(
        window=pl.when(pl.col("iteration") < cut).then(pl.lit("first")).when(pl.col("iteration") > last - cut)
        .then(pl.lit("last")).otherwise(pl.lit(None))).filter(pl.col("window").is_not_null())


def summary(frames: Mapping[str, pl.LazyFrame], fraction: float = 0.2) -> pl.DataFrame:
    """Per population and moral type: cooperation and selection shares in the first and last `fraction` of the
    iterations (pooled over runs). Columns: population, window, type, cooperation, then picks_<type> per type."""
    out = []
    for name, lf in frames.items():
        w = _windows(lf, fraction)
        coop = pl.concat([
            w.select("window", pl.col(f"{r}_type").cast(pl.String).alias("type"), (pl.col(f"{r}_action") == 0)
                     .alias("c")) for r in ("selector", "selected")]).group_by("window", "type").agg(
            cooperation=pl.col("c").mean())
        picks = (w.group_by("window", pl.col("selector_type").cast(pl.String).alias("type"),
                            pl.col("selected_type").cast(pl.String).alias("picked")).agg(n=pl.len())
                 .with_columns(share=pl.col("n") / pl.col("n").sum().over("window", "type"))
                 .collect().pivot("picked", index=["window", "type"], values="share"))
        picks = picks.rename({c: f"picks_{c}" for c in picks.columns if c not in ("window", "type")})
        out.append(coop.collect().join(picks, on=["window", "type"], how="left")
                   .with_columns(population=pl.lit(name)))
    df = pl.concat(out, how="diagonal")
    return df.select("population", "window", "type", *[c for c in df.columns if c not in
                                                       ("population", "window", "type")]).sort(
        "population", "window", "type")


def plot_population_pair(frames: Mapping[str, pl.LazyFrame], bin_size: int = 5, title: str = "") -> Figure:
    """The three-row figure of the module docstring; `frames` maps a label (e.g. "LLM", "DQN") to its records."""
    labels = list(frames)
    coop = {k: cooperation_by_type(lf, bin_size).collect() for k, lf in frames.items()}
    sel = {k: selection_matrix(lf, bin_size).collect() for k, lf in frames.items()}
    types = sorted({t for df in coop.values() for t in df["type"].to_list()})
    colours = colour_map(types)
    cols = max(len(labels), len(types))
    fig = Figure(figsize=(4.2 * cols, 3.0 * (1 + len(labels))), layout="constrained")
    grid = fig.subplots(1 + len(labels), cols, squeeze=False)
    for j, label in enumerate(labels):
        ax = grid[0][j]
        for typ in types:
            part = coop[label].filter(pl.col("type") == typ)
            if part.height:
                band(ax, part, typ, colours[typ])
        rate_axis(ax, "cooperation rate")
        ax.set_xlabel(f"iteration (bins of {bin_size})")
        n_runs = coop[label].select(pl.col("n_runs").max()).item()
        ax.set_title(f"{label}: cooperation per type ({n_runs} runs)")
        ax.legend(fontsize=7, title="type")
    for j in range(len(labels), cols):
        grid[0][j].set_visible(False)
    for i, label in enumerate(labels, start=1):
        for j in range(cols):
            ax = grid[i][j]
            if j >= len(types):
                ax.set_visible(False)
                continue
            part = sel[label].filter(pl.col("selector_type") == types[j])
            for target in types:
                p = part.filter(pl.col("selected_type") == target).sort("iteration")
                ax.plot(p["iteration"], p["fraction"], label=target, color=colours[target], marker=".")
            rate_axis(ax, "share of its choices")
            ax.set_xlabel(f"iteration (bins of {bin_size})")
            ax.set_title(f"{label}: whom {types[j]} picks")
            ax.legend(fontsize=7, title="picked")
    fig.suptitle(title or "LLM agents beside DQN agents: cooperation and partner selection")
    return fig


def main(argv: list[str] | None = None) -> None:
    from analysis.dataset import open_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("llm", type=Path, help="the LLM population's dataset folder")
    p.add_argument("dqn", type=Path, help="the DQN population's dataset folder")
    p.add_argument("--bin", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/llm_population_ut_aut_de.png"))
    args = p.parse_args(argv)
    frames = {"LLM": open_dataset(args.llm).scan(), "DQN": open_dataset(args.dqn).scan()}
    save(plot_population_pair(frames, args.bin), args.out, dpi=90)
    with pl.Config(tbl_rows=40, tbl_cols=12, float_precision=2):
        print(summary(frames))
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
