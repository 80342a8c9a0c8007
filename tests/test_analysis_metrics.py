"""Every metric of analysis.metrics against frames built by hand (polars.testing.assert_frame_equal)."""

from __future__ import annotations

import math
import statistics

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analysis import metrics as m
from simulator.errors import MoralsimError

T1 = 12.706  # t(0.975, 1): two runs


def games(rows: list[tuple], categorical: bool = False) -> pl.LazyFrame:
    """Records with the columns the game metrics read. Row: (run, iteration, selector, selected, selector_type,
    selected_type, selector_action, selected_action, selector_payoff, selected_payoff, selector_learning_reward,
    selected_learning_reward, selector_state, selector_available_c)."""
    cols = [
        "run",
        "iteration",
        "selector",
        "selected",
        "selector_type",
        "selected_type",
        "selector_action",
        "selected_action",
        "selector_payoff",
        "selected_payoff",
        "selector_learning_reward",
        "selected_learning_reward",
        "selector_state",
        "selector_available_c",
    ]
    df = pl.DataFrame(rows, schema=cols, orient="row").with_columns(
        pl.col("run", "iteration", "selector", "selected").cast(pl.Int32),
        pl.col("selector_action", "selected_action", "selector_state").cast(pl.Int8),
        pl.col("selector_payoff", "selected_payoff", "selector_learning_reward", "selected_learning_reward").cast(pl.Float32),
        pl.col("selector_available_c").cast(pl.Int16),
    )
    if categorical:  # as read from the dictionary-encoded Parquet columns
        df = df.with_columns(pl.col("selector_type", "selected_type").cast(pl.Categorical))
    return df.lazy()


def summary(keys: dict[str, list], mean: list[float | None], half: list[float | None], n: list[int]) -> pl.DataFrame:
    lo = [None if h is None or mu is None else mu - h for mu, h in zip(mean, half, strict=True)]
    hi = [None if h is None or mu is None else mu + h for mu, h in zip(mean, half, strict=True)]
    return pl.DataFrame(
        {**keys, "mean": mean, "ci_low": lo, "ci_high": hi, "n_runs": n},
        schema_overrides={
            "iteration": pl.Int32,
            "agent": pl.Int32,
            "n_runs": pl.Int32,
            "ci_low": pl.Float64,
            "ci_high": pl.Float64,
        },
    )


# Two runs, one iteration, agents 0 (UT) and 1 (S), each selects the other.
# run 0: UT cooperates twice, S defects twice.  run 1: each cooperates once and defects once.
TWO_RUNS = [
    (0, 0, 0, 1, "UT", "S", 0, 1, 0.0, 4.0, 4.0, 4.0, 1, 0),
    (0, 0, 1, 0, "S", "UT", 1, 0, 4.0, 0.0, 4.0, 4.0, 0, 1),
    (1, 0, 0, 1, "UT", "S", 0, 0, 3.0, 3.0, 6.0, 3.0, 0, 1),
    (1, 0, 1, 0, "S", "UT", 1, 1, 1.0, 1.0, 1.0, 2.0, 1, 0),
]


@pytest.mark.parametrize("categorical", [False, True])
def test_cooperation_by_type_counts_both_roles_and_summarises_runs(categorical: bool) -> None:
    got = m.cooperation_by_type(games(TWO_RUNS, categorical)).collect(engine="streaming")
    # UT: run 0 -> 1.0, run 1 -> 0.5; S: 0.0 and 0.5. std over two runs = 0.25 * sqrt(2), /sqrt(2) -> 0.25.
    want = summary({"type": ["S", "UT"], "iteration": [0, 0]}, [0.25, 0.75], [T1 * 0.25] * 2, [2, 2])
    assert_frame_equal(got, want)


