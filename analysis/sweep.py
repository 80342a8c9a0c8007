"""The report of a sweep: several populations (the nine AIES 2024 populations) compared side by side.

    <out>/index.html                      the comparison page (figures embedded, mode counts, links)
    <out>/figures/sweep_*.png             the comparison figures listed in `write_sweep_report`
    <out>/tables/sweep_*.csv              their numbers in full
    <out>/populations/                    `analysis.report.write_report` over all folders: every population's own
                                          figures and tables, and the generic comparison grids
Populations are labelled by their majority type (`8xS_1xUT_...` -> `majority-S`, as in the paper) when every
population has one, else by their full string.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from analysis import metrics as m
from analysis import modes, plots
from analysis.report import _CSS, DEFAULT_MAX_POINTS, Analysis, _num_iterations, html_table, write_report
from simulator.errors import MoralsimError
from simulator.population import parse_population

log = logging.getLogger(__name__)

POPULARITY_WINDOW = 100  # the paper's popularity heatmap reads the last 100 of 30,000 episodes


@dataclass
class SweepReport:
    out: Path
    labels: list[str]  # one per population, in the order given
    populations: Path  # the per-population report folder
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, png)
    tables: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def population_label(text: str) -> str:
    """`majority-<type>` when one entry's count is larger than every other's, else the population string."""
    pop = parse_population(text)
    counts: dict[str, int] = {}
    for agent in pop.agents:
        counts[agent.code] = counts.get(agent.code, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) > 1 and ranked[0][1] > ranked[1][1]:
        return f"majority-{ranked[0][0]}"
    return pop.text


def sweep_labels(populations: Sequence[str]) -> list[str]:
    labels = [population_label(p) for p in populations]
    return labels if len(set(labels)) == len(labels) else list(populations)


def selection_popularity(lf: pl.LazyFrame, start: int) -> pl.LazyFrame:
    """Each type's share of all partner selections made from iteration `start` on (the paper: the last 100
    episodes), per run, then over runs; a type nobody selected in a run counts 0 there. In a population with eight
    agents of one type, that type gets 8/15 of the selections by chance alone (about 0.53).
    Columns: type, mean, ci_low, ci_high, n_runs."""
    window = lf.filter(pl.col("iteration") >= start)
    counts = window.group_by("run", pl.col("selected_type").cast(pl.String).alias("type")).agg(n=pl.len())
    grid = (
        window.select("run").unique()
        .join(lf.select(pl.col("selector_type").cast(pl.String).alias("type")).unique(), how="cross")
    )
    per_run = (
        grid.join(counts, on=["run", "type"], how="left")
        .with_columns(pl.col("n").fill_null(0).cast(pl.Float64))
        .with_columns(value=pl.col("n") / pl.col("n").sum().over("run"))
    )
    return m.across_runs(per_run, ["type"])


def _type_order(analyses: Sequence[Analysis]) -> list[str]:
    """Types in the order the population strings name them (the sweep's order), first appearance wins."""
    order: dict[str, None] = {}
    for a in analyses:
        order.update(dict.fromkeys(modes.type_order(a.dataset.population)))
    for a in analyses:  # folders that are not population strings: whatever types their records hold
        order.update(dict.fromkeys(sorted(a.frames["final_cooperation"]["type"].unique().to_list())))
    return list(order)


def plot_cooperation_across_populations(
    frames: Mapping[str, pl.DataFrame], majority: Mapping[str, str | None], types: Sequence[str], bin_size: int = 1,
) -> Figure:
    """The paper's per-type comparison: one panel per type, one line per population (mean over runs, 95% band),
    coloured by the population's majority type; the population where the panel's type is the majority is drawn bold."""
    colours = plots.colour_map(list(types))
    fig, axes = plots._grid(len(types))
    for ax, typ in zip(axes, types, strict=True):
        for label, df in frames.items():
            part = df.filter(pl.col("type") == typ)
            if not part.height:
                continue
            lead = majority.get(label)
            plots.band(ax, part, label, colours.get(lead) if lead else None)
            if lead == typ:
                ax.lines[-1].set_linewidth(2.6)
        plots.rate_axis(ax, "cooperation rate")
        ax.set_xlabel(plots._xlabel(bin_size))
        ax.set_title(f"{typ} agents", fontsize=10)
    if axes:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8, title="population")
    fig.suptitle("Cooperation of each type across populations (mean over runs, 95% band; bold: the type's own "
                 "majority population)")
    return fig


