"""Paper figures from the frames of `analysis.metrics`. Each function takes collected polars frames and returns a
matplotlib `Figure` built without pyplot: no display and no global backend state are needed, and `save()` renders
with the Agg canvas that a bare `Figure` uses. In a notebook the returned figure displays as usual.

Lines show the mean across runs, shaded bands the 95% interval (see `analysis.metrics`).
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from analysis.metrics import OUTCOMES
from simulator.population import STATIC_CODES

log = logging.getLogger(__name__)

_PALETTE = [  # distinct hues first (tab10), then the lighter tab20 shades for large type sets
    to_hex(c) for cmap in ("tab10", "Dark2", "tab20b") for c in matplotlib.colormaps[cmap].colors  # type: ignore[attr-defined]
]
_OUTCOME_COLOURS = {"CC": "#4daf4a", "CD": "#377eb8", "DC": "#e41a1c", "DD": "#999999"}
_OUTCOME_LABELS = {"CC": "CC (both cooperate)", "CD": "CD (selector exploited)", "DC": "DC (selector exploits)",
                   "DD": "DD (both defect)"}
METRIC_LABELS = {
    "collective_payoff": "collective payoff (R_M + R_O)",
    "equality": "equality (1 - Gini)",
    "min_payoff": "min payoff",
    "cooperator_available": "P(a cooperator is available)",
    "cooperator_chosen": "P(cooperator chosen | available)",
    "payoff": "game payoff",
    "learning_reward": "learning (moral) reward",
    "cooperation_rate": "cooperation rate",
    "illegal_rate": "illegal-answer rate",
    "p_cooperate": "P(cooperate)",
    "kl": "KL to base model",
    "policy_loss": "policy loss",
    "value_loss": "value loss",
}
MAX_PANELS = 25


def colour_map(names: Sequence[str]) -> dict[str, str]:
    """Stable colours: the same type gets the same colour in every figure of a report."""
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(sorted(set(names)))}


def _wrap_titles(fig: Figure) -> None:
    """Wrap titles to their axes' width: population strings make long titles that would be cut off."""
    for ax in fig.axes:
        chars = max(20, int(ax.get_position().width * fig.get_figwidth() * 11))
        if len(ax.get_title()) > chars:
            ax.set_title(textwrap.fill(ax.get_title(), chars))
    sup = fig.get_suptitle()
    if sup and len(sup) > fig.get_figwidth() * 11:
        fig.suptitle(textwrap.fill(sup, int(fig.get_figwidth() * 11)))


def save(fig: Figure, path: Path, dpi: int = 150) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _wrap_titles(fig)
    fig.savefig(path, dpi=dpi)  # constrained layout already fits labels and legends
    return path


def band(ax: Axes, df: pl.DataFrame, label: str, colour: str | None = None, linestyle: str = "-") -> None:
    df = df.sort("iteration")
    x = df["iteration"].to_numpy()
    (line,) = ax.plot(x, df["mean"].to_numpy(), label=label, color=colour, linewidth=1.4, linestyle=linestyle)
    lo, hi = df["ci_low"].to_numpy(), df["ci_high"].to_numpy()
    if not np.all(np.isnan(lo.astype(float))):
        ax.fill_between(x, lo.astype(float), hi.astype(float), color=line.get_color(), alpha=0.2, linewidth=0)


def _grid(n: int, width: float = 4.2, height: float = 3.0, max_cols: int | None = None,
          legend_width: float = 0.0) -> tuple[Figure, list[Axes]]:
    """n panels of width x height, 3 columns (5 beyond 9 panels, or at most max_cols), plus legend_width for a
    legend outside the panels; the unused cells hidden."""
    cols = min(n, max_cols) if max_cols else (min(n, 3) if n <= 9 else min(n, 5))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols + legend_width, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _xlabel(bin_size: int) -> str:
    return "iteration" if bin_size <= 1 else f"iteration (bins of {bin_size})"