def test_cooperation_by_agent() -> None:
    got = m.cooperation_by_agent(games(TWO_RUNS)).collect()
    want = summary({"agent": [0, 1], "type": ["UT", "S"], "iteration": [0, 0]}, [0.75, 0.25], [T1 * 0.25] * 2, [2, 2])
    assert_frame_equal(got, want)


def test_cooperation_binning_pools_the_games_of_a_bin_and_one_run_has_no_interval() -> None:
    rows = [  # one run, agent 0 (UT) vs 1 (S) once per iteration, iterations 0..3
        (0, t, 0, 1, "UT", "S", a, 1, 0.0, 0.0, 0.0, 0.0, 0, 0) for t, a in enumerate([0, 0, 1, 0])
    ]
    got = m.cooperation_by_type(games(rows), bin_size=2).collect()
    want = summary({"type": ["S", "S", "UT", "UT"], "iteration": [0, 2, 0, 2]}, [0.0, 0.0, 1.0, 0.5], [None] * 4, [1] * 4)
    assert_frame_equal(got, want)


def test_bin_size_must_be_positive() -> None:
    with pytest.raises(MoralsimError, match="bin_size"):
        m.cooperation_by_type(games(TWO_RUNS), bin_size=0)


def test_t_quantile() -> None:
    assert m.t_quantile_975(1) == 12.706
    assert m.t_quantile_975(19) == 2.093
    assert abs(m.t_quantile_975(60) - 2.000) < 0.002
    assert math.isnan(m.t_quantile_975(0))


def test_across_runs_uses_t_interval_beyond_the_table() -> None:
    per_run = pl.LazyFrame({"k": ["a"] * 41, "value": [float(i % 2) for i in range(41)]})
    got = m.across_runs(per_run, ["k"]).collect()
    mean, std = 20 / 41, statistics.stdev([float(i % 2) for i in range(41)])
    half = m.t_quantile_975(40) * std / math.sqrt(41)
    want = pl.DataFrame(
        {"k": ["a"], "mean": [mean], "ci_low": [mean - half], "ci_high": [mean + half], "n_runs": pl.Series([41], dtype=pl.Int32)}
    )
    assert_frame_equal(got, want)


def test_social_outcomes() -> None:
    lf = pl.LazyFrame(
        {
            "run": pl.Series([0, 0, 1, 1], dtype=pl.Int32),
            "iteration": pl.Series([0, 0, 0, 0], dtype=pl.Int32),
            "collective_payoff": pl.Series([6.0, 4.0, 2.0, 2.0], dtype=pl.Float32),
            "equality": pl.Series([1.0, 0.0, 1.0, 1.0], dtype=pl.Float32),
            "min_payoff": pl.Series([3.0, 0.0, 1.0, 1.0], dtype=pl.Float32),
        }
    )
    got = m.social_outcomes(lf).collect(engine="streaming")
    # per run: collective 5 and 2, equality 0.5 and 1, min 1.5 and 1; std of two values = |a - b| / sqrt(2)
    want = summary(
        {"metric": ["collective_payoff", "equality", "min_payoff"], "iteration": [0, 0, 0]},
        [3.5, 0.75, 1.25],
        [T1 * 3 / 2, T1 * 0.5 / 2, T1 * 0.5 / 2],
        [2, 2, 2],
    )
    assert_frame_equal(got, want)


