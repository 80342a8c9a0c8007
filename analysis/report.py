"""The report: metrics of one or more destination folders, as CSV tables, PNG figures and one self-contained HTML page.

    <out>/index.html                 figures embedded as base64; skipped parts and other problems listed at the top
    <out>/tables/<name>.csv          every metric frame in full
    <out>/figures/<name>.png
With several folders, file names start with the folder's label, and comparison figures (`compare_*.png`) are added.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from analysis import iclr_jobs, llm_compare, modes, plots
from analysis import metrics as m
from analysis.dataset import Dataset, deep_check, open_dataset, scan_eval
from simulator.errors import CorruptDataError, MoralsimError

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 200  # bins per time series: a 30000-iteration run gives bins of 150
SELECTION_TIME_POINTS = 50  # coarser bins for the per-bin selection matrices
# collect_all would otherwise cache the scan the queries share, i.e. hold the whole dataset in memory (5+ GiB at
# 100M rows); without it each query streams the parts on its own and memory stays flat.
_NO_SHARED_SCAN = pl.QueryOptFlags(comm_subplan_elim=False)


@dataclass(frozen=True)
class Analysis:
    """The collected metric frames of one destination folder."""

    dataset: Dataset
    label: str
    bin_size: int
    frames: dict[str, pl.DataFrame]
    selection_bin_size: int  # coarser bins of the "selection_over_time" frame
    llm_run: llm_compare.LLMRun | None = None  # what the manifest says about the LLM runs (reward, episodes)


@dataclass
class Report:
    out: Path
    analyses: list[Analysis] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # skipped parts, unreadable folders, ...
    figures: list[tuple[str, str, Path]] = field(default_factory=list)  # (section, caption, png)
    tables: list[Path] = field(default_factory=list)
    extra_tables: list[tuple[str, str, pl.DataFrame]] = field(default_factory=list)  # (section, caption, table)


def _num_iterations(ds: Dataset, lf: pl.LazyFrame) -> int:
    n = ds.manifest.get("num_iterations")
    if isinstance(n, int) and n > 0:
        return n
    top = lf.select(pl.col("iteration").max()).collect(engine="streaming").item()
    return int(top or 0) + 1


def auto_bin_size(num_iterations: int, max_points: int = DEFAULT_MAX_POINTS) -> int:
    return max(1, math.ceil(num_iterations / max_points))


def _queries(lf: pl.LazyFrame, ds: Dataset, bin_size: int, sel_bin: int,
             llm_run: llm_compare.LLMRun | None = None) -> dict[str, pl.LazyFrame]:
    q = {
        "cooperation_by_type": m.cooperation_by_type(lf, bin_size),
        "cooperation_by_agent": m.cooperation_by_agent(lf, bin_size),
        "social_outcomes": m.social_outcomes(lf, bin_size),
        "selection_matrix": m.selection_matrix(lf),
        "selection_over_time": m.selection_matrix(lf, sel_bin),
        "cooperator_choice": m.cooperator_choice(lf, bin_size),
        "outcome_mix": m.outcome_mix(lf),
        "reward_vs_payoff": m.reward_vs_payoff(lf, bin_size),
    }
    if ds.has_llm and llm_run is not None:
        episode_bin = llm_run.episode_bin_size(bin_size)
        q["llm_episodes"] = m.llm_episodes(lf, episode_bin, llm_run.episode_length)
        q["llm_training"] = m.llm_training(lf, bin_size)
        q["llm_rates"] = llm_compare.llm_rates(lf, llm_run, episode_bin)
        q["llm_windows"] = llm_compare.llm_windows(lf, llm_run)
    return q


def analyse(ds: Dataset, label: str | None = None, bin_size: int | None = None,
            max_points: int = DEFAULT_MAX_POINTS) -> Analysis:
    """Run every metric over one folder (`polars.collect_all`, streaming, each query scanning on its own)."""
    for attempt in range(2):
        lf = ds.scan()
        try:
            n_iter = _num_iterations(ds, lf)
            b = bin_size or auto_bin_size(n_iter, max_points)
            sel_bin = max(b, auto_bin_size(n_iter, SELECTION_TIME_POINTS))
            llm_run = llm_compare.LLMRun.from_manifest(label or ds.name, ds.manifest, n_iter) if ds.has_llm else None
            q = _queries(lf, ds, b, sel_bin, llm_run)
            q["final_cooperation"] = modes.final_cooperation(lf, n_iter)
            frames = dict(zip(q, pl.collect_all(list(q.values()), engine="streaming", optimizations=_NO_SHARED_SCAN), strict=True))
            frames["cooperation_modes"] = modes.cooperation_modes(frames["final_cooperation"].lazy()).collect()
            if llm_run is not None:
                frames["llm_switches"] = llm_compare.phase_switches(llm_run)
            return Analysis(ds, label or ds.name, b, frames, sel_bin, llm_run)
        except (pl.exceptions.PolarsError, OSError) as e:
            if attempt:
                raise CorruptDataError(f"{ds.folder}: scan failed after dropping unreadable parts ({e})") from e
            log.warning("%s: scan failed (%s); reading every part to find the damaged ones", ds.folder, e)
            ds = deep_check(ds)
    raise AssertionError("unreachable")


def _labels(datasets: Sequence[Dataset]) -> list[str]:
    names = [d.name for d in datasets]
    out = []
    for d in datasets:
        out.append(d.name if names.count(d.name) == 1 else f"{d.folder.parent.name}/{d.name}")
    return out


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


# ---- HTML ---------------------------------------------------------------------------------------------------------


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def html_table(df: pl.DataFrame, max_rows: int = 60) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in df.head(max_rows).iter_rows()
    )
    more = f"<p class='note'>{df.height - max_rows} more rows in the CSV.</p>" if df.height > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _last_bin(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    last = df["iteration"].max()
    return df.filter(pl.col("iteration") == last).select(*keys, "iteration", *m.SUMMARY_COLUMNS)


def _summaries(a: Analysis) -> list[tuple[str, pl.DataFrame]]:
    f = a.frames
    last = f["cooperation_by_type"]["iteration"].max()
    out = [
        (f"Cooperation per type, last bin (iterations from {last!s})",
         _last_bin(f["cooperation_by_type"], ["type"])),
        ("Social outcomes per game, last bin", _last_bin(f["social_outcomes"], ["metric"])),
        ("Selection matrix (share of the row type's selections)",
         f["selection_matrix"].pivot(on="selected_type", index="selector_type", values="fraction", sort_columns=True)),
        (f"Runs per outcome mode: final cooperation over the last {modes.FINAL_FRACTION:.0%} of iterations "
         f"< {modes.DEFECT_BELOW} defect, > {modes.COOPERATE_ABOVE} cooperate, else mixed", f["cooperation_modes"]),
        ("Outcome mix (share of the pair's games, selector's move first)",
         f["outcome_mix"].pivot(on="outcome", index=["selector_type", "selected_type"], values="fraction")),
    ]
    if "llm_episodes" in f:
        out.append(("LLM agents per episode, last bin", _last_bin(f["llm_episodes"], ["agent", "type", "metric"])))
    if "llm_training" in f:
        out.append(("LLM metrics, last bin", _last_bin(f["llm_training"], ["agent", "type", "metric"])))
    if "llm_windows" in f:
        out.append((f"LLM agents at the start and end of fine-tuning: first and last {llm_compare.WINDOW_FRACTION:.0%} "
                    "of the episodes (and the end of each phase of a phased run), mean over runs",
                    llm_compare.window_table(f["llm_windows"])))
    return out


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f4f4f4}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}
.problems{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em}.note{font-size:.85em;color:#555}
"""


