"""Per-run final cooperation, the mode counts and the sweep's popularity metric, on hand-built frames."""

from __future__ import annotations

import math

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analysis import metrics as m
from analysis.modes import cooperation_modes, final_cooperation, final_window_start, type_order
from analysis.sweep import population_label, selection_popularity, sweep_labels
from simulator.errors import MoralsimError


def games(rows: list[tuple[int, int, int, int, str, str, int, int]]) -> pl.LazyFrame:
    """(run, iteration, selector, selected, selector_type, selected_type, selector_action, selected_action)."""
    cols = ["run", "iteration", "selector", "selected", "selector_type", "selected_type", "selector_action",
            "selected_action"]
    df = pl.DataFrame(rows, schema=cols, orient="row")
    return df.with_columns(
        selector_payoff=pl.lit(0.0), selected_payoff=pl.lit(0.0), selector_learning_reward=pl.lit(0.0),
        selected_learning_reward=pl.lit(0.0),
    ).lazy()


# agent 0 is UT, agents 1 and 2 are DE; 10 iterations, so the last 20% is iterations 8 and 9
GAMES = games([
    (0, 7, 0, 1, "UT", "DE", 1, 1),  # before the window
    (0, 8, 0, 1, "UT", "DE", 0, 0),
    (0, 8, 1, 2, "DE", "DE", 0, 1),
    (0, 9, 2, 0, "DE", "UT", 1, 0),
    (1, 8, 0, 2, "UT", "DE", 1, 0),
    (1, 9, 1, 0, "DE", "UT", 1, 1),
])


def test_final_window_is_the_last_fraction_of_iterations() -> None:
    assert final_window_start(30_000) == 27_000
    assert final_window_start(10, 0.2) == 8
    assert final_window_start(5) == 4  # at least one iteration
    assert final_window_start(10, 1.0) == 0
    for bad in ((0, 0.1), (10, 0.0), (10, 1.5)):
        with pytest.raises(MoralsimError):
            final_window_start(*bad)


def test_final_cooperation_per_run_and_type_counts_both_roles_in_the_window() -> None:
    got = final_cooperation(GAMES, num_iterations=10, fraction=0.2).collect()
    expected = pl.DataFrame({
        "run": [0, 0, 1, 1],
        "type": ["DE", "UT", "DE", "UT"],
        # run 0: DE moves C, C, D, D (agent 1 twice, agent 2 twice); UT C as selector, C as selected
        "cooperation": [0.5, 1.0, 0.5, 0.0],
        "moves": pl.Series([4, 2, 2, 2], dtype=pl.Int64),
    })
    assert_frame_equal(got, expected)


def test_final_cooperation_per_agent() -> None:
    got = final_cooperation(GAMES, num_iterations=10, fraction=0.2, by=("agent", "type")).collect()
    expected = pl.DataFrame({
        "run": [0, 0, 0, 1, 1, 1],
        "agent": [0, 1, 2, 0, 1, 2],
        "type": ["UT", "DE", "DE", "UT", "DE", "DE"],
        "cooperation": [1.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "moves": pl.Series([2, 2, 2, 2, 1, 1], dtype=pl.Int64),
    })
    assert_frame_equal(got, expected)
    with pytest.raises(MoralsimError, match="groups by"):
        final_cooperation(GAMES, 10, by=("run",))


def test_mode_counts_with_the_thresholds_on_their_boundaries() -> None:
    final = pl.LazyFrame({
        "run": [0, 1, 2, 3, 4, 5, 6, 0, 1],
        "type": ["UT"] * 7 + ["DE"] * 2,
        "cooperation": [0.0, 0.19, 0.2, 0.5, 0.8, 0.81, 1.0, 0.9, 0.95],
    })
    expected = pl.DataFrame({
        "type": ["DE", "UT"],
        "defect": [0, 2],  # < 0.2
        "mixed": [0, 3],  # 0.2 to 0.8, both included
        "cooperate": [2, 2],  # > 0.8
        "n_runs": [2, 7],
        "median": [0.925, 0.5],
    }, schema_overrides={k: pl.UInt32 for k in ("defect", "mixed", "cooperate", "n_runs")})
    assert_frame_equal(cooperation_modes(final).collect(), expected)


def test_mode_counts_per_population() -> None:
    final = pl.LazyFrame({
        "population": ["a", "a", "b"], "run": [0, 1, 0], "type": ["UT", "UT", "UT"], "cooperation": [0.1, 0.9, 0.5],
    })
    got = cooperation_modes(final, ("population", "type")).collect()
    assert got.select("population", "defect", "mixed", "cooperate").rows() == [("a", 1, 0, 1), ("b", 0, 1, 0)]


def test_popularity_counts_a_type_nobody_selected_as_zero() -> None:
    lf = games([
        (0, 0, 0, 2, "S", "UT", 0, 0),  # before the window
        (0, 1, 0, 1, "S", "S", 0, 0),
        (0, 1, 1, 2, "S", "UT", 0, 0),
        (0, 1, 2, 0, "UT", "S", 0, 0),
        (1, 1, 0, 1, "S", "S", 0, 0),
        (1, 1, 1, 0, "S", "S", 0, 0),
        (1, 1, 2, 1, "UT", "S", 0, 0),
    ])
    got = selection_popularity(lf, start=1).collect()
    # S gets 2/3 of run 0's selections and all of run 1's; UT 1/3 and 0
    per_run = pl.LazyFrame({"type": ["S", "S", "UT", "UT"], "value": [2 / 3, 1.0, 0.0, 1 / 3]})
    assert_frame_equal(got, m.across_runs(per_run, ["type"]).collect())
    assert got["mean"].to_list() == pytest.approx([5 / 6, 1 / 6])
    assert math.isclose(got["ci_high"][0] - got["mean"][0], 12.706 * (1 / 3 / math.sqrt(2)) / math.sqrt(2), rel_tol=1e-9)


def test_population_labels() -> None:
    assert population_label("8xS_1xUT_1xaUT") == "majority-S"
    assert population_label("1xS_2xUT@tabularQ_1xDE") == "majority-UT"
    assert population_label("1xS_1xUT") == "1xS_1xUT"  # no majority
    assert sweep_labels(["2xS_1xUT", "1xS_2xUT"]) == ["majority-S", "majority-UT"]
    assert sweep_labels(["2xS_1xUT", "2xS_1xDE"]) == ["2xS_1xUT", "2xS_1xDE"]  # labels must tell them apart
    assert type_order("1xS_8xUT_1xS@tabularQ_1xDE") == ("S", "UT", "DE")
    assert type_order("not a population") == ()