def test_selection_matrix_rows_sum_to_one() -> None:
    rows = [
        (0, 0, 0, 1, "UT", "S", 0, 0, 0, 0, 0, 0, 0, 0),
        (0, 0, 1, 0, "S", "UT", 0, 0, 0, 0, 0, 0, 0, 0),
        (0, 0, 2, 1, "S", "S", 0, 0, 0, 0, 0, 0, 0, 0),
        (0, 1, 0, 2, "UT", "S", 0, 0, 0, 0, 0, 0, 0, 0),
        (0, 1, 1, 2, "S", "S", 0, 0, 0, 0, 0, 0, 0, 0),
        (0, 1, 2, 1, "S", "S", 0, 0, 0, 0, 0, 0, 0, 0),
    ]
    got = m.selection_matrix(games(rows, categorical=True)).collect()
    want = pl.DataFrame(
        {"selector_type": ["S", "S", "UT"], "selected_type": ["S", "UT", "S"], "count": [3, 1, 2], "fraction": [0.75, 0.25, 1.0]}
    )
    assert_frame_equal(got, want)
    over_time = m.selection_matrix(games(rows), bin_size=1).collect()
    want_t = pl.DataFrame(
        {
            "iteration": pl.Series([0, 0, 0, 1, 1], dtype=pl.Int32),
            "selector_type": ["S", "S", "UT", "S", "UT"],
            "selected_type": ["S", "UT", "S", "S", "S"],
            "count": [1, 1, 1, 2, 1],
            "fraction": [0.5, 0.5, 1.0, 1.0, 1.0],
        }
    )
    assert_frame_equal(over_time, want_t)


def test_cooperator_choice() -> None:
    rows = [  # one run; (selector_state = chosen partner's last move, selector_available_c)
        (0, 0, 0, 1, "UT", "S", 0, 0, 0, 0, 0, 0, 0, 2),  # available, chose a cooperator
        (0, 0, 1, 0, "UT", "S", 0, 0, 0, 0, 0, 0, 1, 1),  # available, chose a defector
        (0, 0, 2, 0, "UT", "S", 0, 0, 0, 0, 0, 0, 1, 0),  # none available
        (0, 0, 3, 0, "S", "UT", 0, 0, 0, 0, 0, 0, 1, 0),  # none available: chosen is undefined (null)
    ]
    got = m.cooperator_choice(games(rows)).collect()
    want = summary(
        {
            "selector_type": ["S", "S", "UT", "UT"],
            "metric": ["cooperator_available", "cooperator_chosen", "cooperator_available", "cooperator_chosen"],
            "iteration": [0, 0, 0, 0],
        },
        [0.0, None, 2 / 3, 0.5],
        [None] * 4,
        [1, 0, 1, 1],
    )
    assert_frame_equal(got, want)


def test_outcome_mix_lists_every_outcome() -> None:
    rows = [
        (0, 0, 0, 1, "UT", "S", 0, 1, 0, 0, 0, 0, 0, 0),  # CD: UT exploited
        (0, 0, 1, 0, "S", "UT", 1, 0, 0, 0, 0, 0, 0, 0),  # DC: S exploits
        (1, 0, 1, 0, "S", "UT", 1, 0, 0, 0, 0, 0, 0, 0),  # DC
        (1, 0, 0, 1, "UT", "S", 0, 0, 0, 0, 0, 0, 0, 0),  # CC
    ]
    got = m.outcome_mix(games(rows)).collect(engine="streaming")
    want = pl.DataFrame(
        {
            "selector_type": ["S"] * 4 + ["UT"] * 4,
            "selected_type": ["UT"] * 4 + ["S"] * 4,
            "outcome": ["CC", "CD", "DC", "DD"] * 2,
            "count": [0, 0, 2, 0, 1, 1, 0, 0],
            "fraction": [0.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0],
        }
    )
    assert_frame_equal(got, want)


def test_reward_vs_payoff_static_agent_has_no_learning_reward() -> None:
    rows = [  # agent 0 UT (learner) and agent 1 TFT (static: null reward), one run, one iteration
        (0, 0, 0, 1, "UT", "TFT", 0, 0, 3.0, 3.0, 6.0, None, 0, 1),
        (0, 0, 1, 0, "TFT", "UT", 1, 0, 4.0, 0.0, None, 4.0, 0, 1),
    ]
    got = m.reward_vs_payoff(games(rows)).collect()
    want = summary(
        {
            "agent": [0, 0, 1, 1],
            "type": ["UT", "UT", "TFT", "TFT"],
            "metric": ["learning_reward", "payoff", "learning_reward", "payoff"],
            "iteration": [0] * 4,
        },
        [5.0, 1.5, None, 3.5],
        [None] * 4,
        [1, 1, 0, 1],
    )
    assert_frame_equal(got, want)