def render_html(report: Report, title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if report.problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in report.problems)
        parts.append(f"<div class='problems'><h2>Problems</h2><p>Left out of the analysis:</p><ul>{items}</ul></div>")
    parts.append("<p class='note'>Lines: mean across runs; bands: 95% Student-t interval across runs. "
                 "Cooperation counts an agent's moves in both roles (selector and selected). Tables in full: "
                 + ", ".join(f"<a href='tables/{p.name}'>{html.escape(p.name)}</a>" for p in report.tables) + ".</p>")
    sections: dict[str, list[str]] = {}
    for a in report.analyses:
        ds = a.dataset
        meta = pl.DataFrame({
            "field": ["folder", "population", "game", "iterations", "runs", "rows", "part files", "bin size"],
            "value": [str(ds.folder), ds.population, str(ds.manifest.get("game", "?")),
                      str(ds.manifest.get("num_iterations", "?")), str(ds.manifest.get("num_runs", "?")),
                      f"{ds.num_rows:,}", f"{len(ds.parts)} read, {len(ds.bad_parts)} skipped", str(a.bin_size)],
        })
        body = [html_table(meta)]
        for caption, df in _summaries(a):
            body.append(f"<h3>{html.escape(caption)}</h3>{html_table(df)}")
        sections[a.label] = body
    for section, caption, png in report.figures:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        sections.setdefault(section, []).append(
            f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    for section, caption, df in report.extra_tables:
        sections.setdefault(section, []).append(f"<h3>{html.escape(caption)}</h3>{html_table(df)}")
    for section, body in sections.items():
        parts.append(f"<h2>{html.escape(section)}</h2>" + "".join(body))
    parts.append("</body></html>")
    return "\n".join(parts)


# ---- writing ------------------------------------------------------------------------------------------------------


def _figures(a: Analysis) -> list[tuple[str, str, Callable[[], Figure]]]:
    f, b, label = a.frames, a.bin_size, a.label
    colours = plots.colour_map(f["cooperation_by_type"]["type"].to_list())
    out: list[tuple[str, str, Callable[[], Figure]]] = [
        ("cooperation_by_type", "Cooperation rate per moral type",
         lambda: plots.plot_cooperation(f["cooperation_by_type"], f"Cooperation per moral type — {label}", "type", b,
                                        colours)),
        ("final_cooperation", f"Each run's cooperation per type over the last {modes.FINAL_FRACTION:.0%} of iterations "
         "(outcomes can split across runs, which a mean hides)",
         lambda: modes.plot_final_cooperation({label: f["final_cooperation"]},
                                              order=modes.type_order(a.dataset.population))),
        ("cooperation_by_agent", "Cooperation rate per agent",
         lambda: plots.plot_cooperation(f["cooperation_by_agent"], f"Cooperation per agent — {label}", "agent", b)),
        ("social_outcomes", "Social outcomes per game",
         lambda: plots.plot_social_outcomes(f["social_outcomes"], f"Social outcomes — {label}", b)),
        ("selection_matrix", "Partner selection, whole run",
         lambda: plots.plot_selection_matrix(f["selection_matrix"], f"Partner selection — {label}")),
        ("selection_over_time", "Partner selection over time",
         lambda: plots.plot_selection_over_time(f["selection_over_time"], f"Partner selection over time — {label}",
                                                a.selection_bin_size, colours)),
        ("cooperator_choice", "Cooperator availability and choice",
         lambda: plots.plot_cooperator_choice(f["cooperator_choice"], f"Cooperators available and chosen — {label}",
                                              b, colours)),
        ("outcome_mix", "Outcome mix per pair of types",
         lambda: plots.plot_outcome_mix(f["outcome_mix"], f"Outcome mix — {label}")),
        ("reward_vs_payoff", "Learning reward against game payoff, per agent",
         lambda: plots.plot_reward_vs_payoff(f["reward_vs_payoff"], f"Learning reward vs game payoff — {label}", b)),
    ]
    if "llm_rates" in f and a.llm_run is not None:
        episode_bin = a.llm_run.episode_bin_size(b)
        answer_modes = sorted(set(f["llm_rates"]["answer_mode"].drop_nulls()))
        mode_note = f" (answers: {', '.join(answer_modes)})" if answer_modes else ""
        out.append(("llm_cooperation", "LLM agents per episode by reward, as the paper plots them: cooperation over "
                    "legal answers and illegal-answer rate (dashed: reward switch)",
                    lambda: llm_compare.plot_llm_comparison(f["llm_rates"], f["llm_switches"],
                                                            f"LLM fine-tuning — {label}", [episode_bin])))
        out.append(("llm_episodes", "LLM agents per episode: cooperation rate and illegal-answer rate",
                    lambda: plots.plot_llm_episodes(f["llm_episodes"], f"LLM agents per episode — {label}{mode_note}",
                                                    episode_bin)))
    if "llm_training" in f:
        out.append(("llm_training", "LLM fine-tuning metrics",
                    lambda: plots.plot_llm_training(f["llm_training"], f"LLM fine-tuning — {label}", b)))
    return out


def _compare_llm_runs(report: Report, runs: Sequence[tuple[Analysis, llm_compare.LLMRun]], tables_dir: Path,
                      figures_dir: Path, dpi: int) -> None:
    """Two or more LLM datasets side by side, as the paper's figures put them: cooperation over legal answers and
    the illegal-answer rate per episode (one line per reward and opponent), start and end rates, and the
    generalisation matrix of the saved adapters where `main.py evaluate` was run on them."""
    section = "LLM runs compared"
    frames = {name: pl.concat([a.frames[name] for a, _ in runs]) for name in ("llm_rates", "llm_windows", "llm_switches")}
    for name in ("llm_rates", "llm_windows"):
        path = tables_dir / f"compare_{name}.csv"
        frames[name].write_csv(path)
        report.tables.append(path)
    fig = llm_compare.plot_llm_comparison(frames["llm_rates"], frames["llm_switches"],
                                          bin_sizes=[run.episode_bin_size(a.bin_size) for a, run in runs])
    report.figures.append((section, "Cooperation over legal answers and illegal-answer rate per episode, by reward "
                           "and opponent (dashed: reward switch)", plots.save(fig, figures_dir / "compare_llm_runs.png", dpi)))
    report.extra_tables.append((section, f"Start and end of fine-tuning: first and last {llm_compare.WINDOW_FRACTION:.0%} "
                                "of the episodes, mean over runs", llm_compare.window_table(frames["llm_windows"])))
    gens = []
    for a, run in runs:
        evals = llm_compare.scan_run_evals(a.dataset.folder, run)
        if evals is None:
            continue
        try:
            gens.append(llm_compare.llm_generalisation(evals, run).collect(engine="streaming"))
        except (pl.exceptions.PolarsError, OSError) as e:
            report.problems.append(f"{a.dataset.folder}: adapter evaluations left out ({e})")
            log.warning(report.problems[-1])
    if not gens:
        log.info("no adapter evaluations (%s) in the LLM datasets: no generalisation comparison", llm_compare.EVAL_GLOB)
        return
    gen = pl.concat(gens)
    path = tables_dir / "compare_llm_generalisation.csv"
    gen.write_csv(path)
    report.tables.append(path)
    report.figures.append((section, "Test-time generalisation of the saved adapters, mean over runs",
                           plots.save(llm_compare.plot_llm_generalisation(gen), figures_dir / "compare_llm_generalisation.png",
                                      dpi)))


def _paper_figures(report: Report, runs: Sequence[tuple[Analysis, llm_compare.LLMRun]], tables_dir: Path,
                   figures_dir: Path, dpi: int) -> None:
    """The ICLR paper's figures over the pair-protocol LLM datasets (analysis/iclr_jobs.py): fine-tuning by reward
    and opponent, the two-learner outcomes, the phased and unlearning runs, the extra experiments. Each dataset's
    episodes are binned alike (the largest bin of the datasets) so that lines of different lengths compare."""
    pair = [(a, run) for a, run in runs if run.protocol == "pair"]
    if not pair:
        return
    section = "The paper's figures"
    b = max(run.episode_bin_size(a.bin_size) for a, run in pair)
    rates, outcomes = [], []
    for a, run in pair:
        lf = a.dataset.scan()
        rates.append(llm_compare.llm_rates(lf, run, b))
        learners, static = iclr_jobs.llm_codes(run)
        if len(learners) == 2 and not static:  # two LLM learners: how their games ended
            outcomes.append(iclr_jobs.pair_outcomes(lf, run, b))
    frames = pl.collect_all([*rates, *outcomes], engine="streaming")
    rate_df = iclr_jobs.with_groups(pl.concat(frames[: len(rates)]), [run for _, run in pair])
    outcome_df = pl.concat(frames[len(rates):]) if outcomes else pl.DataFrame()
    for name, df in (("paper_rates", rate_df), ("paper_two_learner_outcomes", outcome_df)):
        if df.height:
            path = tables_dir / f"{name}.csv"
            df.write_csv(path)
            report.tables.append(path)
    by_name = {run.dataset: run for _, run in pair}
    figures = [
        ("paper_fine_tuning", "Cooperation over legal answers (top) and illegal-answer rate (bottom) per episode, one "
         "column per opponent, one line per reward; mean over seeds with 95% bands",
         lambda: iclr_jobs.plot_fine_tuning(rate_df, b)),
        ("paper_two_learners", "Two LLM learners with the same reward: how their games ended, per episode",
         lambda: iclr_jobs.plot_two_learners(outcome_df, rate_df, by_name, b) if outcome_df.height else None),
        ("paper_phased", "Phased rewards and the unlearning runs: the reward switches at the dashed line",
         lambda: iclr_jobs.plot_phased(rate_df, by_name, b)),
        ("paper_extra", "The job file's extra experiments against the core run",
         lambda: iclr_jobs.plot_extra(rate_df, b)),
    ]
    for name, caption, make in figures:
        fig = make()
        if fig is not None:
            report.figures.append((section, caption, plots.save(fig, figures_dir / f"{name}.png", dpi)))


def write_report(
    folders: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    bin_size: int | None = None,
    eval_path: str | os.PathLike[str] | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    dpi: int = 150,
    names: Sequence[str] | None = None,
) -> Report:
    """Analyse each folder and write the report under `out`. A folder with no readable part is listed as a problem
    (and raises CorruptDataError only if no folder at all can be read). `dpi` sets the PNG resolution. `names`: one
    label per folder (a job's group names), instead of the folders' own names."""
    if not folders:
        raise MoralsimError("write_report needs at least one destination folder")
    if names is not None and len(names) != len(folders):
        raise MoralsimError(f"{len(names)} names for {len(folders)} folders: give one --name per folder, in order")
    report = Report(Path(out))
    datasets: list[Dataset] = []
    kept: list[str] = []
    for k, folder in enumerate(folders):
        try:
            ds = open_dataset(folder)
        except CorruptDataError as e:
            if len(folders) == 1:
                raise
            log.warning("skipping folder: %s", e)
            report.problems.append(str(e))
            continue
        datasets.append(ds)
        if names is not None:
            kept.append(names[k])
    if not datasets:
        raise CorruptDataError(f"none of the {len(folders)} folders has a readable part file")

    tables_dir, figures_dir = report.out / "tables", report.out / "figures"
    tables_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    several = len(datasets) > 1
    for ds, label in zip(datasets, kept if names is not None else _labels(datasets), strict=True):
        a = analyse(ds, label, bin_size, max_points)
        report.analyses.append(a)
        report.problems.extend(f"{b.path} (skipped: {b.reason})" for b in a.dataset.bad_parts)
        report.problems.extend(a.dataset.problems)
        prefix = f"{_slug(label)}__" if several else ""
        for name, df in a.frames.items():
            path = tables_dir / f"{prefix}{name}.csv"
            df.write_csv(path)
            report.tables.append(path)
        for name, caption, make in _figures(a):
            fig = make()
            report.figures.append((label, caption, plots.save(fig, figures_dir / f"{prefix}{name}.png", dpi)))
        log.info("analysed %s: %d rows, bin size %d", ds.folder, ds.num_rows, a.bin_size)

    if several:
        coop = {a.label: a.frames["cooperation_by_type"] for a in report.analyses}
        social = {a.label: a.frames["social_outcomes"] for a in report.analyses}
        b = max(a.bin_size for a in report.analyses)
        for name, caption, fig in [
            ("compare_cooperation_grid", "Cooperation per type, one panel per folder",
             plots.plot_cooperation_grid(coop, b)),
            ("compare_learners", "Cooperation of the learning agents, all folders in one plot",
             plots.plot_learner_comparison(coop, b)),
            ("compare_social_outcomes", "Social outcomes, all folders", plots.plot_social_comparison(social, b)),
        ]:
            report.figures.insert(0, ("Comparison", caption, plots.save(fig, figures_dir / f"{name}.png", dpi)))
        report.figures.sort(key=lambda t: t[0] != "Comparison")  # comparison first, order otherwise kept

    llm_runs = [(a, a.llm_run) for a in report.analyses if a.llm_run is not None and "llm_rates" in a.frames]
    if len(llm_runs) >= 2:
        _compare_llm_runs(report, llm_runs, tables_dir, figures_dir, dpi)
        _paper_figures(report, llm_runs, tables_dir, figures_dir, dpi)

    if eval_path is not None:
        gm = m.generalisation_matrix(scan_eval(eval_path)).collect(engine="streaming")
        path = tables_dir / "generalisation_matrix.csv"
        gm.write_csv(path)
        report.tables.append(path)
        report.figures.append(("Evaluation suite", f"Generalisation matrix ({Path(eval_path).name})",
                               plots.save(plots.plot_generalisation(gm), figures_dir / "generalisation_matrix.png", dpi)))

    title = "moralsim report: " + ", ".join(a.label for a in report.analyses)
    (report.out / "index.html").write_text(render_html(report, title), encoding="utf-8")
    log.info("report written to %s", report.out / "index.html")
    return report