def rate_axis(ax: Axes, ylabel: str) -> None:
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_cooperation(
    df: pl.DataFrame, title: str = "", by: str = "type", bin_size: int = 1, colours: Mapping[str, str] | None = None
) -> Figure:
    """Cooperation rate over iterations, one line per type (or per agent with by="agent")."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colours = colours or colour_map(df["type"].cast(pl.String).to_list())
    keys = ["agent", "type"] if by == "agent" else ["type"]
    for key, part in sorted(df.group_by(keys, maintain_order=True), key=lambda kv: tuple(str(k) for k in kv[0])):
        label = f"{key[0]} ({key[1]})" if by == "agent" else str(key[0])
        band(ax, part, label, None if by == "agent" else colours.get(str(key[-1])))
    rate_axis(ax, "cooperation rate")
    ax.set_xlabel(_xlabel(bin_size))
    ax.set_title(title or ("Cooperation per agent" if by == "agent" else "Cooperation per moral type"))
    ax.legend(title="agent (type)" if by == "agent" else "type", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncols=2 if len(ax.lines) > 12 else 1)
    return fig


def plot_social_outcomes(df: pl.DataFrame, title: str = "", bin_size: int = 1) -> Figure:
    """Collective payoff, equality and min payoff per game over iterations."""
    metrics = ["collective_payoff", "equality", "min_payoff"]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, metrics, strict=True):
        band(ax, df.filter(pl.col("metric") == metric), "mean over runs", "#333333")
        ax.set_title(METRIC_LABELS[metric])
        ax.set_xlabel(_xlabel(bin_size))
        ax.set_ylabel("per game")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Social outcomes")
    return fig


def _matrix(df: pl.DataFrame, rows: str, cols: str, value: str) -> tuple[list[str], list[str], np.ndarray]:
    r = sorted(df[rows].cast(pl.String).unique().to_list())
    c = sorted(df[cols].cast(pl.String).unique().to_list())
    m = np.full((len(r), len(c)), np.nan)
    for a, b, v in df.select(pl.col(rows).cast(pl.String), pl.col(cols).cast(pl.String), value).iter_rows():
        m[r.index(a), c.index(b)] = np.nan if v is None else v
    return r, c, m


def heatmap(ax: Axes, r: list[str], c: list[str], m: np.ndarray, cmap: str, label: str) -> None:
    im = ax.imshow(m, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(c)), c, rotation=45 if max(map(len, c), default=0) > 4 else 0, ha="right")
    ax.set_yticks(range(len(r)), r)
    if m.size <= 400:
        for i in range(len(r)):
            for j in range(len(c)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if m[i, j] > 0.6 else "black")
    ax.figure.colorbar(im, ax=ax, label=label)


def plot_selection_matrix(df: pl.DataFrame, title: str = "") -> Figure:
    """Heatmap: share of each selector type's choices that went to each selected type (rows sum to 1)."""
    r, c, m = _matrix(df, "selector_type", "selected_type", "fraction")
    fig = Figure(figsize=(1.2 * len(c) + 3, 0.8 * len(r) + 2), layout="constrained")
    ax = fig.add_subplot()
    heatmap(ax, r, c, m, "Blues", "share of selections")
    ax.set_xlabel("selected type")
    ax.set_ylabel("selector type")
    ax.set_title(title or "Partner selection")
    return fig


def plot_selection_over_time(df: pl.DataFrame, title: str = "", bin_size: int = 1,
                             colours: Mapping[str, str] | None = None) -> Figure:
    """One panel per selector type: share of its choices going to each selected type over iterations."""
    selectors = sorted(df["selector_type"].unique().to_list())
    colours = colours or colour_map(df["selected_type"].to_list())
    fig, axes = _grid(len(selectors))
    for ax, sel in zip(axes, selectors, strict=True):
        part = df.filter(pl.col("selector_type") == sel)
        for (target,), p in sorted(part.group_by(["selected_type"]), key=lambda kv: str(kv[0][0])):
            p = p.sort("iteration")
            ax.plot(p["iteration"], p["fraction"], label=str(target), color=colours.get(str(target)))
        rate_axis(ax, "share of selections")
        ax.set_xlabel(_xlabel(bin_size))
        ax.set_title(f"{sel} selects")
        ax.legend(title="selected type", fontsize=7)
    fig.suptitle(title or "Partner selection over time")
    return fig


def plot_cooperator_choice(df: pl.DataFrame, title: str = "", bin_size: int = 1,
                           colours: Mapping[str, str] | None = None) -> Figure:
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    colours = colours or colour_map(df["selector_type"].to_list())
    for ax, metric in zip(axes, ["cooperator_available", "cooperator_chosen"], strict=True):
        part = df.filter(pl.col("metric") == metric)
        for (sel,), p in sorted(part.group_by(["selector_type"]), key=lambda kv: str(kv[0][0])):
            band(ax, p, str(sel), colours.get(str(sel)))
        rate_axis(ax, "probability")
        ax.set_xlabel(_xlabel(bin_size))
        ax.set_title(METRIC_LABELS[metric])
    axes[0].legend(title="selector type", fontsize=8)
    fig.suptitle(title or "Was a cooperator available, and was one chosen?")
    return fig


