"""Writing interaction records: column buffers per run, flushed to atomic Parquet parts.

A part is written whole or not at all (simulator/storage.py: locally to `<name>.tmp`, then renamed; on an object
store in one upload), so a crash never leaves a half file with a `.parquet` name. Runs are written into a staging
directory and moved into the dataset only when complete (simulator/driver.py), so the dataset only ever holds
whole runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from simulator.contracts import REASON_NAMES
from simulator.engine import IterationRecords
from simulator.schema import LLM_RECORD_SCHEMA, RECORD_SCHEMA
from simulator.storage import Store

_REASON_DICT = pa.array(REASON_NAMES, pa.string())
_DIRECT = [f.name for f in RECORD_SCHEMA if f.name not in ("iteration", "order", "selector_type", "selected_type")]
COMPRESSION = "zstd"


def write_table_atomic(table: pa.Table, path: str | os.PathLike[str], store: Store | None = None) -> None:
    """One part, whole or not at all; path is local unless a store is given."""
    (store or Store.open("/")).write_table(table, os.fspath(path), COMPRESSION)


class RecordBuffer:
    """Holds up to `capacity` iterations of records for R runs as numpy columns of shape (R, capacity * S).

    S = games per iteration: N in the population protocol, 1 in the pair protocol.
    """

    def __init__(
        self, num_runs: int, codes: Sequence[str], capacity: int, llm_columns: bool = False, games: int | None = None
    ) -> None:
        self.R, self.S, self.capacity = num_runs, len(codes) if games is None else games, max(1, capacity)
        uniq = list(dict.fromkeys(codes))
        self._code_dict = pa.array(uniq, pa.string())
        self._code_idx = np.array([uniq.index(c) for c in codes], dtype=np.int16)
        self.schema = LLM_RECORD_SCHEMA if llm_columns else RECORD_SCHEMA
        self._types = {f.name: f.type for f in self.schema}
        rows = self.capacity * self.S
        self._cols: dict[str, np.ndarray] = {}
        for f in self.schema:
            if f.name in ("selector_type", "selected_type"):
                continue
            t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
            if pa.types.is_dictionary(f.type):
                dtype: object = np.int8
            elif pa.types.is_string(t):
                dtype = object
            elif pa.types.is_boolean(t):
                dtype = np.float32  # NaN marks null; converted on flush
            else:
                dtype = t.to_pandas_dtype()
                if pa.types.is_integer(t) and f.nullable:
                    dtype = np.float64  # NaN marks null for nullable ints (LLM adapter version)
            self._cols[f.name] = np.empty((self.R, rows), dtype=dtype)  # type: ignore[call-overload]
        self._order = np.tile(np.arange(self.S, dtype=np.int32), (self.R, 1))
        self.filled = 0  # iterations held
        self.first_iteration = 0

    def add(self, rec: IterationRecords) -> None:
        if self.filled == 0:
            self.first_iteration = rec.iteration
        sl = slice(self.filled * self.S, (self.filled + 1) * self.S)
        cols = self._cols
        cols["iteration"][:, sl] = rec.iteration
        cols["order"][:, sl] = self._order
        for name in _DIRECT:
            cols[name][:, sl] = getattr(rec, name)
        for name, col in rec.extra.items():
            if name in cols:
                cols[name][:, sl] = col
        self.filled += 1

    def clear(self) -> None:
        """Drop the buffered iterations (a batch rolled back to its last checkpoint writes them again)."""
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.capacity

    def table(self, r: int) -> pa.Table:
        """Run r's buffered rows as an Arrow table of the record schema."""
        n = self.filled * self.S
        arrays = []
        for f in self.schema:
            if f.name in ("selector_type", "selected_type"):
                slots = self._cols["selector" if f.name == "selector_type" else "selected"][r, :n]
                arrays.append(pa.DictionaryArray.from_arrays(pa.array(self._code_idx[slots]), self._code_dict))
                continue
            col = self._cols[f.name][r, :n]
            if pa.types.is_dictionary(f.type):
                arrays.append(pa.DictionaryArray.from_arrays(pa.array(col), _REASON_DICT))
            elif col.dtype == object:
                arrays.append(pa.array(col, f.type, from_pandas=True))
            elif f.nullable and col.dtype.kind == "f":
                mask = np.isnan(col)
                if pa.types.is_boolean(f.type) or pa.types.is_integer(f.type):
                    col = np.where(mask, 0, col).astype(f.type.to_pandas_dtype())
                arrays.append(pa.array(col, f.type, mask=mask if mask.any() else None))
            else:
                arrays.append(pa.array(col, f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def flush(self, run_dirs: Sequence[str | os.PathLike[str]], writer: PartWriter | None = None) -> int:
        """Write one part per run, named by its first iteration; returns rows written per run.

        With a writer the parts are written on its thread: the tables keep the current column buffers (Arrow may
        share their memory), and the buffer continues in fresh ones."""
        if self.filled == 0:
            return 0
        parts = [(self.table(r), f"{os.fspath(d)}/part-{self.first_iteration:08d}.parquet")
                 for r, d in enumerate(run_dirs)]
        if writer is None:
            for table, path in parts:
                write_table_atomic(table, path)
        else:
            self._cols = {k: np.empty_like(v) for k, v in self._cols.items()}
            for table, path in parts:
                writer.submit(table, path)
        rows = self.filled * self.S
        self.filled = 0
        return rows


class PartWriter:
    """Writes Parquet parts on one background thread, so the simulation never waits for compression or the disk.

    At most `max_pending` parts wait (memory stays bounded: a full queue makes submit wait for the oldest). A write
    error is raised by the next submit() or by close(); close() returns when every part is on disk."""

    def __init__(self, store: Store | None = None, max_pending: int = 8) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.store = store or Store.open("/")  # paths given to submit are inside it (default: local paths)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moralsim-parts")
        self._pending: list[Future[None]] = []
        self.max_pending = max(1, max_pending)

    def submit(self, table: pa.Table, path: str | os.PathLike[str]) -> None:
        self._reap(block=len(self._pending) >= self.max_pending)
        self._pending.append(self._pool.submit(write_table_atomic, table, os.fspath(path), self.store))

    def _reap(self, block: bool) -> None:
        while self._pending and (block or self._pending[0].done()):
            self._pending.pop(0).result()
            block = False

    def wait(self) -> None:
        """Return when every submitted part is on disk (raises the first write error)."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
