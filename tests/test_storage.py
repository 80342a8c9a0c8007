"""--output as a pyarrow filesystem URI (simulator/storage.py): the commit protocol without renames on a real S3
endpoint (moto's server), a dataset there equal to the same run on a local disk, a killed driver that resumes from
its checkpoint in the bucket, and clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.driver import STAGING, run_dir, run_sweep
from simulator.errors import ConfigError
from simulator.storage import SUCCESS, Store, check_writable, is_uri, redact
from tests.helpers import llm_main_argv, read_dataset, sigkill_after_checkpoint, writer_staging

ROOT = Path(__file__).resolve().parents[1]
POP = "1xUT_1xaUT_1xDE_1xTFT"


def test_uri_or_folder():
    assert is_uri("s3://bucket/x") and is_uri("file:///tmp/x") and is_uri("gs://b")
    assert not is_uri("results") and not is_uri("/tmp/x") and not is_uri("C:/x")
    assert redact("s3://key:secret@bucket/p?scheme=http") == "s3://***@bucket/p?scheme=http"
    assert redact("--output=s3://k:s@b/p and results/") == "--output=s3://***@b/p and results/"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_store_commit_protocol(where, tmp_path, s3_uri):
    store = Store.open(tmp_path / "out" if where == "local" else s3_uri("unit"))
    stage, final = store.path(STAGING, "pop", "run=0"), store.path("pop", "run=0")
    store.makedirs(stage)
    store.write_table(pa.table({"x": [1, 2, 3]}), f"{stage}/part-00000000.parquet")
    store.makedirs(f"{stage}/adapters/slot0")
    store.write_bytes(f"{stage}/adapters/slot0/adapter.bin", b"weights")
    assert store.names(stage) == ["adapters", "part-00000000.parquet"]  # no .tmp left behind
    assert not store.committed(final)
    store.commit_dir(stage, final, {"run": 0, "rows": 3})
    assert store.committed(final) and not store.exists(stage)
    assert dict(store.files(final)) .keys() == {SUCCESS, "part-00000000.parquet", "adapters/slot0/adapter.bin"}
    assert store.read_json(f"{final}/{SUCCESS}") == {"run": 0, "rows": 3}
    assert store.num_rows(f"{final}/part-00000000.parquet") == 3
    assert store.read_bytes(f"{final}/adapters/slot0/adapter.bin") == b"weights"


def test_an_uncommitted_copy_on_an_object_store_is_not_a_run(s3_uri):
    """A crash half way through copying a run leaves files without _SUCCESS: the run is not done, and the next
    commit replaces them."""
    store = Store.open(s3_uri("half"))
    final = store.path("pop", "run=0")
    store.makedirs(final)
    store.write_bytes(f"{final}/part-99999999.parquet", b"left by a crash")
    assert not store.committed(final)
    stage = store.path(STAGING, "pop", "run=0")
    store.makedirs(stage)
    store.write_table(pa.table({"x": [1]}), f"{stage}/part-00000000.parquet")
    store.commit_dir(stage, final, {"run": 0})
    assert store.committed(final) and store.names(final) == [SUCCESS, "part-00000000.parquet"]


def test_a_dataset_on_s3_equals_the_same_runs_on_a_local_disk(tmp_path, s3_uri, monkeypatch):
    from analysis.dataset import local_copy, open_dataset

    monkeypatch.setenv("MORALSIM_CACHE", str(tmp_path / "cache"))
    factory = build_groups
    frames = []
    for output in (tmp_path / "local", s3_uri("sweep")):
        cfg = RunConfig(POP, num_iterations=300, num_runs=2, seed=3, output=output, flush_rows=400,
                        checkpoint_every=100)
        run_sweep(cfg, factory, backend="inline", show_progress=False)
        frames.append(read_dataset(local_copy(cfg.dataset_location, tmp_path / "cache")))
    cfg = RunConfig(POP, num_iterations=300, num_runs=2, seed=3, output=output, flush_rows=400)
    store = Store.open(output)
    assert store.committed(run_dir(cfg, 0)) and store.committed(run_dir(cfg, 1))
    assert store.names(store.path(STAGING, POP)) == []  # no staging, no checkpoint left
    manifest = store.read_json(store.path(POP, "manifest.json"))
    assert sorted(manifest["runs"]) == ["0", "1"] and not any("test:test@" in a for a in manifest["command"])
    assert frames[0].height == 2 * 300 * 4
    assert_frame_equal(frames[0], frames[1])
    assert open_dataset(cfg.dataset_location).num_rows == frames[1].height  # the analysis reads it too
    # a second sweep finds both runs done in the bucket and writes nothing
    before = dict(store.files(store.path(POP)))
    run_sweep(cfg, factory, backend="inline", show_progress=False)
    assert {k: v for k, v in store.files(store.path(POP)) if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


def test_unusable_uris_are_refused_with_a_clear_message():
    with pytest.raises(ConfigError, match=r"cannot open --output 'nosuch://x/y'.*s3://bucket/prefix"):
        Store.open("nosuch://x/y")
    t0 = time.monotonic()
    refused = "s3://key:secret@bucket/out?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"
    with pytest.raises(ConfigError, match=r"cannot write the output location 's3://\*\*\*@bucket/out") as e:
        check_writable(refused)
    assert "secret" not in str(e.value) and time.monotonic() - t0 < 30


def test_cli_refuses_an_unreachable_s3_output_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "main.py", "--destination_folder", "1xS_1xUT", "--num_iterations", "3", "--num_runs", "1",
         "--output", "s3://k:s@bucket/out?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot write the output location 's3://***@bucket/out" in proc.stderr and "Traceback" not in proc.stderr


def test_a_killed_driver_resumes_from_its_checkpoint_in_the_bucket(tmp_path, tiny_model_path, s3_uri, monkeypatch):
    """SIGKILL the driver of an LLM run writing to S3 after a checkpoint; the same command finishes it with the
    records of a clean local run, and the parts written before the checkpoint are untouched."""
    pop, iterations = "1xUT@llm_1xDE@llm_1xTFT", 24
    monkeypatch.setenv("MORALSIM_CACHE", str(tmp_path / "cache"))

    def main(out: str | Path) -> list[str]:
        return llm_main_argv(pop, out, tiny_model_path, iterations)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MORALSIM_CACHE": str(tmp_path / "cache")}
    uri = s3_uri("killed")
    store, cfg = Store.open(uri), RunConfig(pop, num_iterations=iterations, num_runs=1, seed=4, output=uri)
    ckpt = sigkill_after_checkpoint(main(uri), env, pop, uri, iteration=6)
    assert not store.committed(run_dir(cfg, 0))  # killed mid-run
    stage = f"{writer_staging(uri, pop)}/run=0"
    before = {name: store.read_bytes(f"{stage}/{name}") for name in ckpt["parts"]["0"]}
    assert before

    subprocess.run(main(uri), cwd=ROOT, env=env, check=True, stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=600)
    clean = tmp_path / "clean"
    subprocess.run(main(clean), cwd=ROOT, env=env, check=True, stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=600)
    from analysis.dataset import local_copy

    resumed = read_dataset(local_copy(cfg.dataset_location))
    assert resumed.height == iterations * 3
    assert resumed.select("iteration", "order").is_duplicated().sum() == 0  # nothing written twice
    assert_frame_equal(resumed, read_dataset(clean / pop))  # nothing lost, nothing different
    final = run_dir(cfg, 0)
    assert {name: store.read_bytes(f"{final}/{name}") for name in before} == before  # untouched
    assert json.loads(store.read_bytes(f"{final}/{SUCCESS}"))["parts"]
    assert any(rel.startswith("adapters/slot0/") for rel, _ in store.files(final))  # the adapters landed too
    assert writer_staging(uri, pop) is None  # a finished batch leaves no staging and no checkpoint