def plot_outcome_mix(df: pl.DataFrame, title: str = "") -> Figure:
    """Stacked bars: CC / CD / DC / DD share of the games of each ordered type pair (selector -> selected)."""
    pairs = df.select("selector_type", "selected_type").unique().sort(["selector_type", "selected_type"]).rows()
    fig = Figure(figsize=(8, 0.45 * len(pairs) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(pairs))
    left = np.zeros(len(pairs))
    lookup = {(a, b, o): f for a, b, o, f in df.select("selector_type", "selected_type", "outcome", "fraction").rows()}
    for o in OUTCOMES:
        w = np.array([lookup.get((a, b, o)) or 0.0 for a, b in pairs])
        ax.barh(y, w, left=left, color=_OUTCOME_COLOURS[o], label=_OUTCOME_LABELS[o])
        left += w
    ax.set_yticks(y, [f"{a} → {b}" for a, b in pairs])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of games")
    ax.set_ylabel("selector type → selected type")
    ax.set_title(title or "Outcome mix per pair of types")
    fig.legend(fontsize=8, loc="outside lower center", ncols=4)
    return fig


def _per_agent_panels(df: pl.DataFrame, metrics: Sequence[str], title: str, bin_size: int) -> Figure:
    agents = df.select("agent", "type").unique().sort("agent").rows()
    if len(agents) > MAX_PANELS:
        log.info("%s: showing the first %d of %d agents", title, MAX_PANELS, len(agents))
        agents = agents[:MAX_PANELS]
    fig, axes = _grid(len(agents), 4.0, 2.8)
    for ax, (agent, typ) in zip(axes, agents, strict=True):
        part = df.filter(pl.col("agent") == agent)
        for metric, style in zip(metrics, ["-", "--", ":", "-."], strict=False):
            p = part.filter(pl.col("metric") == metric).drop_nulls("mean")
            if p.height:
                band(ax, p, METRIC_LABELS.get(metric, metric), linestyle=style)
        ax.set_title(f"agent {agent} ({typ})")
        ax.set_xlabel(_xlabel(bin_size))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def plot_reward_vs_payoff(df: pl.DataFrame, title: str = "", bin_size: int = 1) -> Figure:
    """Per agent: the game payoff it received against the reward it learned from."""
    return _per_agent_panels(df, ["payoff", "learning_reward"], title or "Learning reward against game payoff", bin_size)


def plot_llm_episodes(df: pl.DataFrame, title: str = "", bin_size: int = 1) -> Figure:
    """Two panels over episodes, one line per LLM agent: its cooperation rate (over its legal answers) and its
    illegal-answer rate."""
    agents = sorted(df.select("agent", "type").unique().rows(), key=lambda r: r[0])
    labels = {a: f"{a} ({t})" for a, t in agents}
    colours = colour_map(list(labels.values()))
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ["cooperation_rate", "illegal_rate"], strict=True):
        part = df.filter(pl.col("metric") == metric)
        for agent, _ in agents:
            p = part.filter(pl.col("agent") == agent).drop_nulls("mean")
            if p.height:
                band(ax, p, labels[agent], colours[labels[agent]])
        rate_axis(ax, METRIC_LABELS[metric])
        ax.set_xlabel(_xlabel(bin_size).replace("iteration", "episode"))
        ax.set_title(METRIC_LABELS[metric] + (" (legal answers)" if metric == "cooperation_rate" else ""))
    if axes[0].lines:
        axes[0].legend(title="LLM agent (type)", fontsize=8)
    fig.suptitle(title or "LLM agents per episode")
    return fig


def plot_llm_training(df: pl.DataFrame, title: str = "", bin_size: int = 1) -> Figure:
    """One panel per LLM metric (illegal rate, P(cooperate), KL, losses), one line per LLM agent."""
    metrics = [m for m in ("illegal_rate", "p_cooperate", "kl", "policy_loss", "value_loss")
               if df.filter(pl.col("metric") == m).height]
    fig, axes = _grid(max(1, len(metrics)))
    for ax, metric in zip(axes, metrics, strict=False):
        part = df.filter(pl.col("metric") == metric)
        for (agent, typ), p in sorted(part.group_by(["agent", "type"]), key=lambda kv: kv[0][0]):
            band(ax, p, f"{agent} ({typ})")
        ax.set_title(METRIC_LABELS[metric])
        ax.set_xlabel(_xlabel(bin_size))  # iterations: under the pair protocol an update spans an episode
        ax.grid(alpha=0.3)
        if metric in ("illegal_rate", "p_cooperate"):
            ax.set_ylim(-0.03, 1.03)
        ax.legend(title="agent (type)", fontsize=7)
    fig.suptitle(title or "LLM fine-tuning")
    return fig


