"""Sweeps: the [sweep] scenario form, several populations as one job (one pool, one progress bar, resumable), the
sweep report, and clear errors for bad sweep files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import tqdm.auto
from polars.testing import assert_frame_equal

from scenarios.cli import main
from scenarios.factory import build_groups
from scenarios.scenario import load_scenario, majority_populations
from simulator.config import RunConfig
from simulator.driver import run_datasets
from simulator.errors import ConfigError
from tests.helpers import need, read_dataset

# moral_MARL README, "Run core experiments, population size = 16"
AIES_POPULATIONS = [
    "8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg",
    "1xS_8xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg",
    "1xS_1xUT_8xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg",
    "1xS_1xUT_1xaUT_8xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg",
    "1xS_1xUT_1xaUT_1xDE_8xmDE_1xVEe_1xVie_1xVEk_1xVagg",
    "1xS_1xUT_1xaUT_1xDE_1xmDE_8xVEe_1xVie_1xVEk_1xVagg",
    "1xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_8xVie_1xVEk_1xVagg",
    "1xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_8xVEk_1xVagg",
    "1xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_8xVagg",
]
SMALL = list(majority_populations(["S", "UT", "DE"], 2))  # 2xS_1xUT_1xDE, 1xS_2xUT_1xDE, 1xS_1xUT_2xDE


def test_aies_sweep_expands_to_the_nine_paper_populations() -> None:
    scenario = load_scenario("aies2024/sweep")
    assert scenario.sweep is not None
    assert list(scenario.sweep.populations) == AIES_POPULATIONS
    assert scenario.run == {"num_iterations": 30000, "num_runs": 20, "game": "IPD", "method": "dqn"}
    assert scenario.sweep.report == "aies2024_sweep_report"
    assert load_scenario("aies2024/paper_population").sweep is None  # the single-run form is unchanged


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[sweep]\ntypes = ["S", "UTT"]\nmajority = 2', r"unknown agent type code 'UTT'\. Did you mean 'UT'\?"),
        ('[sweep]\npopulations = ["2xS_1xUT"]\ntypes = ["S"]\nmajority = 2', "exactly one of populations and types"),
        ("[sweep]\nreport = 'r'", "exactly one of populations and types"),
        ('[sweep]\ntypes = ["S", "UT"]', r"majority must be a positive integer, got None"),
        ('[sweep]\ntypes = ["S", "UT"]\nmajority = 1', r"majority \(1\) must be larger than minority \(1\)"),
        ('[sweep]\ntypes = ["S", "UT"]\nmajority = 3\nminority = 0', "minority must be a positive integer"),
        ('[sweep]\ntypes = ["S", "S"]\nmajority = 2', r"types lists \['S'\] more than once"),
        ('[sweep]\ntypes = []\nmajority = 2', "types must be a non-empty list"),
        ("[sweep]\npopulations = []", "populations must be a non-empty list"),
        ('[sweep]\npopulations = ["2xS_1xUT", "2xS_1xUT"]', "lists population '2xS_1xUT' more than once"),
        ('[sweep]\npopulations = ["2S_1xUT"]', r"missing 'x': did you mean '2xS'\?"),
        ('[sweep]\npopulations = ["2xS_1xUT"]\nmajority = 2', "majority and minority go with types"),
        ('[sweep]\npopulations = ["2xS_1xUT"]\ncount = 2', r"unknown keys \['count'\]; valid: \['majority'"),
        ('[run]\ndestination_folder = "1xS_1xUT"\n[sweep]\npopulations = ["2xS_1xUT"]', "must not set destination_folder"),
        ('[sweep]\npopulations = ["2xS_1xUT"]\nreport = ""', "report must be a folder name"),
    ],
)
def test_a_bad_sweep_file_gets_a_clear_error(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_scenario(str(path))
    assert str(path) in str(err.value) and "A sweep takes either populations" in str(err.value)


def test_a_sweep_scenario_refuses_destination_folder_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--scenario", "aies2024/sweep", "--destination_folder", "1xS_1xUT", "--no_progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--destination_folder cannot be combined with the sweep scenario 'aies2024/sweep'" in err
    assert AIES_POPULATIONS[0] in err


class Bars:
    """Stands in for tqdm: records every progress bar the driver opens and what it was told."""

    def __init__(self) -> None:
        self.opened: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Bars:
        self.opened.append({"total": kwargs["total"], "desc": kwargs.get("desc"), "done": 0})
        return self

    def update(self, n: int = 1) -> None:
        self.opened[-1]["done"] += n

    def close(self) -> None:
        pass


def _configs(out: Path, iterations: int = 20, runs: int = 2) -> list[RunConfig]:
    return [RunConfig(p, num_iterations=iterations, num_runs=runs, seed=3, output=out, flush_rows=32) for p in SMALL]


def _run(cfgs: list[RunConfig], backend: str = "inline", **kw: Any) -> list[dict[int, dict[str, Any]]]:
    factory = build_groups
    return run_datasets(cfgs, factory, backend=backend, show_progress=False, **kw)


def _mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet")}


def test_a_sweep_is_one_job_with_one_progress_total_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bars = Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", bars)
    cfgs = _configs(tmp_path)
    tables = _run(cfgs)
    assert bars.opened == [{"total": 3 * 2 * 20, "desc": "3 populations (6 runs)", "done": 3 * 2 * 20}]
    assert [sorted(t) for t in tables] == [[0, 1]] * 3
    first = {c.destination_folder: read_dataset(c.dataset_dir) for c in cfgs}
    for cfg, df in zip(cfgs, first.values(), strict=True):
        assert df.height == 2 * 20 * cfg.population.size
        assert (cfg.dataset_dir / "manifest.json").exists()

    before = _mtimes(tmp_path)
    _run(cfgs)  # everything is there: nothing runs, nothing is rewritten
    assert len(bars.opened) == 1 and _mtimes(tmp_path) == before

    lost = cfgs[1].dataset_dir / "run=1"
    shutil.rmtree(lost)
    _run(cfgs)
    assert bars.opened[-1] == {"total": 20, "desc": f"{cfgs[1].destination_folder} (1 runs)", "done": 20}
    after = _mtimes(tmp_path)
    assert {p: t for p, t in after.items() if lost not in p.parents} == {
        p: t for p, t in before.items() if lost not in p.parents
    }
    for cfg in cfgs:  # the re-run is the same run: same seed, same records
        assert_frame_equal(read_dataset(cfg.dataset_dir), first[cfg.destination_folder])


def test_a_sweep_checks_every_dataset_before_any_work(tmp_path: Path) -> None:
    cfgs = _configs(tmp_path)
    _run(cfgs[1:2])
    changed = [cfgs[0], RunConfig(SMALL[1], num_iterations=20, num_runs=2, seed=4, output=tmp_path)]
    with pytest.raises(ConfigError, match="differs in: seed"):
        _run(changed)
    assert not cfgs[0].dataset_dir.exists()  # refused before the first population ran
    with pytest.raises(ConfigError, match="each dataset may appear once"):
        _run([cfgs[0], cfgs[0]])


@pytest.mark.slow
def test_a_sweep_on_ray_shares_one_pool_and_matches_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = need("ray")
    bars = Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", bars)
    try:
        _run(_configs(tmp_path / "ray"), backend="ray", num_cpus=2)
    finally:
        ray.shutdown()
    assert len(bars.opened) == 1 and bars.opened[0]["done"] == bars.opened[0]["total"] == 120
    _run(_configs(tmp_path / "inline"))
    for population in SMALL:
        assert_frame_equal(read_dataset(tmp_path / "ray" / population), read_dataset(tmp_path / "inline" / population))


def test_the_sweep_command_runs_every_population_and_renders_the_report(tmp_path: Path) -> None:
    scenario = tmp_path / "small_sweep.toml"
    scenario.write_text(
        'description = "three 4-agent populations"\n[run]\nnum_iterations = 30000\nnum_runs = 20\n'
        '[sweep]\ntypes = ["S", "UT", "DE"]\nmajority = 2\nreport = "small_report"\n'
    )
    argv = ["--scenario", str(scenario), "--num_iterations", "20", "--num_runs", "2", "--output", str(tmp_path),
            "--backend", "inline", "--no_progress"]
    assert main(argv) == 0  # flags win over the file's 30000 x 20
    for population in SMALL:
        df = read_dataset(tmp_path / population)
        assert df["run"].unique().sort().to_list() == [0, 1] and df["iteration"].max() == 19

    out = tmp_path / "small_report"
    page = (out / "index.html").read_text()
    for name in ("cooperation_by_type", "final_cooperation", "social_outcomes", "popularity", "selection_matrices"):
        assert (out / "figures" / f"sweep_{name}.png").stat().st_size > 0
    assert page.count("data:image/png;base64,") == 5
    assert "majority-S" in page and "majority-DE" in page and "populations/index.html" in page
    modes = pl.read_csv(out / "tables" / "sweep_cooperation_modes.csv")
    assert modes["population"].unique(maintain_order=True).to_list() == ["majority-S", "majority-UT", "majority-DE"]
    assert set(modes["n_runs"]) == {2} and modes.height == 9
    assert (modes["defect"] + modes["mixed"] + modes["cooperate"] == 2).all()
    final = pl.read_csv(out / "tables" / "sweep_final_cooperation.csv")
    assert final.height == 3 * 2 * 3  # population x run x type
    popularity = pl.read_csv(out / "tables" / "sweep_popularity.csv")
    assert popularity.group_by("population").agg(pl.col("mean").sum())["mean"].round(9).to_list() == [1.0] * 3
    detail = out / "populations"
    assert (detail / "index.html").exists()
    assert (detail / "figures" / f"{SMALL[0]}__final_cooperation.png").exists()
    assert (detail / "tables" / f"{SMALL[0]}__cooperation_modes.csv").exists()
