"""Reading destination folders: the synthetic writer's schema, skipped bad parts, mixed LLM / non-LLM parts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from analysis import metrics as m
from analysis.dataset import open_dataset
from analysis.synthetic import SyntheticSpec, write_synthetic
from simulator.errors import CorruptDataError
from simulator.schema import LLM_RECORD_SCHEMA, RECORD_SCHEMA


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path, SyntheticSpec("2xUT_1xS_1xTFT", num_runs=2, num_iterations=30, iterations_per_part=10))


def test_synthetic_parts_follow_the_record_schema(folder: Path) -> None:
    parts = sorted(folder.glob("run=*/part-*.parquet"))
    assert [p.relative_to(folder).as_posix() for p in parts[:3]] == [
        "run=0/part-00000000.parquet",
        "run=0/part-00000010.parquet",
        "run=0/part-00000020.parquet",
    ]
    assert all(pq.read_schema(p).equals(RECORD_SCHEMA) for p in parts)
    assert not list(folder.rglob(".*.tmp"))


def test_synthetic_states_are_the_previous_iterations_last_moves(folder: Path) -> None:
    df = open_dataset(folder).scan().filter(pl.col("run") == 0).sort("iteration", "order").collect()
    latest: dict[int, int] = {}
    prev: dict[int, int] = {}
    it = 0
    for row in df.iter_rows(named=True):
        if row["iteration"] != it:
            prev, latest, it = latest, {}, row["iteration"]
        if it > 0:
            assert row["selector_state"] == prev[row["selected"]]
            assert row["selected_state"] == prev[row["selector"]]
        latest[row["selector"]] = row["selector_action"]
        latest[row["selected"]] = row["selected_action"]
    assert df["selector_moral_reward"].is_null().sum() == (df["selector_type"] == "TFT").sum()


def test_corrupt_and_truncated_parts_are_skipped_and_named(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    good_rows = open_dataset(folder).num_rows
    truncated = folder / "run=0" / "part-00000010.parquet"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = folder / "run=1" / "part-00000099.parquet"
    garbage.write_bytes(b"not parquet at all")
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(folder)
    assert {b.path for b in ds.bad_parts} == {truncated, garbage}
    assert "part-00000010.parquet" in caplog.text and "part-00000099.parquet" in caplog.text
    assert ds.num_rows == good_rows - 10 * 4
    got = m.cooperation_by_type(ds.scan()).collect(engine="streaming")
    n_runs = got.group_by(pl.col("iteration").is_between(10, 19).alias("lost")).agg(pl.col("n_runs").unique())
    assert dict(n_runs.iter_rows()) == {True: [1], False: [2]}


def test_part_without_record_columns_is_skipped(folder: Path) -> None:
    odd = folder / "run=0" / "part-00000030.parquet"
    pl.DataFrame({"iteration": [1]}).write_parquet(odd)
    ds = open_dataset(folder)
    assert [b.path for b in ds.bad_parts] == [odd]
    assert "missing record columns" in ds.bad_parts[0].reason


def test_no_readable_part_raises(tmp_path: Path) -> None:
    (tmp_path / "x" / "run=0").mkdir(parents=True)
    (tmp_path / "x" / "run=0" / "part-00000000.parquet").write_bytes(b"junk")
    with pytest.raises(CorruptDataError, match="no readable part"):
        open_dataset(tmp_path / "x")
    with pytest.raises(CorruptDataError, match="not a directory"):
        open_dataset(tmp_path / "missing")


def test_missing_manifest_is_a_problem_not_an_error(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    ds = open_dataset(folder)
    assert ds.manifest == {} and "manifest" in ds.problems[0]


def test_llm_and_plain_parts_in_one_folder(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, SyntheticSpec("1xUt_1xTFT", num_runs=1, num_iterations=5, llm=True))
    plain = write_synthetic(tmp_path / "plain", SyntheticSpec("1xUt_1xTFT", num_runs=1, num_iterations=5))
    (folder / "run=1").mkdir()
    (plain / "run=0" / "part-00000000.parquet").rename(folder / "run=1" / "part-00000000.parquet")
    ds = open_dataset(folder)
    assert ds.has_llm and not ds.bad_parts
    df = ds.scan().collect()
    assert set(LLM_RECORD_SCHEMA.names) <= set(df.columns)
    assert df.filter(pl.col("run") == 1)["selector_kl"].is_null().all()
    later = df.filter(pl.col("run") == 0, pl.col("selector_type") == "Ut", pl.col("iteration") > 0)
    assert np.isfinite(later["selector_kl"].to_numpy()).all()
    training = m.llm_training(ds.scan()).collect()
    assert set(training["metric"]) == set(m.LLM_METRICS) and set(training["type"]) == {"Ut"}
