"""One writer per dataset, and parts that prove they are whole (simulator/lock.py, storage.verify_run).

Every driver here is a real `main.py` process on a real folder or the moto S3 server; kills are real signals.
  - two drivers started together: one writes, the other exits 2 with one line; the dataset equals a single driver's
  - a driver SIGKILLed while it holds the lock: the next takes the lock over (logged) and resumes
  - a driver frozen (SIGSTOP) past its lease: the next takes over; the frozen one, woken, stops without writing
  - a corrupted part: `python -m analysis --verify` exits 1, the next command moves the run aside and runs it again
    from its seed, and the dataset equals a clean one; an LLM run with a bad part is refused, naming it
  - datasets from before the listing (no hashes, or no _SUCCESS) still count as done
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analysis.cli import main as analyze
from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.driver import DAMAGED, STAGING, Eta, run_datasets
from simulator.errors import DatasetLockedError
from simulator.lock import LOCKS, DatasetLock
from simulator.storage import SUCCESS, Store, is_uri
from tests.helpers import llm_main_argv, read_dataset, writer_staging

ROOT = Path(__file__).resolve().parents[1]
POP = "2xS_1xUT_1xDE_1xTFT"
LOCKED = re.compile(r"^main\.py: error: (\S+) is being written by pid (\d+) on host (\S+) since "
                    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; wait for it or stop it$")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _main(out: str | Path, iterations: int = 4000) -> list[str]:
    """3 runs of one batch each; parts every 400 iterations, so a run is written in several parts."""
    return [sys.executable, "main.py", "--destination_folder", POP, "--num_iterations", str(iterations),
            "--num_runs", "3", "--seed", "5", "--runs_per_batch", "1", "--flush_rows", "2000", "--backend", "inline",
            "--no_progress", "--output", str(out)]


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=env or ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)


def _records(out: str | Path, tmp: Path) -> pl.DataFrame:
    if is_uri(out):
        from analysis.dataset import local_copy

        return read_dataset(local_copy(RunConfig(POP, output=out).dataset_location, tmp / "cache"))
    return read_dataset(Path(out) / POP)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of one driver that ran the command alone, start to end."""
    out = tmp_path_factory.mktemp("clean")
    _run(_main(out)).check_returncode()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_started_together_one_writes_and_the_other_exits_2(where, tmp_path, clean, s3_uri):
    out = str(tmp_path / "out") if where == "local" else s3_uri("two-drivers")
    procs = [subprocess.Popen(_main(out), cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    (winner, _, _), (_, _, refused) = sorted(results, key=lambda r: r[0].returncode)
    lines = refused.strip().splitlines()
    assert len(lines) == 1, refused  # one line, no traceback
    match = LOCKED.match(lines[0])
    assert match, lines[0]
    assert match[1].endswith(POP) and int(match[2]) == winner.pid and match[3] == socket.gethostname()
    assert_frame_equal(_records(out, tmp_path), read_dataset(clean / POP))
    assert writer_staging(out, POP) is None  # the winner's staging is gone, the loser never made one
    assert analyze(["--verify", RunConfig(POP, output=out).dataset_location]) == 0  # in place, also on S3


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_driver_killed_holding_the_lock_is_taken_over_and_the_next_resumes(where, tmp_path, clean, s3_uri):
    out = str(tmp_path / "out") if where == "local" else s3_uri("killed")
    store = Store.open(out)
    proc = subprocess.Popen(_main(out), cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # run 0 committed, run 1 half written in the writer's staging
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        root = writer_staging(out, POP)
        if root and store.committed(store.path(POP, "run=0")) and len(store.names(f"{root}/run=1")) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (lock_name,) = store.names(store.path(LOCKS, POP))
    held = store.read_json(store.path(LOCKS, POP, lock_name))
    assert held["pid"] == proc.pid and not held["released"]  # the dead driver still holds it

    resumed = _run(_main(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"taking over the lock of pid {proc.pid} on host {socket.gethostname()}" in resumed.stderr
    assert "its process is gone" in resumed.stderr
    assert "resuming, 1 runs complete, 2 to run" in resumed.stderr
    assert_frame_equal(_records(out, tmp_path), read_dataset(clean / POP))
    assert writer_staging(out, POP) is None  # the dead writer's staging was cleared with the takeover
    (lock_name,) = store.names(store.path(LOCKS, POP))
    assert store.read_json(store.path(LOCKS, POP, lock_name))["released"]


@pytest.mark.slow
def test_a_driver_frozen_past_its_lease_is_taken_over_and_stops_without_writing(tmp_path, clean):
    """A holder that stops renewing (SIGSTOP: a paused job, a hung node) loses the lock when its lease runs out.
    Its successor writes the dataset; the frozen driver, woken, finds the lock gone and stops before any commit."""
    out = tmp_path / "out"
    env = {**ENV, "MORALSIM_LOCK_LEASE_S": "2"}
    frozen = subprocess.Popen(_main(out), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # frozen in the middle of run 0
        assert frozen.poll() is None, frozen.stderr.read()[-2000:]  # type: ignore[union-attr]
        root = writer_staging(out, POP)
        if root and len(list(Path(root).glob("run=0/part-*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        time.sleep(3)  # past the 2 s lease
        successor = _run(_main(out), env)
        assert successor.returncode == 0, successor.stderr[-2000:]
        assert f"taking over the lock of pid {frozen.pid}" in successor.stderr and "its lease expired" in successor.stderr
        finished = {p: p.stat().st_mtime_ns for p in (out / POP).rglob("*")}
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    _, err = frozen.communicate(timeout=300)
    assert frozen.returncode == 2, err[-2000:]
    assert "this driver lost its lock to" in err.strip().splitlines()[-1]
    assert {p: p.stat().st_mtime_ns for p in (out / POP).rglob("*")} == finished  # it wrote nothing more
    assert_frame_equal(read_dataset(out / POP), read_dataset(clean / POP))


def _verify(folder: str | Path) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "analysis", "--verify", str(folder)])


@pytest.mark.slow
def test_a_corrupted_part_is_moved_aside_and_its_run_runs_again_from_its_seed(tmp_path, clean):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    part = sorted((out / POP / "run=1").glob("part-*.parquet"))[0]
    damaged = os.urandom(part.stat().st_size)  # same size: only the hash can tell
    part.write_bytes(damaged)
    untouched = {p: p.stat().st_mtime_ns for r in ("run=0", "run=2") for p in (out / POP / r).iterdir()}

    check = _verify(out / POP)
    assert check.returncode == 1
    assert f"run=1: DOES NOT MATCH: {part.name}: SHA-256 differs" in check.stdout
    assert "2 runs verified, 0 without hashes, 1 not matching" in check.stdout

    rerun = _run(_main(out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert re.search(rf"run=1 does not match its _SUCCESS \({part.name}: SHA-256 differs\): moved aside to \S+"
                     rf"{DAMAGED}/{POP}/run=1-\d{{8}}T\d{{6}}Z; running it again from its seed", rerun.stderr), rerun.stderr
    (aside,) = (out / DAMAGED / POP).iterdir()
    assert (aside / part.name).read_bytes() == damaged  # renamed aside, not deleted
    assert_frame_equal(read_dataset(out / POP), read_dataset(clean / POP))
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the sound runs were not run again
    assert _verify(out / POP).returncode == 0


def test_a_missing_or_unlisted_part_does_not_pass_verification(tmp_path, clean):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    parts = sorted((out / POP / "run=0").glob("part-*.parquet"))
    parts[-1].unlink()
    shutil.copy(sorted((out / POP / "run=1").glob("part-*.parquet"))[0], out / POP / "run=2" / "part-99999999.parquet")
    check = _verify(out / POP)
    assert check.returncode == 1
    assert f"run=0: DOES NOT MATCH: {parts[-1].name}: missing" in check.stdout
    assert "run=2: DOES NOT MATCH: part-99999999.parquet: not listed in _SUCCESS" in check.stdout


@pytest.mark.slow
def test_datasets_written_before_the_hashes_still_count_as_done(tmp_path, clean):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    for run in ("run=0", "run=1"):  # _SUCCESS as it was written before it listed files
        success = out / POP / run / SUCCESS
        doc = json.loads(success.read_text())
        del doc["files"]
        success.write_text(json.dumps(doc))
    (out / POP / "run=2" / SUCCESS).unlink()  # an older local run: the rename alone committed it
    before = {p: p.stat().st_mtime_ns for p in (out / POP).rglob("*.parquet")}
    rerun = _run(_main(out))
    assert rerun.returncode == 0 and "all 3 runs" in rerun.stderr, rerun.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    check = _verify(out / POP)
    assert check.returncode == 0 and "0 runs verified, 3 without hashes, 0 not matching" in check.stdout


def test_a_sweep_is_refused_whole_when_one_population_is_being_written(tmp_path):
    """The sweep command takes one lock per population, all before any write."""
    other = "1xUT_1xaUT_1xDE"
    cfgs = [RunConfig(p, num_iterations=20, num_runs=1, output=tmp_path) for p in (POP, other)]
    locked = pytest.raises(DatasetLockedError, match=rf"{other} is being written by pid {os.getpid()} on host ")
    with DatasetLock.take(tmp_path, other), locked:  # held by this (live) process
        run_datasets(cfgs, build_groups, backend="inline", show_progress=False)
    assert not (tmp_path / POP).exists()  # nothing written for the free population either
    store = Store.open(tmp_path)
    (name,) = store.names(store.path(LOCKS, POP))
    assert store.read_json(store.path(LOCKS, POP, name))["released"]  # and its lock was given back
    run_datasets(cfgs, build_groups, backend="inline", show_progress=False)
    assert (tmp_path / POP / "run=0" / SUCCESS).is_file() and (tmp_path / other / "run=0" / SUCCESS).is_file()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_live_holder_refuses_and_an_expired_lease_is_taken_over(where, tmp_path, s3_uri, caplog):
    """A holder on another machine is judged by its lease alone: live while renewed, taken over once expired."""
    out = str(tmp_path) if where == "local" else s3_uri("lease")
    store = Store.open(out)
    now = time.time()
    foreign = {"generation": 7, "token": "t", "pid": 1, "host": "node-b", "machine": "node-b|boot|pid:[1]",
               "since": now - 600, "renewed": now - 5, "lease_s": 60.0, "released": False, "command": []}
    store.makedirs(store.path(LOCKS, POP))
    store.write_json(store.path(LOCKS, POP, "00000007.json"), foreign)
    with pytest.raises(DatasetLockedError, match=r"is being written by pid 1 on host node-b since .*; wait for it or "
                       "stop it$"):
        DatasetLock.take(out, POP)
    store.write_json(store.path(LOCKS, POP, "00000007.json"), {**foreign, "renewed": now - 61})
    with DatasetLock.take(out, POP) as lock:
        assert lock.generation == 8 and store.names(store.path(LOCKS, POP)) == ["00000008.json"]
        assert lock.staging == store.path(STAGING, POP, "writer-00000008")
        with pytest.raises(DatasetLockedError, match=rf"pid {os.getpid()}"):
            DatasetLock.take(out, POP)  # held, even by this process
        lock.verify()
    assert "taking over the lock of pid 1 on host node-b" in caplog.text and "its lease expired" in caplog.text
    with DatasetLock.take(out, POP) as again:  # released: taken without a takeover
        assert again.generation == 9
    assert caplog.text.count("taking over") == 1


@pytest.mark.slow
def test_an_llm_run_with_a_bad_part_is_refused_naming_it(tmp_path, tiny_model_path):
    pop, out = "1xUT@llm_1xTFT", tmp_path / "out"
    argv = llm_main_argv(pop, out, tiny_model_path, 6)
    first = _run(argv)
    assert first.returncode == 0, first.stderr[-2000:]
    part = sorted((out / pop / "run=0").glob("part-*.parquet"))[1]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    refused = _run(argv)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"main.py: error: {out / pop}: LLM runs whose files do not match their _SUCCESS: "
                           f"run=0 ({part.name}: SHA-256 differs)")
    assert "restore those files from a copy, or move the run folder out of" in line
    assert part.read_bytes() == bytes(data)  # refused: nothing moved or rewritten


def test_a_job_estimated_above_an_hour_says_so_once(caplog):
    caplog.set_level(logging.INFO, logger="moralsim.driver")
    clock = [0.0]
    eta = Eta(total=10_000_000, label="8xS (20 runs)", clock=lambda: clock[0])
    for _ in range(40):  # set-up, then 1,000 it/s: 10M iterations are about 2 h 47 min
        clock[0] += 0.5
        eta.update(500)
    assert eta.said is not None and "8xS (20 runs): about 2 h 47 min in all" in eta.said
    assert caplog.text.count("in all") == 1
    short = Eta(total=100_000, label="short", clock=lambda: clock[0])
    for _ in range(40):
        clock[0] += 0.5
        short.update(500)
    assert short.said is None


@pytest.mark.slow
def test_the_command_prints_the_estimate_of_a_long_job(tmp_path):
    proc = subprocess.Popen(_main(tmp_path, iterations=100_000_000), cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, line = time.monotonic() + 240, ""
        while time.monotonic() < deadline and "in all" not in line:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert re.search(r"\(3 runs\): about [\d.]+ (h|days)", line), line
