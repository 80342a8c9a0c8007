"""Several LLM fine-tuning runs side by side, as the ICLR 2025 paper's figures put them: cooperation over episodes per
reward type (Game, De, Ut, Game+De, the phased Game→De) against an opponent, the illegal-answer rate, the start and
end rates, and the test-time generalisation matrix of the saved adapters.

Each dataset (destination folder) is described by an `LLMRun`, read from its manifest. A line is labelled by the LLM
agent's reward and its opponents ("De vs TFT", "Game→De vs TFT", "Game vs AD"), so two rewards against one opponent
and one reward against two opponents read the same way. When the records carry the answer mode ("free" generation or
a "mask" over the two action tokens), it goes into the label too: a masked run must never pass for free generation.

Metrics take a LazyFrame of one dataset's records and return a LazyFrame with a leading `dataset` column, so the
frames of several datasets stack with `pl.concat`; plots take the collected, stacked frames.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from analysis.dataset import scan_eval
from analysis.metrics import LLM_ANSWER_RATES, ROLES, across_runs, agent_games, episode_bin, generalisation_matrix
from analysis.plots import band, colour_map, heatmap, rate_axis
from simulator.errors import CorruptDataError, MoralsimError
from simulator.population import parse_population

log = logging.getLogger(__name__)

RATE_METRICS = tuple(LLM_ANSWER_RATES)  # cooperation_rate (over legal answers), illegal_rate
WINDOW_FRACTION = 0.1  # start and end windows: the first and last 10% of the episodes
# Saved adapters and what `main.py evaluate --adapter <run dir>/adapters/slot<k>` writes next to them by default.
EVAL_GLOB = "run=*/adapters/slot*/eval/eval.parquet"
_EVAL_AXES = ("game", "tokens", "variant")  # column order of the generalisation figure; other axes come last


@dataclass(frozen=True)
class LLMRun:
    """What the comparison needs to know about one dataset, from its manifest (see `from_manifest`)."""

    dataset: str  # the dataset's name in the report (its folder name)
    population: str  # e.g. "1xGame@llm_1xTFT"
    reward_schedule: tuple[tuple[str, float, str], ...] = ()  # (code, fraction of the iterations, new code)
    episode_length: int = 1  # iterations per episode (the paper: batch_size games, then one PPO update)
    num_iterations: int | None = None
    protocol: str = "population"
    model: str = ""
    answer_mode: str | None = None  # the LLM options' answer mode, where the records do not carry it

    @classmethod
    def from_manifest(cls, dataset: str, manifest: Mapping[str, Any], num_iterations: int | None = None) -> LLMRun:
        """Read the run's identity from `manifest.json`. `episode_length` and `protocol` are newer keys: a manifest
        without them describes one PPO update per iteration in the population protocol."""
        cfg = manifest.get("config") or {}
        length = cfg.get("episode_length") or 1
        if not isinstance(length, int) or length < 1:
            log.warning("%s: episode_length %r in the manifest is not a positive integer; using 1", dataset, length)
            length = 1
        n = num_iterations or manifest.get("num_iterations") or cfg.get("num_iterations")
        llm = (cfg.get("agent_options") or {}).get("llm") or {}
        return cls(
            dataset=dataset,
            population=str(cfg.get("destination_folder") or manifest.get("population") or dataset),
            reward_schedule=tuple((str(c), float(f), str(new)) for c, f, new in cfg.get("reward_schedule") or ()),
            episode_length=length,
            num_iterations=int(n) if n else None,
            protocol=str(cfg.get("protocol") or "population"),
            model=str(llm.get("model") or ""),
            answer_mode=str(llm["answer_mode"]) if llm.get("answer_mode") else None,
        )

    @property
    def num_episodes(self) -> int | None:
        return None if self.num_iterations is None else math.ceil(self.num_iterations / self.episode_length)

    def episode_bin_size(self, iteration_bin: int) -> int:
        """Episodes per bin so that a bin spans about `iteration_bin` iterations, like the report's other series."""
        return max(1, iteration_bin // self.episode_length)

    def _phases(self, code: str) -> list[tuple[float, str]]:
        """(fraction, new code) of each switch that reaches `code`'s slot, applied in order as RunConfig does."""
        current, out = code, []
        for old, fraction, new in sorted(self.reward_schedule, key=lambda e: e[1]):
            if current == old:
                current = new
                out.append((fraction, new))
        return out

    def reward(self, code: str) -> str:
        """The reward an agent of type `code` learned from: its code, or the schedule ("Game→De")."""
        return "→".join([code, *(new for _, new in self._phases(code))])

    def opponents(self, code: str) -> str | None:
        """The rest of the population, seen from one agent of type `code`: "TFT", "AD", "2xS+TFT"."""
        try:
            codes = list(parse_population(self.population).codes)
        except MoralsimError:
            return None  # a folder name that is no population string: the label is the reward alone
        if code in codes:
            codes.remove(code)
        return "+".join(c if k == 1 else f"{k}x{c}" for c, k in Counter(codes).items()) or None

    def label(self, code: str) -> str:
        others = self.opponents(code)
        return self.reward(code) if others is None else f"{self.reward(code)} vs {others}"

    def labels(self) -> dict[str, str]:
        try:
            codes = dict.fromkeys(parse_population(self.population).codes)
        except MoralsimError:
            codes = {}
        return {c: self.label(c) for c in codes}

    def slot_code(self, slot: int) -> str | None:
        try:
            codes = parse_population(self.population).codes
        except MoralsimError:
            return None
        return codes[slot] if 0 <= slot < len(codes) else None

    def windows(self, fraction: float = WINDOW_FRACTION) -> list[tuple[str, int, int]]:
        """(name, first episode, last episode): the first and last `fraction` of the episodes and, for a phased
        run, the same width just before each switch (the end of the earlier phase)."""
        n = self.num_episodes
        if not n:
            return []
        w = max(1, round(fraction * n))
        out = [("start", 0, w - 1)]
        for code in self.labels():
            for episode, new in self.switch_episodes(code):
                if episode > 0:
                    out.append((f"before {new}", max(0, episode - w), episode - 1))
        out.append(("end", max(0, n - w), n - 1))
        return list(dict.fromkeys(out))

    def switch_episodes(self, code: str) -> list[tuple[int, str]]:
        if self.num_iterations is None:
            return []
        # RunConfig.reward_phases: the switch takes effect at iteration round(fraction * num_iterations)
        return [(round(f * self.num_iterations) // self.episode_length, new) for f, new in self._phases(code)]


# ---- metrics ------------------------------------------------------------------------------------------------------


def _answers(lf: pl.LazyFrame, run: LLMRun) -> pl.LazyFrame:
    """One row per LLM answer (either role): run, iteration, label, answer_mode, action, legal."""
    names = set(lf.collect_schema().names())
    missing = sorted({f"{r}_legal" for r in ROLES} - names)
    if missing:
        raise MoralsimError(f"the LLM comparison needs the LLM columns of simulator.schema.LLM_RECORD_SCHEMA; missing {missing}")
    # The answer mode is per role in the LLM columns, or one column per row; older records have neither, and then
    # the manifest's LLM options may still say it.
    known = pl.lit(run.answer_mode, dtype=pl.String)
    if {f"{r}_answer_mode" for r in ROLES} <= names:
        lf = lf.with_columns(pl.coalesce(pl.col(f"{r}_answer_mode").cast(pl.String), known) for r in ROLES)
    else:
        mode = pl.coalesce(pl.col("answer_mode").cast(pl.String), known) if "answer_mode" in names else known
        lf = lf.with_columns(**{f"{r}_answer_mode": mode for r in ROLES})
    return (
        agent_games(lf, extra=("legal", "answer_mode"))
        .filter(pl.col("legal").is_not_null())
        .select(
            "run",
            "iteration",
            pl.col("type").replace(run.labels()).alias("label"),
            pl.col("answer_mode").cast(pl.String),
            "action",
            "legal",
        )
    )


def _tagged(summary: pl.LazyFrame, run: LLMRun) -> pl.LazyFrame:
    return summary.select(pl.lit(run.dataset).alias("dataset"), pl.all())


def llm_rates(lf: pl.LazyFrame, run: LLMRun, bin_size: int = 1) -> pl.LazyFrame:
    """Per LLM reward label and episode (binned by `bin_size` episodes): `cooperation_rate`, the share of C among
    the legal answers, and `illegal_rate`, over runs. Agents with the same label pool their answers.
    Columns: dataset, label, answer_mode, metric, episode, mean, ci_low, ci_high, n_runs."""
    per_run = (
        _answers(lf, run)
        .group_by("run", episode_bin(run.episode_length, bin_size), "label", "answer_mode")
        .agg(**LLM_ANSWER_RATES)
        .unpivot(index=["run", "episode", "label", "answer_mode"], on=list(RATE_METRICS), variable_name="metric",
                 value_name="value")
        .drop_nulls("value")  # a bin without a legal answer has no cooperation rate in that run
    )
    return _tagged(across_runs(per_run, ["label", "answer_mode", "metric", "episode"]), run)


def llm_windows(lf: pl.LazyFrame, run: LLMRun, fraction: float = WINDOW_FRACTION) -> pl.LazyFrame:
    """The rates of `llm_rates` pooled over windows of episodes (`LLMRun.windows`): the first and last `fraction`
    of the episodes, and for a phased run the end of each earlier phase. One value per run and window, then over runs.
    Columns: dataset, label, answer_mode, window, first_episode, last_episode, metric, mean, ci_low, ci_high, n_runs."""
    answers = _answers(lf, run).with_columns(episode_bin(run.episode_length))
    spans = run.windows(fraction)
    if not spans:  # no episode count: the whole run is one window
        spans = [("all", 0, 2**31 - 1)]
    keys = ["label", "answer_mode", "window", "first_episode", "last_episode"]
    per_run = (
        pl.concat([
            answers.filter(pl.col("episode").is_between(a, b)).with_columns(
                window=pl.lit(name), first_episode=pl.lit(a, dtype=pl.Int32), last_episode=pl.lit(b, dtype=pl.Int32)
            )
            for name, a, b in spans
        ])
        .group_by("run", *keys)
        .agg(**LLM_ANSWER_RATES)
        .unpivot(index=["run", *keys], on=list(RATE_METRICS), variable_name="metric", value_name="value")
        .drop_nulls("value")
    )
    summary = across_runs(per_run, [*keys, "metric"]).sort("label", "answer_mode", "first_episode", "last_episode",
                                                           "metric")
    return _tagged(summary, run)


def phase_switches(run: LLMRun) -> pl.DataFrame:
    """The episodes where a phased run's reward switches, per label. Columns: dataset, label, episode, reward."""
    rows = [(run.dataset, run.label(code), ep, new) for code in run.labels() for ep, new in run.switch_episodes(code)]
    return pl.DataFrame(rows, schema={"dataset": pl.String, "label": pl.String, "episode": pl.Int32,
                                      "reward": pl.String}, orient="row")


def _eval_cell(names: set[str]) -> tuple[pl.Expr, pl.Expr]:
    """(axis, cell) of each answer of the evaluation suite: the game on the game axis, the token pair on the tokens
    axis, the prompt variant on the variant axis; `--full` evaluations are pooled per game."""
    if "axis" not in names:
        return pl.lit("game"), pl.col("game").cast(pl.String)
    axis = pl.col("axis").cast(pl.String)
    cell = (
        pl.when(axis.is_in(["game", "full"])).then(pl.col("game"))
        .when(axis == "tokens").then(pl.col("action_tokens"))
        .when(axis == "variant").then(pl.col("prompt_variant"))
        .otherwise(axis)
        .cast(pl.String)
    )
    return pl.when(axis == "full").then(pl.lit("game")).otherwise(axis), cell


def scan_run_evals(folder: str | Path, run: LLMRun) -> pl.LazyFrame | None:
    """Every saved adapter's evaluation in the dataset (`<folder>/run=<k>/adapters/slot<j>/eval/eval.parquet`) as one
    LazyFrame: run, label (of the slot's agent), axis, cell, legal, action. None if there is none; an unreadable
    file is logged and left out."""
    frames = []
    for path in sorted(Path(folder).glob(EVAL_GLOB)):
        k = re.fullmatch(r"run=(\d+)", path.parts[-5])
        slot = re.fullmatch(r"slot(\d+)", path.parts[-3])
        code = run.slot_code(int(slot[1])) if slot else None
        if k is None or code is None:
            log.warning("%s: not a run's adapter evaluation (%s); left out", path, EVAL_GLOB)
            continue
        try:
            lf = scan_eval(path)
        except CorruptDataError as e:
            log.warning("left out: %s", e)
            continue
        axis, cell = _eval_cell(set(lf.collect_schema().names()))
        frames.append(lf.select(
            pl.lit(int(k[1]), dtype=pl.Int32).alias("run"),
            pl.lit(run.label(code)).alias("label"),
            axis.alias("axis"),
            cell.alias("cell"),
            pl.col("legal").cast(pl.Boolean),
            pl.col("action").cast(pl.Int8),
        ))
    return pl.concat(frames) if frames else None


def llm_generalisation(evals: pl.LazyFrame, run: LLMRun) -> pl.LazyFrame:
    """The generalisation matrix of one dataset's adapters (`scan_run_evals`), per label and cell:
    `cooperation_rate` over legal answers and `illegal_rate`, per run (adapter), then over runs.
    Columns: dataset, label, axis, metric, cell, mean, ci_low, ci_high, n_runs."""
    per_run = (
        generalisation_matrix(evals.rename({"label": "adapter"}), by=("axis", "cell", "run"))
        .select(pl.col("adapter").alias("label"), "axis", "cell", "run",
                pl.col("cooperation_rate_legal").alias("cooperation_rate"), "illegal_rate")
        .unpivot(index=["label", "axis", "cell", "run"], on=list(RATE_METRICS), variable_name="metric",
                 value_name="value")
        .drop_nulls("value")
    )
    return _tagged(across_runs(per_run, ["label", "axis", "metric", "cell"]), run)


# ---- tables and figures -------------------------------------------------------------------------------------------


def shared_answer_mode(df: pl.DataFrame) -> str | None:
    """The answer mode of every row where all rows have the same known one, else None."""
    if "answer_mode" not in df.columns or df["answer_mode"].null_count():
        return None
    modes = df["answer_mode"].unique().to_list()
    return str(modes[0]) if len(modes) == 1 else None


def with_names(df: pl.DataFrame, modes: bool = True) -> pl.DataFrame:
    """Add `name`, what the legend and tables show: the label, the dataset where two datasets share a label, and
    (with `modes`) the answer mode where the records say it."""
    mode = pl.col("answer_mode") if modes and "answer_mode" in df.columns else pl.lit(None, dtype=pl.String)
    shared = pl.col("dataset").n_unique().over("label") > 1
    name = pl.when(shared).then(pl.format("{} ({})", "label", "dataset")).otherwise(pl.col("label"))
    return df.with_columns(
        name=pl.when(mode.is_not_null()).then(pl.format("{} [answers: {}]", name, mode)).otherwise(name)
    )


def window_table(windows: pl.DataFrame) -> pl.DataFrame:
    """`llm_windows` frames (stacked) as one row per run label and window, for the report and the README."""

    def interval(metric: str) -> pl.Expr:
        ok = pl.col(f"{metric}_lo").is_not_null()
        text = pl.format("[{}, {}]", pl.col(f"{metric}_lo").round(3), pl.col(f"{metric}_hi").round(3))
        return pl.when(ok).then(text).otherwise(pl.lit("")).alias(f"{metric.removesuffix('_rate')} 95% CI")

    named = with_names(windows, modes=False).with_columns(
        pl.col("answer_mode").fill_null("") if "answer_mode" in windows.columns else pl.lit("").alias("answer_mode"))
    wide = named.pivot(
        on="metric", index=["name", "answer_mode", "window", "first_episode", "last_episode"],
        values=["mean", "ci_low", "ci_high", "n_runs"], aggregate_function="first",
    )
    cols = {f"{v}_{m}": f"{m}{suffix}" for m in RATE_METRICS for v, suffix in
            (("mean", ""), ("ci_low", "_lo"), ("ci_high", "_hi"), ("n_runs", "_n"))}
    wide = wide.rename({k: v for k, v in cols.items() if k in wide.columns})
    for c in cols.values():
        if c not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
    return wide.select(
        pl.col("name").alias("run"),
        pl.col("answer_mode").alias("answers"),
        "window",
        pl.format("{}–{}", "first_episode", "last_episode").alias("episodes"),
        pl.col("cooperation_rate").alias("cooperation (legal answers)"),
        interval("cooperation_rate"),
        pl.col("illegal_rate").alias("illegal-answer rate"),
        interval("illegal_rate"),
        pl.max_horizontal("cooperation_rate_n", "illegal_rate_n").cast(pl.Int32).alias("runs"),
    )


def _episode_label(bin_sizes: Sequence[int]) -> str:
    sizes = set(bin_sizes)
    if sizes <= {1}:
        return "episode"
    return f"episode (bins of {' / '.join(map(str, sorted(sizes)))})"


def plot_llm_comparison(rates: pl.DataFrame, switches: pl.DataFrame | None = None, title: str = "",
                        bin_sizes: Sequence[int] = (1,)) -> Figure:
    """The paper's fine-tuning figure: left, cooperation over legal answers per episode, one line (and 95% band)
    per run label; right, the illegal-answer rate. A dashed line in a run's colour marks where its reward switches."""
    # One answer mode for every line goes in the title; mixed modes are named line by line.
    mode = shared_answer_mode(rates)
    named = with_names(rates, modes=mode is None)
    names = named["name"].unique(maintain_order=True).to_list()
    colours = colour_map(names)
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=[3, 2])
    marks = (
        named.select("dataset", "label", "name").unique().join(switches, on=["dataset", "label"])
        if switches is not None and switches.height else None
    )
    for ax, metric, ylabel in zip(axes, RATE_METRICS, ("cooperation rate (legal answers)", "illegal-answer rate"),
                                  strict=True):
        part = named.filter(pl.col("metric") == metric)
        for name in names:
            p = part.filter(pl.col("name") == name).drop_nulls("mean")
            if p.height:
                band(ax, p.rename({"episode": "iteration"}), name, colours[name])
        if marks is not None:
            for name, episode, reward in marks.select("name", "episode", "reward").iter_rows():
                ax.axvline(episode, color=colours[name], linestyle="--", linewidth=1.0, alpha=0.8)
                ax.annotate(f"→{reward}", (episode, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                            textcoords="offset points", fontsize=8, color=colours[name])
        rate_axis(ax, ylabel)
        ax.set_xlabel(_episode_label(bin_sizes))
        ax.set_title(ylabel[0].upper() + ylabel[1:])
    if axes[0].lines:
        axes[0].legend(title="reward vs opponent", fontsize=8, loc="best")
    title = title or "LLM agents during fine-tuning, by reward and opponent"
    fig.suptitle(title + (f" (answers: {mode})" if mode else ""))
    return fig


def plot_llm_generalisation(gen: pl.DataFrame, title: str = "") -> Figure:
    """Two heatmaps, run label x evaluation cell (games, then token pairs, then prompt variants, then the rest):
    cooperation over legal answers and the illegal-answer rate, mean over the runs' adapters."""
    named = with_names(gen)
    rows = named["name"].unique(maintain_order=True).to_list()
    cells = (
        named.select("axis", "cell").unique()
        .with_columns(rank=pl.col("axis").replace_strict({a: i for i, a in enumerate(_EVAL_AXES)}, default=len(_EVAL_AXES),
                                                         return_dtype=pl.Int32))
        .sort("rank", "axis", "cell")
    )
    cols = [c if a in ("game", "variant") else f"{a}: {c}" if a == "tokens" else c for a, c in cells.select("axis", "cell").rows()]
    col_index = {key: j for j, key in enumerate(cells.select("axis", "cell").rows())}
    fig = Figure(figsize=(2 * (0.55 * len(cols) + 3.5), 0.5 * len(rows) + 2.6), layout="constrained")
    for ax, metric, cmap, label in zip(fig.subplots(1, 2), RATE_METRICS, ("Greens", "Reds"),
                                       ("cooperation (legal answers)", "illegal-answer rate"), strict=True):
        m = np.full((len(rows), len(cols)), np.nan)
        for name, axis, cell, mean in named.filter(pl.col("metric") == metric).select("name", "axis", "cell", "mean").rows():
            m[rows.index(name), col_index[(axis, cell)]] = np.nan if mean is None else mean
        heatmap(ax, rows, cols, m, cmap, label)
        ax.set_xlabel("evaluation cell (game · token pair · prompt variant)")
        ax.set_title(label[0].upper() + label[1:])
    fig.suptitle(title or "Test-time generalisation of the fine-tuned adapters")
    return fig

