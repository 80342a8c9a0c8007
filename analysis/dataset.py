"""Open one destination folder as a lazy polars frame, skipping part files that cannot be read.

    <output>/<destination_folder>/manifest.json
    <output>/<destination_folder>/run=<k>/part-<first iteration:08d>.parquet

Every part's footer is read first (`pyarrow.parquet.read_metadata`, a few KiB per file). A part whose footer does not
parse, or that lacks a column of `simulator.schema.RECORD_SCHEMA`, is logged, listed in `Dataset.bad_parts`, and left
out of the scan; the rest is analysed. Only a folder with no readable part at all raises `CorruptDataError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from simulator.errors import CorruptDataError
from simulator.schema import LLM_RECORD_SCHEMA, PARTITION_COLUMN, RECORD_SCHEMA

log = logging.getLogger(__name__)

PART_GLOB = f"{PARTITION_COLUMN}=*/part-*.parquet"
_RUN_DIR = re.compile(rf"^{PARTITION_COLUMN}=(\d+)$")
_CORE_NAMES = frozenset(RECORD_SCHEMA.names)
_LLM_NAMES = frozenset(LLM_RECORD_SCHEMA.names) - _CORE_NAMES


@dataclass(frozen=True)
class BadPart:
    path: Path
    reason: str


@dataclass(frozen=True)
class Dataset:
    folder: Path
    manifest: dict[str, Any]  # manifest.json ({} if missing or unreadable; see problems)
    parts: tuple[Path, ...]  # readable parts, sorted
    bad_parts: tuple[BadPart, ...] = ()
    problems: tuple[str, ...] = ()  # other warnings (manifest, ...), already logged
    has_llm: bool = False  # whether the LLM columns are present
    num_rows: int = 0  # from the footers of the readable parts
    _schema: dict[str, pl.DataType] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def population(self) -> str:
        return str(self.manifest.get("population", self.folder.name))

    def scan(self) -> pl.LazyFrame:
        """All readable parts as one LazyFrame, with the hive column `run` (Int32)."""
        return pl.scan_parquet(
            [str(p) for p in self.parts],
            hive_partitioning=True,
            hive_schema={PARTITION_COLUMN: pl.Int32},
            schema=self._schema,
            missing_columns="insert",  # a run without LLM agents next to one with them
            extra_columns="ignore",
        )


def _polars_schema(llm: bool) -> dict[str, pl.DataType]:
    schema = LLM_RECORD_SCHEMA if llm else RECORD_SCHEMA
    return dict(pl.from_arrow(schema.empty_table()).schema)  # type: ignore[union-attr]


def _check_part(path: Path) -> tuple[int, bool]:
    """(rows, has LLM columns) from the footer; raises CorruptDataError if the part is unusable."""
    try:
        meta = pq.read_metadata(path)
        names = set(meta.schema.to_arrow_schema().names)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) or OSError for bad footers
        raise CorruptDataError(f"{path}: unreadable Parquet footer ({e})") from e
    missing = sorted(_CORE_NAMES - names)
    if missing:
        raise CorruptDataError(f"{path}: missing record columns {missing}; expected simulator.schema.RECORD_SCHEMA")
    return meta.num_rows, bool(names & _LLM_NAMES)


CACHE = Path(os.environ.get("MORALSIM_CACHE", Path.home() / ".cache" / "moralsim")) / "datasets"


def local_copy(location: str | os.PathLike[str], cache: Path | None = None) -> Path:
    """The dataset as a local folder: a local path as it is; a dataset on an object store (an --output URI) copied
    into ~/.cache/moralsim/datasets/ (MORALSIM_CACHE): its manifest and every committed run (`_SUCCESS` there;
    runs still being written are left out). Files already copied with the same size are not copied again."""
    from simulator.storage import SUCCESS, Store, is_uri

    if not is_uri(location):
        return Path(location)
    text = os.fspath(location)
    base, _, _ = text.partition("?")
    target = (cache or CACHE) / re.sub(r"[^A-Za-z0-9._=-]+", "_", base.split("://", 1)[1]).strip("_")
    store = Store.open(text)
    if not store.is_dir(store.root):
        raise CorruptDataError(f"{text}: no dataset there; expected <output URI>/<destination_folder>")
    files = dict(store.files(store.root))
    # a run is committed when its _SUCCESS is there (Store.committed), read off the one listing
    committed = {rel.split("/", 1)[0] for rel in files if _RUN_DIR.match(rel.split("/", 1)[0])
                 and rel.split("/", 1)[1:] == [SUCCESS]}
    copied = 0
    for rel, size in files.items():
        if "/" in rel and rel.split("/", 1)[0] not in committed:
            continue  # staging, a run not committed yet, anything else
        dest = target / rel
        if dest.is_file() and dest.stat().st_size == size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(store.read_bytes(store.path(rel)))
        os.replace(tmp, dest)
        copied += 1
    log.info("%s: %d files copied into %s", base, copied, target)
    return target


@dataclass(frozen=True)
class RunCheck:
    run: str  # run=<k>
    status: str  # "ok", "unlisted" (no hashes to check: written before _SUCCESS listed them), "bad", "uncommitted"
    detail: str


def verify_dataset(location: str | os.PathLike[str]) -> list[RunCheck]:
    """Check every run of the dataset at location (a folder or an --output URI's <folder>, read in place) against
    the size and SHA-256 its `_SUCCESS` lists for each file (simulator.storage.verify_run), without the driver."""
    from simulator.storage import Store, redact, verify_run

    store = Store.open(location)
    if not store.is_dir(store.root):
        raise CorruptDataError(f"{redact(os.fspath(location))}: no dataset there; expected <output>/<destination_folder>")
    names = [n for n in store.names(store.root) if _RUN_DIR.match(n)]
    checks = []
    for name in sorted(names, key=lambda n: int(n.split("=")[1])):
        path = f"{store.root}/{name}"
        if not store.committed(path):
            checks.append(RunCheck(name, "uncommitted", "no _SUCCESS: being written, or left by a crash; not part of the dataset"))
            continue
        problems = verify_run(store, path)
        if problems is None:
            checks.append(RunCheck(name, "unlisted", "its _SUCCESS lists no hashes (written before they were recorded): "
                                   "counted as whole, nothing to check"))
        elif problems:
            checks.append(RunCheck(name, "bad", "; ".join(problems)))
        else:
            files = len(store.read_json(f"{path}/_SUCCESS")["files"])
            checks.append(RunCheck(name, "ok", f"{files} files match their size and SHA-256"))
    return checks


def open_dataset(folder: str | os.PathLike[str]) -> Dataset:
    """Check every part's footer and the manifest; return the readable rest. Raise CorruptDataError if none is.
    A dataset on an object store is read from its local copy (local_copy)."""
    folder = local_copy(folder)
    if not folder.is_dir():
        raise CorruptDataError(f"{folder}: not a directory; expected <output>/<destination_folder>")
    problems: list[str] = []
    manifest: dict[str, Any] = {}
    mpath = folder / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"expected a JSON object, got {type(manifest).__name__}")
    except (OSError, ValueError) as e:
        manifest = {}
        problems.append(f"{mpath}: manifest missing or unreadable ({e})")
        log.warning(problems[-1])

    candidates = sorted(folder.glob(PART_GLOB))
    run_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _RUN_DIR.match(p.name))
    for d in run_dirs:
        if not any(d.glob("part-*.parquet")):
            problems.append(f"{d}: run directory without part files")
            log.warning(problems[-1])

    good: list[Path] = []
    bad: list[BadPart] = []
    rows = 0
    llm = False
    for path in candidates:
        try:
            n, has_llm = _check_part(path)
        except CorruptDataError as e:
            log.warning("skipping part %s", e)
            bad.append(BadPart(path, str(e)))
            continue
        good.append(path)
        rows += n
        llm = llm or has_llm
    if not good:
        raise CorruptDataError(
            f"{folder}: no readable part file (found {len(candidates)} matching {PART_GLOB}, {len(bad)} unreadable)"
        )
    expected_runs = manifest.get("num_runs")
    if isinstance(expected_runs, int) and len(run_dirs) < expected_runs:
        problems.append(f"{folder}: manifest says {expected_runs} runs, found {len(run_dirs)} run directories")
        log.warning(problems[-1])
    return Dataset(folder, manifest, tuple(good), tuple(bad), tuple(problems), llm, rows, _polars_schema(llm))


def scan_eval(path: str | os.PathLike[str]) -> pl.LazyFrame:
    """The evaluation-suite output (one row per answer): model and/or adapter, game, action_tokens, prompt_variant,
    legal (bool), action (int8, null if illegal). Its format is not fixed yet; this only checks the columns."""
    path = Path(path)
    try:
        names = set(pq.read_schema(path).names) if path.is_file() else set(pl.scan_parquet(path).collect_schema())
    except (OSError, ValueError, pl.exceptions.PolarsError) as e:
        raise CorruptDataError(f"{path}: cannot read evaluation Parquet ({e})") from e
    need = {"game", "legal", "action"}
    if not need <= names or not names & {"model", "adapter"}:
        raise CorruptDataError(
            f"{path}: evaluation Parquet needs columns model and/or adapter, game, legal, action; has {sorted(names)}"
        )
    return pl.scan_parquet(path)


def deep_check(ds: Dataset) -> Dataset:
    """Read every part in full and drop the ones that fail. Slow; used only after a scan of footer-checked parts
    failed, i.e. when a part has a sound footer but a damaged body."""
    good: list[Path] = []
    bad = list(ds.bad_parts)
    rows = 0
    for path in ds.parts:
        try:
            rows += pq.ParquetFile(path).read().num_rows
        except (OSError, ValueError) as e:
            err = CorruptDataError(f"{path}: unreadable Parquet data ({e})")
            log.warning("skipping part %s", err)
            bad.append(BadPart(path, str(err)))
            continue
        good.append(path)
    if not good:
        raise CorruptDataError(f"{ds.folder}: no readable part file ({len(bad)} unreadable)")
    return replace(ds, parts=tuple(good), bad_parts=tuple(bad), num_rows=rows)