def plot_popularity(df: pl.DataFrame, labels: Sequence[str], types: Sequence[str], window: int) -> Figure:
    """Heatmap type x population: the type's share of all partner selections over the last `window` iterations."""
    lookup = {(p, t): v for p, t, v in df.select("population", "type", "mean").iter_rows()}
    grid = np.array([[np.nan if lookup.get((p, t)) is None else lookup[(p, t)] for p in labels] for t in types])
    fig = Figure(figsize=(1.0 * len(labels) + 3.5, 0.55 * len(types) + 2.4), layout="constrained")
    ax = fig.add_subplot()
    plots.heatmap(ax, list(types), list(labels), grid, "Greys", "share of all selections")
    ax.set_xlabel("population")
    ax.set_ylabel("selected type")
    ax.set_title(f"Popularity: share of partner selections going to each type, last {window} iterations "
                 "(mean over runs)")
    return fig


def plot_selection_matrices(frames: Mapping[str, pl.DataFrame], types: Sequence[str]) -> Figure:
    """Who selects whom: one selector x selected matrix per population (share of the row type's selections), rows
    and columns in the order of `types`."""
    fig, axes = plots._grid(len(frames), 5.2, 4.4)
    for ax, (label, df) in zip(axes, frames.items(), strict=True):
        r, c, mat = plots._matrix(df, "selector_type", "selected_type", "fraction")
        rows = [r.index(t) for t in types if t in r]
        cols = [c.index(t) for t in types if t in c]
        plots.heatmap(ax, [r[i] for i in rows], [c[j] for j in cols], mat[np.ix_(rows, cols)], "Blues",
                       "share of selections")
        ax.set_xlabel("selected type")
        ax.set_ylabel("selector type")
        ax.set_title(label, fontsize=10)
    fig.suptitle("Partner selection per population, whole run (rows sum to 1)")
    return fig


def _mode_pivot(counts: pl.DataFrame, labels: Sequence[str], types: Sequence[str]) -> pl.DataFrame:
    """Type x population, each cell "defect/mixed/cooperate" run counts."""
    cell = counts.with_columns(
        runs=pl.concat_str([pl.col(k).cast(pl.String) for k in modes.MODES], separator="/")
    )
    wide = cell.pivot(on="population", index="type", values="runs")
    order = pl.DataFrame({"type": list(types)}).with_row_index("_order")
    wide = wide.join(order, on="type", how="left").sort("_order").drop("_order")
    return wide.select("type", *[lab for lab in labels if lab in wide.columns])


