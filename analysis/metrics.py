"""Metrics over the interaction records. Each takes a polars LazyFrame of `simulator.schema` records (plus the hive
column `run`) and returns a LazyFrame; collect it with `engine="streaming"` to keep memory flat on large sweeps.

Conventions shared by every metric:
- `iteration` in an output is the first iteration of its bin: `iteration // bin_size * bin_size`. With `bin_size=1`
  (the default) it is the iteration itself. A binned value pools all games of the bin.
- "over runs" metrics are computed per run first, then summarised across runs as `mean`, `ci_low`, `ci_high` (a 95%
  Student-t interval: mean ± t(0.975, n_runs - 1) · std / sqrt(n_runs)) and `n_runs`. With one run the interval is
  null.
- An agent's move counts in both roles: as selector (M) and each time it was selected (O). Cooperation is action 0.
- Type columns come out as String, whatever the dictionary/Categorical encoding on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl

from simulator.errors import MoralsimError

ROLES = ("selector", "selected")
OUTCOMES = ("CC", "CD", "DC", "DD")  # selector's move first
_T_975 = {  # two-sided 95% Student-t quantiles by degrees of freedom
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
    21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}
SUMMARY_COLUMNS = ("mean", "ci_low", "ci_high", "n_runs")


def t_quantile_975(df: int) -> float:
    """t(0.975, df); beyond the table, the Cornish-Fisher expansion z + (z^3 + z) / (4 df), within 0.002."""
    if df < 1:
        return math.nan
    if df in _T_975:
        return _T_975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


def _t_expr(n: pl.Expr) -> pl.Expr:
    df = n - 1
    table = df.replace_strict(_T_975, default=None, return_dtype=pl.Float64)
    return pl.when(df > 30).then(1.959964 + (1.959964**3 + 1.959964) / (4 * df.cast(pl.Float64))).otherwise(table)


def iteration_bin(bin_size: int = 1) -> pl.Expr:
    """The first iteration of each row's bin, named `iteration`."""
    if not isinstance(bin_size, int) or bin_size < 1:
        raise MoralsimError(f"bin_size must be a positive integer, got {bin_size!r}")
    if bin_size == 1:
        return pl.col("iteration")
    return (pl.col("iteration") // bin_size * bin_size).cast(pl.Int32).alias("iteration")


def episode_bin(episode_length: int = 1, bin_size: int = 1) -> pl.Expr:
    """Each row's episode, `iteration // episode_length`, as the first episode of its bin of `bin_size` episodes,
    named `episode`. One episode is `episode_length` iterations: in the paper's protocol, batch_size games and then
    one PPO update (the manifest's `config.episode_length`; 1 where it is absent, one update per iteration)."""
    for name, v in (("episode_length", episode_length), ("bin_size", bin_size)):
        if not isinstance(v, int) or v < 1:
            raise MoralsimError(f"{name} must be a positive integer, got {v!r}")
    return (pl.col("iteration") // episode_length // bin_size * bin_size).cast(pl.Int32).alias("episode")


def across_runs(per_run: pl.LazyFrame, keys: Sequence[str], value: str = "value") -> pl.LazyFrame:
    """Summarise a per-run value across runs: mean, 95% t interval, number of runs with a non-null value."""
    v = pl.col(value)
    half = _t_expr(pl.col("n_runs")) * pl.col("_std") / pl.col("n_runs").cast(pl.Float64).sqrt()
    return (
        per_run.group_by(list(keys))
        .agg(mean=v.mean(), _std=v.std(), n_runs=v.count().cast(pl.Int32))
        .with_columns(ci_low=pl.col("mean") - half, ci_high=pl.col("mean") + half)
        .select(*keys, *SUMMARY_COLUMNS)
        .sort(list(keys))
    )


def agent_games(lf: pl.LazyFrame, extra: Sequence[str] = ()) -> pl.LazyFrame:
    """One row per agent per game it played, in either role: run, iteration, agent, type, role, action, payoff,
    learning_reward, and `extra` per-role columns (given without the role prefix, e.g. "legal")."""

    def side(role: str) -> pl.LazyFrame:
        return lf.select(
            pl.col("run"),
            pl.col("iteration"),
            pl.col(role).alias("agent"),
            pl.col(f"{role}_type").cast(pl.String).alias("type"),
            pl.lit(role).alias("role"),
            pl.col(f"{role}_action").alias("action"),
            pl.col(f"{role}_payoff").alias("payoff"),
            pl.col(f"{role}_learning_reward").alias("learning_reward"),
            *[pl.col(f"{role}_{c}").alias(c) for c in extra],
        )

    return pl.concat([side(r) for r in ROLES], how="vertical")


def _cooperation(lf: pl.LazyFrame, keys: list[str], bin_size: int) -> pl.LazyFrame:
    per_run = (
        agent_games(lf)
        .group_by("run", iteration_bin(bin_size), *keys)
        .agg(value=(pl.col("action") == 0).mean())
    )
    return across_runs(per_run, [*keys, "iteration"])


def cooperation_by_type(lf: pl.LazyFrame, bin_size: int = 1) -> pl.LazyFrame:
    """Share of C among all moves of each type's agents per iteration (bin), over runs.
    Columns: type, iteration, mean, ci_low, ci_high, n_runs."""
    return _cooperation(lf, ["type"], bin_size)


def cooperation_by_agent(lf: pl.LazyFrame, bin_size: int = 1) -> pl.LazyFrame:
    """Share of C among each agent's moves per iteration (bin), over runs.
    Columns: agent, type, iteration, mean, ci_low, ci_high, n_runs."""
    return _cooperation(lf, ["agent", "type"], bin_size)


def social_outcomes(lf: pl.LazyFrame, bin_size: int = 1) -> pl.LazyFrame:
    """Per-game collective payoff (R_M + R_O), equality (1 - Gini of the two payoffs) and min payoff, averaged over
    the games of each iteration (bin), over runs. Every iteration has N games, so the population's summed collective
    payoff is N x this mean. Columns: metric, iteration, mean, ci_low, ci_high, n_runs."""
    metrics = ["collective_payoff", "equality", "min_payoff"]
    per_run = (
        lf.group_by("run", iteration_bin(bin_size))
        .agg(pl.col(m).cast(pl.Float64).mean() for m in metrics)
        .unpivot(index=["run", "iteration"], on=metrics, variable_name="metric", value_name="value")
    )
    return across_runs(per_run, ["metric", "iteration"])


def selection_matrix(lf: pl.LazyFrame, bin_size: int | None = None) -> pl.LazyFrame:
    """How often agents of each type select agents of each type, pooled over runs and agents.
    `fraction` is the share of the selector type's choices (rows sum to 1). With `bin_size`, one matrix per bin.
    Columns: [iteration,] selector_type, selected_type, count, fraction."""
    time = [iteration_bin(bin_size)] if bin_size else []
    group = ["iteration"] if bin_size else []
    return (
        lf.group_by(*time, "selector_type", "selected_type")
        .agg(count=pl.len().cast(pl.Int64))
        .with_columns(pl.col("selector_type", "selected_type").cast(pl.String))
        .with_columns(fraction=pl.col("count") / pl.col("count").sum().over([*group, "selector_type"]))
        .sort([*group, "selector_type", "selected_type"])
    )


def cooperator_choice(lf: pl.LazyFrame, bin_size: int = 1) -> pl.LazyFrame:
    """Per selector type: `cooperator_available`, the share of selections with at least one cooperator (last move C)
    to pick from, and `cooperator_chosen`, the share of those selections that picked one (the chosen partner's last
    move is the selector's dilemma state). Columns: selector_type, metric, iteration, mean, ci_low, ci_high, n_runs."""
    available = pl.col("selector_available_c") > 0
    per_run = (
        lf.group_by("run", iteration_bin(bin_size), "selector_type")
        .agg(
            cooperator_available=available.mean().cast(pl.Float64),
            cooperator_chosen=(pl.col("selector_state") == 0).filter(available).mean().cast(pl.Float64),
        )
        .with_columns(pl.col("selector_type").cast(pl.String))
        .unpivot(
            index=["run", "iteration", "selector_type"],
            on=["cooperator_available", "cooperator_chosen"],
            variable_name="metric",
            value_name="value",
        )
    )
    return across_runs(per_run, ["selector_type", "metric", "iteration"])


def outcome_mix(lf: pl.LazyFrame, bin_size: int | None = None) -> pl.LazyFrame:
    """Outcome counts per ordered pair of types, from the selector's side: "DC" = the selector defected on a
    cooperating partner (exploitation). Pooled over runs; every outcome appears, with count 0 if never seen.
    Columns: [iteration,] selector_type, selected_type, outcome, count, fraction (of the pair's games)."""
    time = [iteration_bin(bin_size)] if bin_size else []
    group = ["iteration"] if bin_size else []
    code = pl.col("selector_action").cast(pl.Int8) * 2 + pl.col("selected_action").cast(pl.Int8)
    keys = [*group, "selector_type", "selected_type"]
    return (
        lf.group_by(*time, "selector_type", "selected_type")
        .agg(_n=pl.len().cast(pl.Int64), **{o: (code == i).sum().cast(pl.Int64) for i, o in enumerate(OUTCOMES)})
        .with_columns(pl.col("selector_type", "selected_type").cast(pl.String))
        .unpivot(index=[*keys, "_n"], on=list(OUTCOMES), variable_name="outcome", value_name="count")
        .with_columns(fraction=pl.col("count") / pl.col("_n"))
        .drop("_n")
        .sort([*keys, "outcome"])
    )


def reward_vs_payoff(lf: pl.LazyFrame, bin_size: int = 1) -> pl.LazyFrame:
    """Each agent's mean game payoff and mean learning reward (its moral reward; R_illegal for illegal LLM answers)
    per iteration (bin), over runs. Static agents have no learning reward (n_runs 0, null mean).
    Columns: agent, type, metric ("payoff" | "learning_reward"), iteration, mean, ci_low, ci_high, n_runs."""
    per_run = (
        agent_games(lf)
        .group_by("run", iteration_bin(bin_size), "agent", "type")
        .agg(pl.col("payoff").cast(pl.Float64).mean(), pl.col("learning_reward").cast(pl.Float64).mean())
        .unpivot(
            index=["run", "iteration", "agent", "type"],
            on=["payoff", "learning_reward"],
            variable_name="metric",
            value_name="value",
        )
    )
    return across_runs(per_run, ["agent", "type", "metric", "iteration"])


LLM_METRICS = ("illegal_rate", "p_cooperate", "kl", "policy_loss", "value_loss")
LLM_COLUMNS = ("legal", "p_cooperate", "kl", "policy_loss", "value_loss")  # per role: selector_<c>, selected_<c>


def _require_llm_columns(lf: pl.LazyFrame, metric: str) -> None:
    need = [f"{r}_{c}" for r in ROLES for c in LLM_COLUMNS]
    missing = sorted(set(need) - set(lf.collect_schema().names()))
    if missing:
        raise MoralsimError(f"{metric} needs the LLM columns of simulator.schema.LLM_RECORD_SCHEMA; missing {missing}")


def llm_training(lf: pl.LazyFrame, bin_size: int = 1) -> pl.LazyFrame:
    """LLM agents over training iterations, from their rows in both roles: `illegal_rate` (share of answers that were
    not a legal action token), mean `p_cooperate`, and the `kl`, `policy_loss`, `value_loss` of the agent's latest
    update before each game. The x axis is the iteration, not the update: an update comes every iteration in the
    population protocol and every `episode_length` iterations in the pair protocol. Only agents with LLM data appear.
    Columns: agent, type, metric, iteration, mean, ci_low, ci_high, n_runs."""
    _require_llm_columns(lf, "llm_training")
    per_run = (
        agent_games(lf, extra=LLM_COLUMNS)
        .group_by("run", iteration_bin(bin_size), "agent", "type")
        .agg(
            illegal_rate=1.0 - pl.col("legal").cast(pl.Float64).mean(),
            **{c: pl.col(c).cast(pl.Float64).mean() for c in LLM_METRICS[1:]},
        )
        .unpivot(index=["run", "iteration", "agent", "type"], on=list(LLM_METRICS), variable_name="metric",
                 value_name="value")
        .drop_nulls("value")
    )
    return across_runs(per_run, ["agent", "type", "metric", "iteration"])


LLM_EPISODE_METRICS = ("cooperation_rate", "illegal_rate", "p_cooperate")
# Over the rows of an LLM agent's answers (`legal` not null). An illegal answer is no choice between C and D: the
# move recorded for it is a stand-in (the agent's previous legal move), so cooperation counts legal answers only,
# as the paper's figures do, and the illegal answers are a rate of their own.
LLM_ANSWER_RATES = {
    "cooperation_rate": (pl.col("action") == 0).filter(pl.col("legal")).cast(pl.Float64).mean(),
    "illegal_rate": 1.0 - pl.col("legal").cast(pl.Float64).mean(),
}


def llm_episodes(lf: pl.LazyFrame, bin_size: int = 1, episode_length: int = 1) -> pl.LazyFrame:
    """LLM agents per episode, over all their answers in both roles (rows with an LLM answer, i.e. non-null
    `legal`): `cooperation_rate`, the share of C among their legal answers; `illegal_rate`, the share of answers
    that were not a legal action token; and mean `p_cooperate`. `iteration` in the output is the episode
    (`iteration // episode_length`, binned by `bin_size` episodes). Only LLM agents appear; an episode bin without
    a legal answer has no cooperation rate in that run. Columns: agent, type, metric, iteration, mean, ci_low,
    ci_high, n_runs."""
    _require_llm_columns(lf, "llm_episodes")
    per_run = (
        agent_games(lf, extra=("legal", "p_cooperate"))
        .filter(pl.col("legal").is_not_null())
        .group_by("run", episode_bin(episode_length, bin_size).alias("iteration"), "agent", "type")
        .agg(**LLM_ANSWER_RATES, p_cooperate=pl.col("p_cooperate").cast(pl.Float64).mean())
        .unpivot(index=["run", "iteration", "agent", "type"], on=list(LLM_EPISODE_METRICS), variable_name="metric",
                 value_name="value")
        .drop_nulls("value")
    )
    return across_runs(per_run, ["agent", "type", "metric", "iteration"])


def generalisation_matrix(lf: pl.LazyFrame, by: Sequence[str] = ("game",)) -> pl.LazyFrame:
    """The evaluation suite's matrix: one cell per model/adapter and `by` (e.g. ("game", "action_tokens",
    "prompt_variant")). `cooperation_rate` = C answers / all answers (an illegal answer is not a C);
    `cooperation_rate_legal` = C answers / legal answers; `illegal_rate` = illegal / all.
    Columns: [model,] [adapter,] *by, n, cooperation_rate, cooperation_rate_legal, illegal_rate."""
    names = lf.collect_schema().names()
    keys = [c for c in ("model", "adapter") if c in names] + list(by)
    missing = sorted({*by, "legal", "action"} - set(names))
    if missing or not any(c in names for c in ("model", "adapter")):
        raise MoralsimError(
            f"generalisation_matrix needs model and/or adapter, legal, action and {list(by)}; missing "
            f"{missing or ['model/adapter']}, has {names}"
        )
    is_c = (pl.col("action") == 0) & pl.col("legal")
    return (
        lf.group_by(keys)
        .agg(
            n=pl.len().cast(pl.Int64),
            cooperation_rate=is_c.cast(pl.Float64).mean(),
            cooperation_rate_legal=is_c.filter(pl.col("legal")).cast(pl.Float64).mean(),
            illegal_rate=1.0 - pl.col("legal").cast(pl.Float64).mean(),
        )
        .sort(keys)
    )
