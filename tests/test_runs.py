"""End-to-end runs: seeded determinism, resume after a kill, a real Ray run, the compat switch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.driver import STAGING, run_sweep
from simulator.errors import ConfigError
from tests.helpers import need, read_dataset

ROOT = Path(__file__).resolve().parents[1]
POP = "2xS_1xUT_1xDE_1xTFT"


def sweep(out: Path, backend: str = "inline", **kw) -> pl.DataFrame:
    cfg = RunConfig(
        POP,
        num_iterations=kw.pop("iterations", 40),
        num_runs=kw.pop("runs", 3),
        seed=kw.pop("seed", 7),
        output=out,
        flush_rows=kw.pop("flush_rows", 64),
    )
    run_sweep(cfg, build_groups, backend=backend, show_progress=False, **kw)
    return read_dataset(cfg.dataset_dir)


def test_same_seed_same_parquet_whatever_the_batching(tmp_path):
    a = sweep(tmp_path / "a")
    b = sweep(tmp_path / "b", runs_per_batch=1)
    assert a.height == 3 * 40 * 5
    assert_frame_equal(a, b)
    c = sweep(tmp_path / "c", seed=8)
    assert not a.equals(c)


def test_part_files_are_identical_bytes(tmp_path):
    sweep(tmp_path / "a", runs=1)
    sweep(tmp_path / "b", runs=1)
    pa_ = sorted((tmp_path / "a" / POP).rglob("*.parquet"))
    pb = sorted((tmp_path / "b" / POP).rglob("*.parquet"))
    assert len(pa_) > 1 and [p.read_bytes() for p in pa_] == [p.read_bytes() for p in pb]


def test_rerun_skips_completed_and_refuses_other_config(tmp_path):
    sweep(tmp_path, runs=2)
    manifest = json.loads((tmp_path / POP / "manifest.json").read_text())
    assert set(manifest["runs"]) == {"0", "1"} and manifest["versions"]["numpy"]
    mtime = (tmp_path / POP / "run=0" / "part-00000000.parquet").stat().st_mtime_ns
    df = sweep(tmp_path, runs=3)  # one more run: only run 2 is computed
    assert (tmp_path / POP / "run=0" / "part-00000000.parquet").stat().st_mtime_ns == mtime
    assert df["run"].unique().sort().to_list() == [0, 1, 2]
    with pytest.raises(ConfigError, match="differs in: seed"):
        sweep(tmp_path, runs=3, seed=99)


def _main(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "main.py",
        "--destination_folder",
        POP,
        "--num_iterations",
        "3000",
        "--num_runs",
        "3",
        "--seed",
        "5",
        "--output",
        str(out),
        "--backend",
        "inline",
        "--runs_per_batch",
        "1",
        "--flush_rows",
        "500",
        "--no_progress",
        *extra,
    ]


@pytest.mark.slow
def test_resume_after_kill_leaves_no_partial_or_duplicate_rows(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _main(out), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    # kill while run 1 is half written: run 0 is complete, run 1 has parts in staging
    deadline = time.time() + 240
    def staged() -> list[Path]:
        return list((out / STAGING / POP).glob("writer-*/run=1/*.parquet"))

    while time.time() < deadline and len(staged()) < 3:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / POP / "run=0").is_dir() and not (out / POP / "run=1").exists()
    partial_rows = pl.scan_parquet(str(out / POP / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert partial_rows["run"].unique().to_list() == [0]  # readers never see the half-written run

    subprocess.run(_main(out), cwd=ROOT, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    resumed = read_dataset(out / POP)
    assert resumed.height == 3 * 3000 * 5
    assert resumed.select("run", "iteration", "order").is_duplicated().sum() == 0
    assert not list((out / STAGING / POP).glob("*/run=*"))

    clean = tmp_path / "clean"
    subprocess.run(_main(clean), cwd=ROOT, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    assert_frame_equal(resumed, read_dataset(clean / POP))


@pytest.mark.slow
def test_real_ray_run_matches_inline(tmp_path):
    ray = need("ray")
    try:
        got = sweep(tmp_path / "ray", backend="ray", runs=4, num_cpus=2)
    finally:
        ray.shutdown()
    assert_frame_equal(got, sweep(tmp_path / "inline", runs=4))


def test_compat_switch_changes_only_the_documented_defects(tmp_path):
    def run(compat: str) -> pl.DataFrame:
        cfg = RunConfig(
            "1xDE_1xmDE_1xVM_1xRandom",
            num_iterations=80,
            num_runs=1,
            seed=2,
            output=tmp_path / compat,
            compat=compat,
            method="tabularQ",
        )
        run_sweep(cfg, build_groups, backend="inline", show_progress=False)
        return read_dataset(cfg.dataset_dir)

    fixed, compat = run("none"), run("aies2024")
    for df, judged in ((fixed, "selected_state"), (compat, "selector_state")):
        # as the selected player, DE judges the selector's previous move (fixed) or its own (anchor bug)
        sel = df.filter(pl.col("selected_type") == "DE")
        exploit = (sel["selected_action"] == 1) & (sel[judged] == 0)
        assert (sel["selected_moral_reward"] == exploit.cast(pl.Float32) * -5).all()
        m = df.filter(pl.col("selected_type") == "mDE")
        assert (m["selected_moral_reward"] == ((m["selected_action"] == 1) & (m[judged] == 0)).cast(pl.Float32) * 5).all()
        # as the selector both modes judge the partner's previous move
        s = df.filter(pl.col("selector_type") == "DE")
        exploit_s = (s["selector_action"] == 1) & (s["selector_state"] == 0)
        assert (s["selector_moral_reward"] == exploit_s.cast(pl.Float32) * -5).all()
    vm = compat.filter(pl.col("selector_type") == "VM")
    assert (vm["selector_moral_reward"] == (vm["selector_action"] == 0).cast(pl.Float32)).all()
    vm = fixed.filter(pl.col("selector_type") == "VM")
    expected = 0.5 * vm["equality"] + 0.5 * (vm["selector_action"] == 0).cast(pl.Float32)
    assert ((vm["selector_moral_reward"] - expected).abs() < 1e-6).all()
    # the data contain the discriminating case: DE selected, defecting, with the two states different
    for df in (fixed, compat):
        de = df.filter(pl.col("selected_type") == "DE")
        assert de.filter((pl.col("selected_action") == 1) & (pl.col("selector_state") != pl.col("selected_state"))).height


def test_phased_reward_schedule_switches_at_the_stated_iteration(tmp_path):
    cfg = RunConfig(
        "1xGame@tabularQ_1xAD", num_iterations=40, num_runs=1, seed=1, output=tmp_path, reward_schedule=(("Game", 0.5, "De"),)
    )
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    df = read_dataset(cfg.dataset_dir)
    for role in ("selector", "selected"):
        me = df.filter(pl.col(f"{role}_type") == "Game")
        first, second = me.filter(pl.col("iteration") < 20), me.filter(pl.col("iteration") >= 20)
        assert (first[f"{role}_moral_reward"] == first[f"{role}_payoff"]).all()
        exploit = (second[f"{role}_action"] == 1) & (second[f"{role}_state"] == 0)
        assert (second[f"{role}_moral_reward"] == exploit.cast(pl.Float32) * -3).all()
    with pytest.raises(ConfigError, match="reward_schedule"):
        RunConfig("1xGame_1xAD", reward_schedule=(("Game", 1.5, "De"),))
