"""analysis/llm_population.py on a hand-made population: selection shares and cooperation in the first and last
windows, and the LLM-beside-DQN figure's panels."""

from __future__ import annotations

import polars as pl

from analysis.llm_population import plot_population_pair, summary


def _records(picks_ut_late: bool) -> pl.LazyFrame:
    """3 agents (UT, aUT, DE), 2 runs, 10 iterations; UT picks aUT early and DE late when `picks_ut_late`."""
    types = ["UT", "aUT", "DE"]
    rows = []
    for run in range(2):
        for it in range(10):
            for sel in range(3):
                target = (sel + 1) % 3 if not (picks_ut_late and sel == 0 and it >= 5) else 2
                rows.append({"run": run, "iteration": it, "selector": sel, "selected": target,
                             "selector_type": types[sel], "selected_type": types[target],
                             "selector_action": 1 if types[sel] == "aUT" else 0, "selected_action": 0,
                             "selector_payoff": 3.0, "selected_payoff": 3.0,
                             "selector_learning_reward": 1.0, "selected_learning_reward": 1.0})
    return pl.DataFrame(rows).lazy()


def test_summary_gives_cooperation_and_who_picks_whom_per_window():
    df = summary({"LLM": _records(True), "DQN": _records(False)})
    ut = df.filter(pl.col("type") == "UT")
    llm_last = ut.filter((pl.col("population") == "LLM") & (pl.col("window") == "last"))
    dqn_last = ut.filter((pl.col("population") == "DQN") & (pl.col("window") == "last"))
    assert llm_last["picks_DE"].item() == 1.0 and dqn_last["picks_aUT"].item() == 1.0
    aut = df.filter((pl.col("type") == "aUT") & (pl.col("window") == "first") & (pl.col("population") == "LLM"))
    assert aut["cooperation"].item() == 0.5  # aUT defects as selector, cooperates as selected


def test_the_figure_has_cooperation_and_selection_panels_for_both_populations():
    fig = plot_population_pair({"LLM": _records(True), "DQN": _records(False)}, bin_size=5)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert "LLM: cooperation per type (2 runs)" in titles and "DQN: cooperation per type (2 runs)" in titles
    assert {f"{p}: whom {t} picks" for p in ("LLM", "DQN") for t in ("DE", "UT", "aUT")} <= set(titles)
