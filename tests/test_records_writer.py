"""Record parts written on a background thread (simulator/records.py PartWriter): same dataset, errors not lost."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

from simulator.config import RunConfig
from simulator.records import PartWriter
from tests.helpers import engine_records


def test_many_small_parts_written_in_the_background_give_the_same_dataset(tmp_path):
    def records(out: Path, flush_rows: int):
        cfg = RunConfig("1xUT_1xaUT_1xDE_1xTFT", num_iterations=300, num_runs=2, seed=1, output=out,
                        flush_rows=flush_rows)
        return engine_records(cfg, [0, 1]), sorted(p.name for p in (cfg.dataset_dir / "run=0").glob("*.parquet"))

    small, parts = records(tmp_path / "small", 40)  # 10 iterations of 4 games per part: 30 parts per run
    big, one = records(tmp_path / "big", 1 << 20)
    assert len(parts) == 30 and len(one) == 1
    assert_frame_equal(small, big)


def test_a_failed_write_is_raised_not_lost(tmp_path):
    writer = PartWriter(max_pending=1)
    table = pa.table({"x": [1, 2, 3]})
    writer.submit(table, tmp_path / "ok.parquet")
    writer.submit(table, tmp_path / "missing" / "bad.parquet")  # its folder does not exist
    with pytest.raises(OSError):
        writer.close()
    assert (tmp_path / "ok.parquet").exists()