def plot_generalisation(df: pl.DataFrame, title: str = "") -> Figure:
    """Two heatmaps, model/adapter x game: cooperation rate and illegal-answer rate of the evaluation suite."""
    row_keys = [c for c in ("model", "adapter") if c in df.columns]
    other = [c for c in df.columns if c not in {*row_keys, "n", "cooperation_rate", "cooperation_rate_legal",
                                                  "illegal_rate"}]
    # Pool whatever finer keys (tokens, prompt variant) into the (model, game) cell, weighting by answers.
    cell = (
        df.with_columns(
            pl.concat_str([pl.col(c).cast(pl.String) for c in row_keys], separator=" / ").alias("_row"),
            pl.concat_str([pl.col(c).cast(pl.String) for c in other], separator=" / ").alias("_col"),
        )
        .group_by("_row", "_col")
        .agg(
            ((pl.col("cooperation_rate") * pl.col("n")).sum() / pl.col("n").sum()).alias("cooperation_rate"),
            ((pl.col("illegal_rate") * pl.col("n")).sum() / pl.col("n").sum()).alias("illegal_rate"),
        )
    )
    r, c, coop = _matrix(cell, "_row", "_col", "cooperation_rate")
    _, _, illegal = _matrix(cell, "_row", "_col", "illegal_rate")
    fig = Figure(figsize=(2 * (1.0 * len(c) + 2.5), 0.6 * len(r) + 2.2), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    heatmap(a1, r, c, coop, "Greens", "cooperation rate")
    heatmap(a2, r, c, illegal, "Reds", "illegal-answer rate")
    for ax, t in ((a1, "cooperation rate"), (a2, "illegal-answer rate")):
        ax.set_xlabel(" / ".join(other))
        ax.set_ylabel(" / ".join(row_keys))
        ax.set_title(t)
    fig.suptitle(title or "Generalisation across games (evaluation suite)")
    return fig


# ---- comparisons across destination folders -------------------------------------------------------------------


def plot_cooperation_grid(frames: Mapping[str, pl.DataFrame], bin_size: int = 1, title: str = "") -> Figure:
    """Small multiples: one panel per folder (e.g. the nine AIES populations), cooperation per type, shared axes."""
    colours = colour_map([t for df in frames.values() for t in df["type"].to_list()])
    fig, axes = _grid(len(frames))
    for ax, (label, df) in zip(axes, frames.items(), strict=True):
        for (typ,), part in sorted(df.group_by(["type"]), key=lambda kv: str(kv[0][0])):
            band(ax, part, str(typ), colours[str(typ)])
        rate_axis(ax, "cooperation rate")
        ax.set_xlabel(_xlabel(bin_size))
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7, title="type", title_fontsize=7)
    fig.suptitle(title or "Cooperation per moral type, by population")
    return fig


def plot_learner_comparison(frames: Mapping[str, pl.DataFrame], bin_size: int = 1, title: str = "") -> Figure:
    """One plot, one line per (folder, learning type): e.g. several LLM reward types against the same opponent.
    Static strategies are left out; they do not learn."""
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, df in frames.items():
        learners = df.filter(~pl.col("type").is_in(list(STATIC_CODES)))
        types = sorted(learners["type"].unique().to_list())
        for typ in types:
            name = label if len(types) == 1 else f"{label}: {typ}"
            band(ax, learners.filter(pl.col("type") == typ), name)
    rate_axis(ax, "cooperation rate")
    ax.set_xlabel(_xlabel(bin_size))
    ax.set_title(title or "Cooperation of the learning agents, by run folder")
    ax.legend(fontsize=8, title="folder (type)")
    return fig


def plot_social_comparison(frames: Mapping[str, pl.DataFrame], bin_size: int = 1, title: str = "") -> Figure:
    """Social outcomes of several folders, one line per folder."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, metric in zip(axes, ["collective_payoff", "equality", "min_payoff"], strict=True):
        for label, df in frames.items():
            band(ax, df.filter(pl.col("metric") == metric), label)
        ax.set_title(METRIC_LABELS[metric])
        ax.set_xlabel(_xlabel(bin_size))
        ax.set_ylabel("per game")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=7, title="folder")
    fig.suptitle(title or "Social outcomes, by run folder")
    return fig
