"""The LLM run comparison (analysis.llm_compare) against frames built by hand, and its report end to end."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analysis import llm_compare as lc
from analysis.report import write_report
from analysis.synthetic import SyntheticSpec, write_synthetic
from simulator.errors import MoralsimError

T1 = 12.706  # t(0.975, 1): two runs
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DE_VS_TFT = lc.LLMRun("1xDe@llm_1xTFT", "1xDe@llm_1xTFT", episode_length=2)


def pair_records(moves: list[tuple[int, int, int, bool]], llm_type: str = "De") -> pl.LazyFrame:
    """Pair-protocol records: slot 0 is the LLM agent (the selector), slot 1 a TFT that cooperates and gives no
    answer. Move: (run, iteration, the LLM's recorded action, whether its answer was legal)."""
    df = pl.DataFrame(moves, schema=["run", "iteration", "selector_action", "selector_legal"], orient="row")
    n = df.height
    return df.with_columns(
        pl.col("run", "iteration").cast(pl.Int32),
        pl.col("selector_action").cast(pl.Int8),
        selector=pl.lit(0, dtype=pl.Int32),
        selected=pl.lit(1, dtype=pl.Int32),
        selector_type=pl.lit(llm_type).cast(pl.Categorical),
        selected_type=pl.lit("TFT").cast(pl.Categorical),
        selected_action=pl.lit(0, dtype=pl.Int8),
        selected_legal=pl.Series([None] * n, dtype=pl.Boolean),
        **{f"{r}_{c}": pl.lit(0.0, dtype=pl.Float32) for r in ("selector", "selected")
           for c in ("payoff", "learning_reward")},
    ).lazy()


def rates(label: str, mode: str | None, metric_rows: list[tuple[str, int, float, float | None, int]],
          dataset: str = "1xDe@llm_1xTFT") -> pl.DataFrame:
    """Expected `llm_rates` rows: (metric, episode, mean, half-width or None, n_runs)."""
    return pl.DataFrame(
        [
            (dataset, label, mode, metric, ep, mean, None if h is None else mean - h, None if h is None else mean + h, n)
            for metric, ep, mean, h, n in metric_rows
        ],
        schema={"dataset": pl.String, "label": pl.String, "answer_mode": pl.String, "metric": pl.String,
                "episode": pl.Int32, "mean": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "n_runs": pl.Int32},
        orient="row",
    )


# Two runs, four iterations, two iterations per episode. An illegal answer records the previous (legal) move.
#   run 0: episode 0 C, D;          episode 1 illegal (recorded C), C
#   run 1: episode 0 C, C;          episode 1 D, illegal (recorded D)
MOVES = [
    (0, 0, 0, True), (0, 1, 1, True), (0, 2, 0, False), (0, 3, 0, True),
    (1, 0, 0, True), (1, 1, 0, True), (1, 2, 1, True), (1, 3, 1, False),
]


def test_episodes_from_episode_length_and_cooperation_over_legal_answers() -> None:
    got = lc.llm_rates(pair_records(MOVES), DE_VS_TFT).collect(engine="streaming")
    # cooperation over legal answers: ep 0 runs 1/2 and 2/2, ep 1 runs 1/1 and 0/1; illegal: ep 0 0 and 0, ep 1 1/2
    want = rates("De vs TFT", None, [
        ("cooperation_rate", 0, 0.75, T1 * 0.25, 2),
        ("cooperation_rate", 1, 0.5, T1 * 0.5, 2),
        ("illegal_rate", 0, 0.0, 0.0, 2),
        ("illegal_rate", 1, 0.5, 0.0, 2),
    ])
    assert_frame_equal(got, want)

    # Both episodes in one bin: per run 2 C of 3 legal answers and 1 illegal of 4.
    binned = lc.llm_rates(pair_records(MOVES), DE_VS_TFT, bin_size=2).collect()
    assert_frame_equal(binned, rates("De vs TFT", None, [
        ("cooperation_rate", 0, 2 / 3, 0.0, 2),
        ("illegal_rate", 0, 0.25, 0.0, 2),
    ]))
    with pytest.raises(MoralsimError, match="LLM columns"):
        lc.llm_rates(pair_records(MOVES).drop("selected_legal"), DE_VS_TFT)


def test_answer_mode_from_the_records_or_the_manifest() -> None:
    one_run = [m for m in MOVES if m[0] == 0]
    per_role = pair_records(one_run).with_columns(selector_answer_mode=pl.lit("mask"),
                                                  selected_answer_mode=pl.lit(None, dtype=pl.String))
    from_manifest = lc.LLMRun("1xDe@llm_1xTFT", "1xDe@llm_1xTFT", episode_length=4, answer_mode="free")
    want = rates("De vs TFT", "mask", [("cooperation_rate", 0, 2 / 3, None, 1), ("illegal_rate", 0, 0.25, None, 1)])
    got = lc.llm_rates(per_role, from_manifest).collect()
    assert_frame_equal(got, want)  # the records win over the manifest
    got = lc.llm_rates(pair_records(one_run), from_manifest).collect()
    assert_frame_equal(got, want.with_columns(answer_mode=pl.lit("free")))
    assert lc.with_names(got)["name"].unique().to_list() == ["De vs TFT [answers: free]"]


def test_label_from_reward_schedule_and_opponent() -> None:
    manifest = {
        "population": "1xGame@llm_1xTFT",
        "num_iterations": 100,
        "config": {"destination_folder": "1xGame@llm_1xTFT", "reward_schedule": [["Game", 0.5, "De"]],
                   "protocol": "pair", "episode_length": 5,
                   "agent_options": {"llm": {"model": "smollm2-135m-instruct"}}},
    }
    run = lc.LLMRun.from_manifest("phased", manifest)
    assert (run.episode_length, run.num_episodes, run.protocol, run.model) == (5, 20, "pair", "smollm2-135m-instruct")
    assert run.label("Game") == "Game→De vs TFT"
    # 20 episodes: windows of 2; the switch at iteration 50 is episode 10
    assert run.windows() == [("start", 0, 1), ("before De", 8, 9), ("end", 18, 19)]
    want_switch = pl.DataFrame({"dataset": ["phased"], "label": ["Game→De vs TFT"], "episode": [10], "reward": ["De"]},
                               schema_overrides={"episode": pl.Int32})
    assert_frame_equal(lc.phase_switches(run), want_switch)
    assert lc.phase_switches(DE_VS_TFT).height == 0

    # In the records the agent keeps its type code; the label carries the schedule.
    got = lc.llm_rates(pair_records([(0, 0, 1, True)], "Game"), run).collect()
    assert_frame_equal(got, rates("Game→De vs TFT", None, [("cooperation_rate", 0, 0.0, None, 1),
                                                           ("illegal_rate", 0, 0.0, None, 1)], dataset="phased"))

    # Missing keys: one iteration per episode; the same reward against other opponents reads apart.
    old = lc.LLMRun.from_manifest("1xGame@llm_1xAD", {"population": "1xGame@llm_1xAD", "config": {}})
    assert (old.episode_length, old.num_episodes, old.label("Game")) == (1, None, "Game vs AD")
    assert lc.LLMRun("x", "1xDe@llm_2xS_1xTFT").label("De") == "De vs 2xS+TFT"
    assert lc.LLMRun("x", "1xDe@llm_1xUt@llm").labels() == {"De": "De vs Ut", "Ut": "Ut vs De"}
    assert lc.LLMRun("x", "not a population").label("De") == "De"


def test_start_and_end_windows() -> None:
    run = lc.LLMRun("1xDe@llm_1xTFT", "1xDe@llm_1xTFT", episode_length=2, num_iterations=20)  # 10 episodes
    moves = [(0, t, 1, True) for t in range(20)]  # defects throughout ...
    moves[0] = (0, 0, 0, True)  # ... but for its first answer
    moves[19] = (0, 19, 1, False)  # and its last answer is illegal
    got = lc.llm_windows(pair_records(moves), run).collect()
    want = pl.DataFrame(
        {
            "dataset": ["1xDe@llm_1xTFT"] * 4,
            "label": ["De vs TFT"] * 4,
            "answer_mode": pl.Series([None] * 4, dtype=pl.String),
            "window": ["start", "start", "end", "end"],
            "first_episode": pl.Series([0, 0, 9, 9], dtype=pl.Int32),
            "last_episode": pl.Series([0, 0, 9, 9], dtype=pl.Int32),
            "metric": ["cooperation_rate", "illegal_rate"] * 2,
            "mean": [0.5, 0.0, 0.0, 0.5],
            "ci_low": pl.Series([None] * 4, dtype=pl.Float64),
            "ci_high": pl.Series([None] * 4, dtype=pl.Float64),
            "n_runs": pl.Series([1] * 4, dtype=pl.Int32),
        }
    )
    assert_frame_equal(got, want)
    table = lc.window_table(got)
    assert table.select("run", "window", "episodes").rows() == [("De vs TFT", "start", "0–0"), ("De vs TFT", "end", "9–9")]
    assert table["cooperation (legal answers)"].to_list() == [0.5, 0.0]


def write_eval(folder: Path, run: int, slot: int, answers: list[tuple[str, str, bool, int | None]]) -> None:
    """An adapter's evaluation as `main.py evaluate` writes it. Answer: (axis, game, legal, action)."""
    path = folder / f"run={run}" / "adapters" / f"slot{slot}" / "eval" / "eval.parquet"
    path.parent.mkdir(parents=True)
    pl.DataFrame(
        {
            "model": ["m"] * len(answers),
            "adapter": [str(path.parent.parent)] * len(answers),
            "axis": [a[0] for a in answers],
            "game": [a[1] for a in answers],
            "action_tokens": ["action3|action4"] * len(answers),
            "prompt_variant": ["structured"] * len(answers),
            "legal": [a[2] for a in answers],
            "action": pl.Series([a[3] for a in answers], dtype=pl.Int8),
        }
    ).write_parquet(path)


def test_generalisation_of_the_saved_adapters(tmp_path: Path) -> None:
    folder = tmp_path / "1xDe@llm_1xTFT"
    assert lc.scan_run_evals(folder, DE_VS_TFT) is None  # nothing evaluated: nothing to show
    write_eval(folder, 0, 0, [("game", "IPD", True, 0), ("game", "IPD", False, None), ("game", "ISH", True, 1),
                              ("variant", "IPD", True, 0)])
    write_eval(folder, 1, 0, [("game", "IPD", True, 1), ("game", "ISH", True, 1), ("variant", "IPD", False, None)])
    evals = lc.scan_run_evals(folder, DE_VS_TFT)
    assert evals is not None
    got = lc.llm_generalisation(evals, DE_VS_TFT).collect()
    # per run (adapter): IPD coop over legal 1/1 and 0/1, illegal 1/2 and 0; ISH 0 and 0; "structured" 1/1 and
    # no legal answer (run 1 has no cooperation rate there)
    want = pl.DataFrame(
        [
            ("game", "cooperation_rate", "IPD", 0.5, T1 * 0.5, 2),
            ("game", "cooperation_rate", "ISH", 0.0, 0.0, 2),
            ("game", "illegal_rate", "IPD", 0.25, T1 * 0.25, 2),
            ("game", "illegal_rate", "ISH", 0.0, 0.0, 2),
            ("variant", "cooperation_rate", "structured", 1.0, None, 1),
            ("variant", "illegal_rate", "structured", 0.5, T1 * 0.5, 2),
        ],
        schema=["axis", "metric", "cell", "mean", "half", "n_runs"],
        orient="row",
    ).select(
        pl.lit("1xDe@llm_1xTFT").alias("dataset"),
        pl.lit("De vs TFT").alias("label"),
        "axis",
        "metric",
        "cell",
        "mean",
        (pl.col("mean") - pl.col("half")).alias("ci_low"),
        (pl.col("mean") + pl.col("half")).alias("ci_high"),
        pl.col("n_runs").cast(pl.Int32),
    )
    assert_frame_equal(got, want)


def test_report_compares_two_llm_runs(tmp_path: Path) -> None:
    """De against TFT rises, Game against TFT falls (the synthetic types drift that way); both curves in one figure,
    with the phased run's switch marked and the generalisation matrices side by side."""
    de = write_synthetic(tmp_path, SyntheticSpec("1xDe_1xTFT", num_runs=3, num_iterations=200, llm=True))
    game = write_synthetic(tmp_path, SyntheticSpec("1xGame_1xTFT", num_runs=3, num_iterations=200, llm=True))
    manifest = json.loads((game / "manifest.json").read_text())
    manifest["config"].update(reward_schedule=[["Game", 0.5, "De"]], protocol="pair", episode_length=2)
    (game / "manifest.json").write_text(json.dumps(manifest))
    write_eval(de, 0, 0, [("game", "IPD", True, 0), ("game", "ISH", True, 0)])
    write_eval(game, 0, 0, [("game", "IPD", True, 1), ("game", "ISH", False, None)])

    report = write_report([de, game], tmp_path / "cmp", dpi=40)
    figures = tmp_path / "cmp" / "figures"
    for name in ("compare_llm_runs.png", "compare_llm_generalisation.png", "1xGame_1xTFT__llm_cooperation.png"):
        assert (figures / name).read_bytes().startswith(PNG_MAGIC)
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert "LLM runs compared" in page and "Start and end of fine-tuning" in page
    assert not report.problems

    windows = pl.read_csv(tmp_path / "cmp" / "tables" / "compare_llm_windows.csv").filter(metric="cooperation_rate")
    coop = {(label, w): mean for label, w, mean in windows.select("label", "window", "mean").iter_rows()}
    assert coop[("De vs TFT", "end")] > coop[("De vs TFT", "start")] + 0.2
    assert coop[("Game→De vs TFT", "before De")] < coop[("Game→De vs TFT", "start")] - 0.2
    rates = pl.read_csv(tmp_path / "cmp" / "tables" / "compare_llm_rates.csv")
    assert rates.filter(dataset="1xGame_1xTFT").select(pl.col("episode").max()).item() == 99  # 2 iterations per episode