def write_sweep_report(
    folders: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    bin_size: int | None = None,
    dpi: int = 150,
    max_points: int = DEFAULT_MAX_POINTS,
) -> SweepReport:
    """Analyse every population folder (`write_report` into `<out>/populations`) and write the comparison page."""
    if len(folders) < 2:
        raise MoralsimError(f"a sweep report compares at least two population folders, got {len(folders)}")
    out = Path(out)
    detail = write_report(folders, out / "populations", bin_size, max_points=max_points, dpi=dpi)
    analyses = detail.analyses
    labels = sweep_labels([a.dataset.population for a in analyses])
    majority = {
        lab: lab.removeprefix("majority-") if lab.startswith("majority-") else None for lab in labels
    }
    types = _type_order(analyses)
    b = max(a.bin_size for a in analyses)
    report = SweepReport(out, labels, detail.out, problems=list(detail.problems))
    figures_dir, tables_dir = out / "figures", out / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)

    def with_population(name: str) -> pl.DataFrame:
        return pl.concat(
            [a.frames[name].select(pl.lit(lab).alias("population"), pl.all()) for a, lab in zip(analyses, labels,
                                                                                              strict=True)]
        )

    final = with_population("final_cooperation")
    counts = modes.cooperation_modes(final.lazy(), ("population", "type")).collect()
    counts = (  # populations and types in the sweep's order, not alphabetical
        counts.join(pl.DataFrame({"population": labels}).with_row_index("_p"), on="population")
        .join(pl.DataFrame({"type": types}).with_row_index("_t"), on="type")
        .sort("_p", "_t")
        .drop("_p", "_t")
    )
    popularity = []
    iterations = []
    for a, lab in zip(analyses, labels, strict=True):
        lf = a.dataset.scan()
        iterations.append(_num_iterations(a.dataset, lf))
        pop = selection_popularity(lf, max(0, iterations[-1] - POPULARITY_WINDOW)).collect(engine="streaming")
        popularity.append(pop.select(pl.lit(lab).alias("population"), pl.all()))
    popular = pl.concat(popularity)
    last_bin = with_population("cooperation_by_type").filter(
        pl.col("iteration") == pl.col("iteration").max().over("population")
    )
    for name, df in (("sweep_cooperation_modes", counts), ("sweep_final_cooperation", final),
                     ("sweep_popularity", popular), ("sweep_cooperation_last_bin", last_bin)):
        path = tables_dir / f"{name}.csv"
        df.write_csv(path)
        report.tables.append(path)

    coop = {lab: a.frames["cooperation_by_type"] for a, lab in zip(analyses, labels, strict=True)}
    social = {lab: a.frames["social_outcomes"] for a, lab in zip(analyses, labels, strict=True)}
    selection = {lab: a.frames["selection_matrix"] for a, lab in zip(analyses, labels, strict=True)}
    finals = {lab: final.filter(pl.col("population") == lab) for lab in labels}
    window = min(POPULARITY_WINDOW, *iterations)
    for name, caption, make in (
        ("sweep_cooperation_by_type", "Cooperation of each type across the populations",
         lambda: plot_cooperation_across_populations(coop, majority, types, b)),
        ("sweep_final_cooperation", f"Each run's final cooperation per type (last {modes.FINAL_FRACTION:.0%} of "
         "iterations): outcomes that split across runs", lambda: modes.plot_final_cooperation(finals, order=types)),
        ("sweep_social_outcomes", "Social outcomes per game across the populations",
         lambda: plots.plot_social_comparison(social, b, "Social outcomes per game, by population")),
        ("sweep_popularity", f"Popularity of each type, last {window} iterations",
         lambda: plot_popularity(popular, labels, types, window)),
        ("sweep_selection_matrices", "Who selects whom, per population",
         lambda: plot_selection_matrices(selection, types)),
    ):
        report.figures.append((caption, plots.save(make(), figures_dir / f"{name}.png", dpi)))

    (out / "index.html").write_text(_render(report, analyses, _mode_pivot(counts, labels, types)), encoding="utf-8")
    log.info("sweep report written to %s", out / "index.html")
    return report


def _render(report: SweepReport, analyses: Sequence[Analysis], pivot: pl.DataFrame) -> str:
    title = f"moralsim sweep: {len(analyses)} populations"
    rows = pl.DataFrame({
        "label": report.labels,
        "population": [a.dataset.population for a in analyses],
        "runs": [str(a.dataset.manifest.get("num_runs", "?")) for a in analyses],
        "iterations": [str(a.dataset.manifest.get("num_iterations", "?")) for a in analyses],
        "rows": [f"{a.dataset.num_rows:,}" for a in analyses],
    })
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if report.problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in report.problems)
        parts.append(f"<div class='problems'><h2>Problems</h2><ul>{items}</ul></div>")
    rel = report.populations.relative_to(report.out) if report.populations.is_relative_to(report.out) else report.populations
    parts.append(
        f"<p class='note'>Each population's own figures and tables: <a href='{html.escape(str(rel))}/index.html'>"
        f"{html.escape(str(rel))}/index.html</a>. Tables in full: "
        + ", ".join(f"<a href='tables/{p.name}'>{html.escape(p.name)}</a>" for p in report.tables) + ".</p>"
    )
    parts.append("<h2>Populations</h2>" + html_table(rows))
    parts.append(
        f"<h2>Runs per outcome mode</h2><p class='note'>Final cooperation = a run's share of C among all moves of the "
        f"type's agents over the last {modes.FINAL_FRACTION:.0%} of iterations. Each cell counts runs as "
        f"defect (&lt; {modes.DEFECT_BELOW}) / mixed ({modes.DEFECT_BELOW} to {modes.COOPERATE_ABOVE}) / cooperate "
        f"(&gt; {modes.COOPERATE_ABOVE}).</p>" + html_table(pivot, max_rows=100)
    )
    parts.append("<h2>Figures</h2>")
    for caption, png in report.figures:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