def llm_records() -> pl.LazyFrame:
    """Agent 0 is an LLM (Ut), agent 1 a static TFT; one run, iterations 0 and 1."""
    return games(
        [
            (0, 0, 0, 1, "Ut", "TFT", 1, 0, 4.0, 0.0, -6.0, None, 0, 1),
            (0, 0, 1, 0, "TFT", "Ut", 0, 0, 3.0, 3.0, None, 6.0, 0, 1),
            (0, 1, 0, 1, "Ut", "TFT", 0, 0, 3.0, 3.0, 6.0, None, 0, 1),
            (0, 1, 1, 0, "TFT", "Ut", 0, 0, 3.0, 3.0, None, 6.0, 0, 1),
        ]
    ).with_columns(
        selector_legal=pl.Series([False, None, True, None]),
        selected_legal=pl.Series([None, True, None, True]),
        selector_p_cooperate=pl.Series([0.2, None, 0.8, None], dtype=pl.Float32),
        selected_p_cooperate=pl.Series([None, 0.6, None, 0.9], dtype=pl.Float32),
        selector_kl=pl.Series([None, None, 0.5, None], dtype=pl.Float32),  # no update before iteration 0
        selected_kl=pl.Series([None, None, None, 0.3], dtype=pl.Float32),
        selector_policy_loss=pl.Series([None, None, 0.5, None], dtype=pl.Float32),
        selected_policy_loss=pl.Series([None, None, None, 0.5], dtype=pl.Float32),
        selector_value_loss=pl.Series([None, None, 1.0, None], dtype=pl.Float32),
        selected_value_loss=pl.Series([None, None, None, 1.0], dtype=pl.Float32),
    )


def test_llm_training() -> None:
    got = m.llm_training(llm_records()).collect(engine="streaming")
    metrics = ["illegal_rate", "illegal_rate", "kl", "p_cooperate", "p_cooperate", "policy_loss", "value_loss"]
    want = summary(
        {"agent": [0] * 7, "type": ["Ut"] * 7, "metric": metrics, "iteration": [0, 1, 1, 0, 1, 1, 1]},
        [0.5, 0.0, 0.4, 0.4, 0.85, 0.5, 1.0],
        [None] * 7,
        [1] * 7,
    )
    assert_frame_equal(got, want, rel_tol=1e-6)


def test_llm_training_needs_the_llm_columns() -> None:
    with pytest.raises(MoralsimError, match="LLM_RECORD_SCHEMA"):
        m.llm_training(games(TWO_RUNS))


