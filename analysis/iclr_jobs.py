"""The paper's fine-tuning figures for many pair-protocol LLM datasets at once (the end of `--scenario iclr2025/jobs`,
or `python -m analysis <folders> --name <group> ...`): the ICLR 2025 job file's groups, each a dataset of its seeds.

    fine-tuning   rows: cooperation over legal answers, illegal-answer rate; one column per opponent (TFT, Random,
                  AD, AC); one line per reward (Game, De, Ut, Game+De, Game→De, Game→Ut) with its 95% band over seeds
    two learners  one panel per reward: the share of games that ended both C, one D (exploitation either way), both
                  D, or with an illegal answer, per episode, bands over seeds
    phased        one panel per phased run (Game→De, Game→Ut against TFT or Random, the 2000-episode unlearning
                  runs, two learners): cooperation and illegal answers, the switch marked
    extra         the job file's extra experiments against the core run of the same reward and opponent

A dataset is classified by its records' population and schedule (`LLMRun`) and by its name: two LLM slots and no
static one = two learners; a reward schedule = phased; "extra…" and "unlearning…" name the job file's extra and
unlearning groups. Metrics take one dataset's LazyFrame and return a LazyFrame (tested on synthetic records);
the figures take the collected frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from analysis.llm_compare import LLMRun
from analysis.metrics import across_runs, episode_bin
from analysis.plots import _grid, band, colour_map, rate_axis
from simulator.errors import MoralsimError
from simulator.population import parse_population

OPPONENT_ORDER = ("TFT", "Random", "AD", "AC")  # the paper's figure order
REWARD_ORDER = ("Game", "De", "Ut", "Game+De", "Game→De", "Game→Ut")
OUTCOMES = ("both C", "one D", "both D", "illegal")  # a game of two learners, as the paper's outcome plots count it
_OUTCOME_COLOURS = {"both C": "#2ca02c", "one D": "#ff7f0e", "both D": "#d62728", "illegal": "#7f7f7f"}
KINDS = ("single", "two learners", "phased", "unlearning", "extra")


def llm_codes(run: LLMRun) -> tuple[list[str], list[str]]:
    """(learner codes, static codes) of an LLM dataset's population, each in slot order (a moral type there is an
    LLM learner, whether its entry says @llm or the run's --method did)."""
    try:
        pop = parse_population(run.population)
    except MoralsimError:
        return [], []
    llm = [a.code for a in pop.agents if not a.is_static]
    static = [a.code for a in pop.agents if a.is_static]
    return llm, static


def kind(run: LLMRun) -> str:
    """Which of the job file's figures a dataset belongs to (module docstring); its name is `run.dataset`."""
    name = run.dataset.lower()
    if name.startswith("extra"):
        return "extra"
    if name.startswith("unlearning"):
        return "unlearning"
    llm, static = llm_codes(run)
    if len(llm) == 2 and not static:
        return "two learners"
    return "phased" if run.reward_schedule else "single"


def describe(run: LLMRun) -> dict[str, str]:
    """The dataset's group (name), kind, opponent ("LLM" for two learners) and reward ("Game→De")."""
    llm, static = llm_codes(run)
    reward = run.reward(llm[0]) if llm else run.dataset
    return {"group": run.dataset, "kind": kind(run), "opponent": static[0] if static else "LLM", "reward": reward}


def pair_outcomes(lf: pl.LazyFrame, run: LLMRun, bin_size: int = 1) -> pl.LazyFrame:
    """Two LLM learners in the pair protocol: per episode (binned by `bin_size` episodes) the share of games with
    both answers C, one D (either player), both D, or at least one illegal answer (its move then is the carried-over
    one and does not count as C or D), per run, then over runs.
    Columns: dataset, outcome, episode, mean, ci_low, ci_high, n_runs."""
    names = set(lf.collect_schema().names())
    need = {"selector_action", "selected_action", "selector_legal", "selected_legal"}
    if not need <= names:
        raise MoralsimError(f"two-learner outcomes need the LLM columns {sorted(need)}; missing {sorted(need - names)}")
    legal = pl.col("selector_legal").fill_null(True) & pl.col("selected_legal").fill_null(True)
    defects = pl.col("selector_action").cast(pl.Int32) + pl.col("selected_action").cast(pl.Int32)
    outcome = (pl.when(~legal).then(pl.lit("illegal")).when(defects == 0).then(pl.lit("both C"))
               .when(defects == 1).then(pl.lit("one D")).otherwise(pl.lit("both D")))
    games = lf.select("run", episode_bin(run.episode_length, bin_size), outcome.alias("outcome"))
    totals = games.group_by("run", "episode").agg(total=pl.len())
    grid = (totals.join(pl.LazyFrame({"outcome": list(OUTCOMES)}), how="cross")  # an outcome that never happened: 0
            .join(games.group_by("run", "episode", "outcome").agg(n=pl.len()), on=["run", "episode", "outcome"],
                  how="left")
            .select("run", "episode", "outcome", value=pl.col("n").fill_null(0) / pl.col("total")))
    return across_runs(grid, ["outcome", "episode"]).select(pl.lit(run.dataset).alias("dataset"), pl.all())


