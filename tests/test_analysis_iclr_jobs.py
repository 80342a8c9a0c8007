"""The paper's figures over a job file's groups (analysis/iclr_jobs.py), on records built by hand and on synthetic
datasets: two-learner outcomes, the grouping by kind, opponent and reward, and the report's figures."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analysis import iclr_jobs as ij
from analysis.llm_compare import LLMRun
from analysis.report import write_report
from analysis.synthetic import SyntheticSpec, write_synthetic
from simulator.errors import MoralsimError

T1 = 12.706  # t(0.975, 1): two runs
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
C, D = 0, 1


def two_learner_records(games: list[tuple[int, int, int, int, bool, bool]]) -> pl.LazyFrame:
    """Pair-protocol records of two LLM learners: (run, iteration, slot 0's action, slot 1's, their legality)."""
    return pl.DataFrame(games, schema=["run", "iteration", "selector_action", "selected_action", "selector_legal",
                                       "selected_legal"], orient="row").with_columns(
        pl.col("run", "iteration").cast(pl.Int32), pl.col("selector_action", "selected_action").cast(pl.Int8)).lazy()


def test_two_learner_outcomes_per_episode_over_seeds():
    # two runs, two episodes of two games each
    #   run 0: ep 0 CC, CD      ep 1 DD, illegal (slot 1; its move is the carried-over one)
    #   run 1: ep 0 CC, CC      ep 1 DC, DD
    games = [(0, 0, C, C, True, True), (0, 1, C, D, True, True), (0, 2, D, D, True, True), (0, 3, C, C, True, False),
             (1, 0, C, C, True, True), (1, 1, C, C, True, True), (1, 2, D, C, True, True), (1, 3, D, D, True, True)]
    run = LLMRun("De, two learners", "2xDe@llm", episode_length=2, protocol="pair")
    got = ij.pair_outcomes(two_learner_records(games), run).collect()

    def row(outcome: str, ep: int, a: float, b: float) -> tuple:
        mean, h = (a + b) / 2, T1 * abs(a - b) / 2
        return ("De, two learners", outcome, ep, mean, mean - h, mean + h, 2)

    want = pl.DataFrame([
        row("both C", 0, 0.5, 1.0), row("both C", 1, 0.0, 0.0),
        row("both D", 0, 0.0, 0.0), row("both D", 1, 0.5, 0.5),
        row("illegal", 0, 0.0, 0.0), row("illegal", 1, 0.5, 0.0),
        row("one D", 0, 0.5, 0.0), row("one D", 1, 0.0, 0.5),
    ], schema={"dataset": pl.String, "outcome": pl.String, "episode": pl.Int32, "mean": pl.Float64,
               "ci_low": pl.Float64, "ci_high": pl.Float64, "n_runs": pl.Int32}, orient="row")
    assert_frame_equal(got, want)
    # the four outcomes partition every episode's games
    assert got.group_by("episode").agg(pl.col("mean").sum())["mean"].to_list() == pytest.approx([1.0, 1.0])


def test_two_learner_outcomes_need_the_llm_columns():
    with pytest.raises(MoralsimError, match="missing"):
        ij.pair_outcomes(pl.LazyFrame({"run": [0], "iteration": [0]}), LLMRun("x", "2xDe@llm"))


@pytest.mark.parametrize(("name", "population", "schedule", "want"), [
    ("De vs TFT", "1xDe@llm_1xTFT", (), ("single", "TFT", "De")),
    ("Game then De vs TFT", "1xGame@llm_1xTFT", (("Game", 0.5, "De"),), ("phased", "TFT", "Game→De")),
    ("Ut, two learners", "2xUt@llm", (), ("two learners", "LLM", "Ut")),
    ("Game then Ut, two learners", "2xGame@llm", (("Game", 0.5, "Ut"),), ("two learners", "LLM", "Game→Ut")),
    ("unlearning: Game then De vs Random", "1xGame@llm_1xRandom", (("Game", 0.5, "De"),),
     ("unlearning", "Random", "Game→De")),
    ("extra: Game vs TFT, QLoRA r4", "1xGame@llm_1xTFT", (), ("extra", "TFT", "Game")),
])
def test_each_group_is_placed_by_its_population_schedule_and_name(name, population, schedule, want):
    d = ij.describe(LLMRun(name, population, reward_schedule=schedule, protocol="pair"))
    assert (d["group"], d["kind"], d["opponent"], d["reward"]) == (name, *want)


# a job file in small: core groups against two opponents, a phased group, two learners, unlearning, an extra group
GROUPS = [
    ("De vs TFT", "1xDe_1xTFT", (), 5),
    ("Game vs TFT", "1xGame_1xTFT", (), 5),
    ("Game vs AD", "1xGame_1xAD", (), 5),
    ("Ut vs AD", "1xUt_1xAD", (), 5),
    ("Game then De vs TFT", "1xGame_1xTFT", (("Game", 0.5, "De"),), 5),
    ("De, two learners", "2xDe", (), 3),
    ("Game then Ut, two learners", "2xGame", (("Game", 0.5, "Ut"),), 3),
    ("unlearning: Game then De vs Random", "1xGame_1xRandom", (("Game", 0.5, "De"),), 5),
    ("extra: Game vs TFT, R_illegal 100", "1xGame_1xTFT", (), 5),
]


def _job_datasets(root: Path) -> list[Path]:
    folders = []
    for k, (_name, population, schedule, batch) in enumerate(GROUPS):
        folder = write_synthetic(root / f"g{k}", SyntheticSpec(population, num_runs=3, num_iterations=120, llm=True,
                                                               seed=k))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["config"].update(destination_folder=population, protocol="pair", episode_length=batch,
                                  reward_schedule=[list(e) for e in schedule])
        (folder / "manifest.json").write_text(json.dumps(manifest))
        folders.append(folder)
    return folders


def test_the_report_of_a_job_draws_the_papers_figures(tmp_path):
    folders = _job_datasets(tmp_path)
    names = [g[0] for g in GROUPS]
    report = write_report(folders, tmp_path / "report", dpi=40, names=names)
    figures = tmp_path / "report" / "figures"
    for name in ("paper_fine_tuning", "paper_two_learners", "paper_phased", "paper_extra"):
        assert (figures / f"{name}.png").read_bytes().startswith(PNG_MAGIC), name
    assert "The paper&#x27;s figures" in (tmp_path / "report" / "index.html").read_text()
    assert not report.problems
    rates = pl.read_csv(tmp_path / "report" / "tables" / "paper_rates.csv")
    placed = dict(rates.select("dataset", "kind").unique().iter_rows())
    assert placed == {"De vs TFT": "single", "Game vs TFT": "single", "Game vs AD": "single", "Ut vs AD": "single",
                      "Game then De vs TFT": "phased", "De, two learners": "two learners",
                      "Game then Ut, two learners": "two learners", "unlearning: Game then De vs Random": "unlearning",
                      "extra: Game vs TFT, R_illegal 100": "extra"}
    assert rates["n_runs"].max() == 3  # bands over the three seeds
    # the synthetic types drift as the paper's rewards do: De ends more cooperative than Game, against TFT
    last = rates.filter(pl.col("metric") == "cooperation_rate").group_by("dataset").agg(
        pl.col("mean").sort_by("episode").tail(3).mean())
    end = dict(last.iter_rows())
    assert end["De vs TFT"] > end["Game vs TFT"] + 0.2
    outcomes = pl.read_csv(tmp_path / "report" / "tables" / "paper_two_learner_outcomes.csv")
    assert set(outcomes["dataset"]) == {"De, two learners", "Game then Ut, two learners"}
    sums = outcomes.group_by("dataset", "episode").agg(pl.col("mean").sum())["mean"]
    assert sums.to_list() == pytest.approx([1.0] * sums.len())


def test_names_must_match_the_folders(tmp_path):
    folders = _job_datasets(tmp_path)[:2]
    with pytest.raises(MoralsimError, match="one --name per folder"):
        write_report(folders, tmp_path / "r", names=["only one"])