def test_llm_episodes_counts_cooperation_over_legal_answers() -> None:
    # Cooperation is counted over legal answers only (the move recorded for an illegal answer is a stand-in, not a
    # choice, as in the paper's figures); until the illegal answer's move became the previous move it was D and
    # counted as "not C" here.
    run1 = games(
        [  # run 1: the LLM defects twice (legally) in episode 0; in episode 1 an illegal answer, then C
            (1, 0, 0, 1, "Ut", "TFT", 1, 0, 4.0, 0.0, 4.0, None, 0, 1),
            (1, 0, 1, 0, "TFT", "Ut", 0, 1, 0.0, 4.0, None, 0.0, 1, 0),
            (1, 1, 0, 1, "Ut", "TFT", 1, 1, 1.0, 1.0, -6.0, None, 1, 0),
            (1, 1, 1, 0, "TFT", "Ut", 1, 0, 4.0, 0.0, None, 0.0, 1, 0),
        ]
    ).with_columns(
        selector_legal=pl.Series([True, None, False, None]),
        selected_legal=pl.Series([None, True, None, True]),
        selector_p_cooperate=pl.Series([0.4, None, 0.5, None], dtype=pl.Float32),
        selected_p_cooperate=pl.Series([None, 0.2, None, 0.7], dtype=pl.Float32),
        **{f"{r}_{c}": pl.lit(None, dtype=pl.Float32) for r in m.ROLES for c in ("kl", "policy_loss", "value_loss")},
    )
    lf = pl.concat([llm_records(), run1])
    got = m.llm_episodes(lf).collect(engine="streaming")
    # Agent 0's answers per run and episode (the static TFT agent 1 has no LLM answers and does not appear):
    #   run 0: ep 0 illegal, C -> coop 1/1, illegal 0.5, p_c (0.2 + 0.6) / 2; ep 1 C, C -> 1, 0, (0.8 + 0.9) / 2
    #   run 1: ep 0 D, D -> coop 0, illegal 0, p_c 0.3;                     ep 1 illegal, C -> 1/1, 0.5, 0.6
    # Two runs: half-width = T1 * |a - b| / 2.
    want = summary(
        {
            "agent": [0] * 6,
            "type": ["Ut"] * 6,
            "metric": ["cooperation_rate"] * 2 + ["illegal_rate"] * 2 + ["p_cooperate"] * 2,
            "iteration": [0, 1] * 3,
        },
        [0.5, 1.0, 0.25, 0.25, 0.35, 0.725],
        [T1 * 0.5, 0.0, T1 * 0.25, T1 * 0.25, T1 * 0.05, T1 * 0.125],
        [2] * 6,
    )
    assert_frame_equal(got, want, rel_tol=1e-6)

    # One run, episodes 0 and 1 in one bin: 3 C out of 3 legal answers, 1 illegal answer of 4; no interval.
    # Two iterations per episode give the same single episode.
    want_binned = summary(
        {"agent": [0] * 3, "type": ["Ut"] * 3, "metric": list(m.LLM_EPISODE_METRICS), "iteration": [0] * 3},
        [1.0, 0.25, 0.625],
        [None] * 3,
        [1] * 3,
    )
    assert_frame_equal(m.llm_episodes(llm_records(), bin_size=2).collect(), want_binned, rel_tol=1e-6)
    assert_frame_equal(m.llm_episodes(llm_records(), episode_length=2).collect(), want_binned, rel_tol=1e-6)
    with pytest.raises(MoralsimError, match="llm_episodes needs the LLM columns"):
        m.llm_episodes(games(TWO_RUNS))
    with pytest.raises(MoralsimError, match="episode_length"):
        m.llm_episodes(llm_records(), episode_length=0)


def test_generalisation_matrix() -> None:
    lf = pl.LazyFrame(
        {
            "model": ["base", "base", "base", "base", "Ut", "Ut"],
            "game": ["IPD", "IPD", "IPD", "ISH", "IPD", "IPD"],
            "action_tokens": ["A|B"] * 6,
            "prompt_variant": ["v0"] * 6,
            "legal": [True, True, False, True, True, True],
            "action": pl.Series([0, 1, None, 1, 0, 0], dtype=pl.Int8),
        }
    )
    got = m.generalisation_matrix(lf).collect()
    want = pl.DataFrame(
        {
            "model": ["Ut", "base", "base"],
            "game": ["IPD", "IPD", "ISH"],
            "n": [2, 3, 1],
            "cooperation_rate": [1.0, 1 / 3, 0.0],
            "cooperation_rate_legal": [1.0, 0.5, 0.0],
            "illegal_rate": [0.0, 1 / 3, 0.0],
        }
    )
    assert_frame_equal(got, want)
    by_prompt = m.generalisation_matrix(lf.rename({"model": "adapter"}), by=("game", "prompt_variant")).collect()
    assert by_prompt.columns[:3] == ["adapter", "game", "prompt_variant"]
    with pytest.raises(MoralsimError, match="model and/or adapter"):
        m.generalisation_matrix(lf.drop("model"))