def with_groups(rates: pl.DataFrame, runs: Sequence[LLMRun]) -> pl.DataFrame:
    """`llm_rates` frames (stacked, `dataset` = the group's name) with each group's kind, opponent and reward."""
    info = pl.DataFrame([describe(r) for r in runs], schema={k: pl.String for k in ("group", "kind", "opponent",
                                                                                     "reward")})
    return rates.join(info, left_on="dataset", right_on="group", how="left")


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(order)}
    return sorted(dict.fromkeys(values), key=lambda v: (rank.get(v, len(rank)), v))


def _switches(ax, runs: Mapping[str, LLMRun], group: str, bin_size: int) -> None:  # type: ignore[no-untyped-def]
    run = runs.get(group)
    if run is None:
        return
    llm, _ = llm_codes(run)
    for episode, reward in (run.switch_episodes(llm[0]) if llm else []):
        ax.axvline(episode // bin_size * bin_size, color="k", linestyle="--", linewidth=0.9, alpha=0.7)
        ax.annotate(f"→{reward}", (episode, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)


def _episode_axis(ax, bin_size: int) -> None:  # type: ignore[no-untyped-def]
    ax.set_xlabel("episode" if bin_size <= 1 else f"episode (bins of {bin_size})")


def plot_fine_tuning(rates: pl.DataFrame, bin_size: int = 1, title: str = "") -> Figure | None:
    """The paper's main figure: rows cooperation / illegal answers, one column per opponent, one line per reward
    (single-learner and phased groups), mean over seeds with 95% bands. None when there is no such group."""
    part = rates.filter(pl.col("kind").is_in(["single", "phased"]))
    if not part.height:
        return None
    opponents = _ordered(part["opponent"].to_list(), OPPONENT_ORDER)
    rewards = _ordered(part["reward"].to_list(), REWARD_ORDER)
    colours = colour_map(rewards)
    fig = Figure(figsize=(3.9 * len(opponents) + 1.6, 6.4), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(opponents), squeeze=False, sharey="row"))
    for col, opponent in enumerate(opponents):
        for row, (metric, ylabel) in enumerate((("cooperation_rate", "cooperation (legal answers)"),
                                                ("illegal_rate", "illegal-answer rate"))):
            ax = axes[row, col]
            for reward in rewards:
                p = part.filter((pl.col("opponent") == opponent) & (pl.col("reward") == reward)
                                & (pl.col("metric") == metric)).drop_nulls("mean")
                if p.height:
                    band(ax, p.rename({"episode": "iteration"}), reward, colours[reward],
                         "--" if "→" in reward else "-")
            rate_axis(ax, ylabel if col == 0 else "")
            _episode_axis(ax, bin_size)
            if row == 0:
                ax.set_title(f"vs {opponent}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, title="reward", loc="outside right center", fontsize=8)
    fig.suptitle(title or "Fine-tuning by reward and opponent (mean over seeds, 95% band; dashed: phased)")
    return fig


def plot_two_learners(outcomes: pl.DataFrame, rates: pl.DataFrame, runs: Mapping[str, LLMRun], bin_size: int = 1,
                      title: str = "") -> Figure | None:
    """One panel per two-learner group: the outcome shares per episode, and (black) the learners' cooperation over
    legal answers, mean over seeds with 95% bands; a dashed line at a reward switch."""
    if not outcomes.height:
        return None
    info = pl.DataFrame([describe(r) for r in runs.values()], schema={k: pl.String for k in ("group", "kind",
                                                                                              "opponent", "reward")})
    groups = info.filter(pl.col("group").is_in(outcomes["dataset"].unique().to_list()))
    order = _ordered(groups["reward"].to_list(), REWARD_ORDER)
    panels = [g for r in order for g in groups.filter(pl.col("reward") == r)["group"].to_list()]
    fig, axes = _grid(len(panels), 4.6, 3.4, max_cols=3, legend_width=1.4)
    for ax, group in zip(axes, panels, strict=False):
        for outcome in OUTCOMES:
            p = outcomes.filter((pl.col("dataset") == group) & (pl.col("outcome") == outcome)).drop_nulls("mean")
            if p.height:
                band(ax, p.rename({"episode": "iteration"}), outcome, _OUTCOME_COLOURS[outcome])
        coop = rates.filter((pl.col("dataset") == group) & (pl.col("metric") == "cooperation_rate")).drop_nulls("mean")
        if coop.height:
            band(ax, coop.rename({"episode": "iteration"}), "cooperation (legal)", "k", ":")
        _switches(ax, runs, group, bin_size)
        rate_axis(ax, "share of games")
        _episode_axis(ax, bin_size)
        ax.set_title(group, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="outcome", loc="outside right center", fontsize=8)
    fig.suptitle(title or "Two LLM learners with the same reward: outcomes per episode (mean over seeds, 95% band)")
    return fig


def plot_phased(rates: pl.DataFrame, runs: Mapping[str, LLMRun], bin_size: int = 1, title: str = "") -> Figure | None:
    """One panel per group whose reward switches (Game→De, Game→Ut; the unlearning runs; two learners):
    cooperation over legal answers and the illegal-answer rate, mean over seeds with 95% bands, the switch dashed."""
    groups = [r.dataset for r in runs.values() if r.reward_schedule and r.dataset in set(rates["dataset"].to_list())]
    if not groups:
        return None
    info = {r.dataset: describe(r) for r in runs.values()}
    groups.sort(key=lambda g: (KINDS.index(info[g]["kind"]), _ordered([info[g]["opponent"]], OPPONENT_ORDER)[0],
                               info[g]["reward"]))
    fig, axes = _grid(len(groups), 4.6, 3.4, max_cols=3, legend_width=1.4)
    for ax, group in zip(axes, groups, strict=False):
        for metric, colour, style, label in (("cooperation_rate", "#1f77b4", "-", "cooperation (legal answers)"),
                                             ("illegal_rate", "#7f7f7f", ":", "illegal-answer rate")):
            p = rates.filter((pl.col("dataset") == group) & (pl.col("metric") == metric)).drop_nulls("mean")
            if p.height:
                band(ax, p.rename({"episode": "iteration"}), label, colour, style)
        _switches(ax, runs, group, bin_size)
        rate_axis(ax, "rate")
        _episode_axis(ax, bin_size)
        ax.set_title(group, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(title or "Phased rewards and unlearning: the reward switches at the dashed line (mean over seeds)")
    return fig


def plot_extra(rates: pl.DataFrame, bin_size: int = 1, title: str = "") -> Figure | None:
    """The extra experiments beside the core group of the same reward and opponent (cooperation, illegal answers)."""
    extra = rates.filter(pl.col("kind") == "extra")
    if not extra.height:
        return None
    keys = extra.select("opponent", "reward").unique().rows()
    core = rates.filter(pl.col("kind") == "single").filter(
        pl.struct("opponent", "reward").is_in([{"opponent": o, "reward": r} for o, r in keys]))
    part = pl.concat([core, extra])
    groups = part["dataset"].unique(maintain_order=True).to_list()
    colours = colour_map(groups)
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    for ax, (metric, ylabel) in zip(fig.subplots(1, 2), (("cooperation_rate", "cooperation (legal answers)"),
                                                         ("illegal_rate", "illegal-answer rate")), strict=True):
        for g in groups:
            p = part.filter((pl.col("dataset") == g) & (pl.col("metric") == metric)).drop_nulls("mean")
            if p.height:
                band(ax, p.rename({"episode": "iteration"}), g, colours[g], "-" if g in core["dataset"] else "--")
        rate_axis(ax, ylabel)
        _episode_axis(ax, bin_size)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    fig.suptitle(title or "Extra experiments (dashed) against the core run (solid)")
    return fig
