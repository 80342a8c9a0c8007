"""The run driver: one driver, two backends (in-process loop or Ray tasks) over the same `run_batch`.

    main.py ─► scenarios.cli ─► run_sweep(config, factory, backend)  = run_datasets([config], ...)
                                run_datasets([config per population], ...)   a sweep: one pool, one progress bar
                                   │ take each dataset's lock (simulator/lock.py): a second driver exits 2
                                   │ adopt the newest checkpoints an earlier writer left, into this writer's staging
                                   │ resume: skip runs whose run=<k>/ is committed and matches its _SUCCESS listing;
                                   │ a classic run that does not match is moved aside and run again from its seed
                                   │ split each dataset's pending runs into batches (several runs stacked per engine)
                                   ├─ inline: run_batch(...) in this process
                                   └─ ray:    one task per batch (a CPU; +1 GPU: LLM stack on CUDA), progress via a counter actor
    run_batch: PopulationEngine.step() x num_iterations ─► RecordBuffer ─► PartWriter (a background thread)
               ─► .moralsim-staging/<folder>/writer-<lock generation>/run=<k>/part-*.parquet
               on success each run moves into <output>/<folder>/run=<k>/ with _SUCCESS written last, listing
               every file with its size and SHA-256, once the driver has checked it still holds the lock
               (a rename on a local folder; copies on an object store: simulator/storage.py)
               with --log_to, every run's curves also stream to simulator.tracking (TensorBoard, offline W&B)

The driver is given the agent factory; it never imports actors or scenarios.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from simulator.config import RunConfig
from simulator.contracts import AgentGroup, HoldsResources, SavesState
from simulator.engine import PopulationEngine
from simulator.errors import ConfigError, CorruptDataError, MoralsimError, WorkerLostError
from simulator.lock import STAGING, DatasetLock
from simulator.records import PartWriter, RecordBuffer
from simulator.resources import batch_resources, stack_workers
from simulator.schema import SCHEMA_VERSION
from simulator.seeding import RunStreams, initial_state, run_streams
from simulator.storage import Store, redact, verify_run
from simulator.tracking import Tracker, iteration_metrics, open_tracker, track_every

log = logging.getLogger("moralsim.driver")

GroupFactory = Callable[[RunConfig, Sequence[RunStreams]], list[AgentGroup]]  # scenarios.factory.build_groups
Progress = Callable[[int], None]
DAMAGED = ".moralsim-damaged"  # runs that did not match their _SUCCESS, moved aside before they are run again
MANIFEST = "manifest.json"
PROGRESS_EVERY = 50  # iterations between progress reports...
PROGRESS_SECONDS = 1.0  # ...or seconds, whichever comes first (LLM iterations take seconds each)
MAX_RECOVERIES = 3  # a batch rolls back to its last checkpoint at most this often before it fails
LONG_JOB_S = 3600.0  # a job estimated above this says how long it will take, once...
ETA_AFTER_S = 10.0  # ...measured over this long after the first progress report (set-up left out)


@dataclass(frozen=True)
class RunResult:
    run: int
    rows: int
    seconds: float  # wall time of the whole batch, setup included
    entropy: int
    setup_seconds: float = 0.0  # building the agents and engine


def store_of(cfg: RunConfig) -> Store:
    return Store.open(cfg.output)


def staging_dir(root: str, run: int) -> str:
    """Where run's parts are written until it is whole; root: the writer's staging folder (DatasetLock.staging)."""
    return f"{root}/run={run}"


def run_dir(cfg: RunConfig, run: int) -> str:
    """The run's folder in the dataset (a path inside store_of(cfg))."""
    return store_of(cfg).path(cfg.destination_folder, f"run={run}")


def dataset_path(cfg: RunConfig) -> str:
    return store_of(cfg).path(cfg.destination_folder)


def build_engine(
    cfg: RunConfig, runs: Sequence[int], factory: GroupFactory, compiled: bool = True
) -> tuple[PopulationEngine, list[RunStreams]]:
    """The engine for these runs of cfg, with each run's seeded streams and initial state (compiled: its
    bookkeeping in simulator/engine_kernels.py; False: the numpy reference)."""
    pop = cfg.population
    streams = [run_streams(cfg.seed, r, pop.size) for r in runs]
    init = np.stack([initial_state(s.protocol, pop.size) for s in streams])
    engine = PopulationEngine(
        pop.codes, pop.moral_codes, factory(cfg, streams), cfg.game, [s.protocol for s in streams], init,
        compat=cfg.compat, random_matching=cfg.random_matching, reward_phases=cfg.reward_phases(),
        protocol=cfg.protocol, episode_length=cfg.episode_length, episode_moves=cfg.episode_moves(),
        r_illegal=cfg.r_illegal, compiled=compiled,
    )
    return engine, streams


def take_lock(cfg: RunConfig) -> DatasetLock:
    """cfg's dataset lock (DatasetLockedError when another driver writes it), with the newest checkpoint of each
    batch that earlier writers left carried into this writer's staging."""
    lock = DatasetLock.take(cfg.output, cfg.destination_folder)
    try:
        adopt_staging(store_of(cfg), cfg.destination_folder, lock.staging)
    except BaseException:
        lock.release()
        raise
    return lock


def run_batch(
    cfg: RunConfig, runs: Sequence[int], factory: GroupFactory, progress: Progress | None = None,
    lock: DatasetLock | None = None,
) -> list[RunResult]:
    """Run several runs of one population stacked in one engine; move each into the dataset when done.
    lock: the dataset's lock, held by the driver; without one, run_batch takes it for itself."""
    if lock is None:
        with take_lock(cfg) as own:
            results = run_batch(cfg, runs, factory, progress, own)
            store_of(cfg).delete_dir(own.staging)
            return results
    return _Batch(cfg, runs, factory, progress, lock).run()


class _Batch:
    """One batch's life: prepare (engine, staging, resume), iterate (records, tracking, checkpoints, progress, recovery
    from a lost learner), finish (flush, save), commit (each run into the dataset, whole or not)."""

    def __init__(self, cfg: RunConfig, runs: Sequence[int], factory: GroupFactory, progress: Progress | None,
                 lock: DatasetLock) -> None:
        self.t0 = time.perf_counter()
        self.cfg, self.runs, self.progress, self.lock = cfg, runs, progress, lock
        self.engine, self.streams = build_engine(cfg, runs, factory)
        self.setup = time.perf_counter() - self.t0
        self.store = store_of(cfg)
        self.root = lock.staging
        self.stages = [staging_dir(self.root, r) for r in runs]
        self.ckpt = checkpoint_dir(self.root, runs)
        llm = any(a.learner == "llm" for a in cfg.population.agents)
        games = cfg.games_per_iteration
        # a part holds flush_rows rows, or the whole run when it is shorter: a buffer no longer than that (numpy asks
        # for huge pages for its larger columns, and a first touch of each one costs; on this VM about 4 ms a MB)
        capacity = max(1, min(cfg.flush_rows // games, cfg.num_iterations))
        self.buffer = RecordBuffer(len(runs), cfg.population.codes, capacity=capacity, llm_columns=llm, games=games)
        self.trackers: list[Tracker] = []  # stays empty for log_to="none": the loop then skips tracking entirely
        self.every, self.last = track_every(cfg.num_iterations, llm), cfg.num_iterations - 1
        self.writer = PartWriter(self.store)  # parts are written on a background thread: the loop never waits
        self.rows = 0
        self.unreported, self.last_report = 0, time.perf_counter()

    def run(self) -> list[RunResult]:
        start = self._prepare()
        try:
            self._open_trackers()
            self._iterate(start)
            self.rows += self.buffer.flush(self.stages, self.writer)
            self.writer.close()  # every part on disk (or its error raised) before the run moves into the dataset
            save_groups(self.store, self.engine.groups, self.stages)
        except Exception as e:
            if not isinstance(e, MoralsimError):
                with contextlib.suppress(OSError):  # taken over (its successor cleared this staging): say that instead
                    self.lock.verify()
            raise
        finally:  # a crashed run still flushes the curves it drew, which is when they are most wanted
            self._close()
        if self.progress is not None and self.unreported:
            self.progress(self.unreported * len(self.runs))
        return self._commit()

    def _prepare(self) -> int:
        """Resume from the last checkpoint, or start clean: the first iteration to play."""
        start, self.rows = resume_from_checkpoint(self.cfg, self.runs, self.engine, self.stages, self.root)
        if start == 0:
            self.store.delete_dir(self.ckpt)
            for d in self.stages:
                self.store.delete_dir(d)  # leftovers of an interrupted attempt
                self.store.makedirs(d)
        self.unreported = start
        return start

    def _open_trackers(self) -> None:
        if self.cfg.log_to != "none":
            config = json.loads(json.dumps(self.cfg.identity(), default=_json_default))
            for r in self.runs:
                self.trackers.append(open_tracker(self.cfg.log_to, tracking_dir(self.cfg), f"run={r}",
                                                  {**config, "run": r}))

    def _iterate(self, t: int) -> None:
        recoveries = 0
        while t < self.cfg.num_iterations:
            try:
                rec = self.engine.step()
            except WorkerLostError as e:  # a learner actor died: back to the last checkpoint, once it is restarted
                recoveries += 1
                t = self._recover(t, recoveries, e)
                continue
            self._keep(t, rec)
            t += 1

    def _recover(self, t: int, recoveries: int, error: WorkerLostError) -> int:
        if recoveries > MAX_RECOVERIES or read_checkpoint(self.cfg, self.runs, self.root) is None:
            raise error
        log.warning("%s runs %s, iteration %d: %s; continuing from the last checkpoint", self.cfg.destination_folder,
                    list(self.runs), t, error)
        self.buffer.clear()
        self.writer.wait()
        start, self.rows = resume_from_checkpoint(self.cfg, self.runs, self.engine, self.stages, self.root)
        return start

    def _keep(self, t: int, rec: Any) -> None:
        """Iteration t's records, curves, checkpoint and progress."""
        cfg = self.cfg
        self.buffer.add(rec)
        if self.trackers and (t % self.every == 0 or t == self.last):
            for tracker, metrics in zip(self.trackers, iteration_metrics(rec), strict=True):
                tracker.log(rec.iteration, metrics)
        if self.buffer.full:
            self.rows += self.buffer.flush(self.stages, self.writer)
        if cfg.checkpoint_every and (t + 1) % cfg.checkpoint_every == 0 and t + 1 < cfg.num_iterations:
            self.rows += self.buffer.flush(self.stages, self.writer)
            self.writer.wait()  # the records up to t are on disk before the checkpoint names them
            write_checkpoint(cfg, self.runs, self.engine, self.stages, self.rows, self.root)
        self.unreported += 1
        if self.progress is not None and (
            self.unreported >= PROGRESS_EVERY or time.perf_counter() - self.last_report > PROGRESS_SECONDS
        ):
            self.lock.check()  # taken over by another driver: stop now rather than at the commit
            self.progress(self.unreported * len(self.runs))
            self.unreported, self.last_report = 0, time.perf_counter()

    def _close(self) -> None:
        try:
            self.writer.close()  # after a failure: the parts already queued still land in staging
        except Exception as e:  # never mask the error that stopped the run
            log.error("writing record parts failed too: %s", e)
        for tracker in self.trackers:
            tracker.close()
        for group in self.engine.groups:
            if isinstance(group, HoldsResources):
                group.close()

    def _commit(self) -> list[RunResult]:
        seconds = time.perf_counter() - self.t0
        results = []
        for r, st, d in zip(self.runs, self.streams, self.stages, strict=True):
            listing = {"run": r, "rows": self.rows, "parts": _parts(self.store, d), "files": self.store.digest(d)}
            self.lock.verify()  # a driver that was taken over must not commit into its successor's dataset
            self.store.commit_dir(d, run_dir(self.cfg, r), listing)  # whole, or not
            results.append(RunResult(r, self.rows, seconds, st.entropy, self.setup))
        self.store.delete_dir(self.ckpt)
        return results


def tracking_dir(cfg: RunConfig) -> Path:
    """Where TensorBoard / W&B write: the dataset folder, or ./moralsim-tracking/<folder> for an object store
    (both write local files)."""
    store = store_of(cfg)
    if store.local:
        return Path(dataset_path(cfg))
    return Path("moralsim-tracking") / cfg.destination_folder


def save_groups(store: Store, groups: Sequence[AgentGroup], stages: Sequence[str]) -> None:
    """Groups with state worth keeping (LLM adapters) save it beside the records. They write local folders; on an
    object store they write a scratch folder that is then copied into the staging run."""
    savers = [g for g in groups if isinstance(g, SavesState)]
    if not savers:
        return
    if store.local:
        for group in savers:
            group.save([Path(d) for d in stages])
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="moralsim-save-") as tmp:
        scratch = [Path(tmp) / f"{k}" for k in range(len(stages))]
        for group in savers:
            group.save(scratch)
        for local, d in zip(scratch, stages, strict=True):
            if local.exists():
                store.upload_dir(local, d)


# -- checkpoints ----------------------------------------------------------------------------------------------
# A checkpoint is a batch's whole state between two iterations, beside its staging runs in the writer's folder:
#     <output>/.moralsim-staging/<folder>/writer-<g>/checkpoint-runs=0-1/   state-<iteration>.pt (engine + every
#                                                                            group), checkpoint.json (names it;
#                                                                            written last)
# The state file gets a new name each time and checkpoint.json is replaced in one write after it, so a crash at any
# moment leaves the previous checkpoint or the new one, whole, with no rename (object stores have none); older
# state files are deleted after the commit. checkpoint.json lists the record parts written so far; resuming deletes
# every later part and continues from the next iteration with every random stream where it was, so the finished run
# equals one that never stopped, and no record is lost or written twice.
CHECKPOINT_MANIFEST = "checkpoint.json"


def checkpoint_dir(root: str, runs: Sequence[int]) -> str:
    """The batch's checkpoint folder in the writer's staging folder root."""
    return f"{root}/checkpoint-runs={'-'.join(map(str, runs))}"


def adopt_staging(store: Store, folder: str, mine: str) -> None:
    """Carry the newest checkpoint of each batch that earlier writers of the dataset left (a killed driver, one
    that was taken over, or the single staging folder of datasets from before the lock) into this writer's
    staging folder mine, with the record parts it names, then delete their folders. Copies, never moves: a
    writer taken for dead that still runs keeps its own files, and checkpoint.json is copied last, as the commit."""
    base = store.path(STAGING, folder)
    others = [f"{base}/{n}" for n in store.names(base) if n.startswith("writer-") and f"{base}/{n}" != mine]
    best: dict[str, tuple[int, str, dict[str, Any]]] = {}
    for src in [*others, base]:
        for name in store.names(src):
            if not name.startswith("checkpoint-runs="):
                continue
            try:
                manifest = store.read_json(f"{src}/{name}/{CHECKPOINT_MANIFEST}")
                iteration = int(manifest["iteration"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # none committed there
            if name not in best or iteration > best[name][0]:
                best[name] = (iteration, src, manifest)
    for name, (iteration, src, manifest) in sorted(best.items()):
        for run, parts in manifest["parts"].items():
            store.makedirs(f"{mine}/run={run}")
            for part in parts:
                store.copy_file(f"{src}/run={run}/{part}", f"{mine}/run={run}/{part}")
        store.makedirs(f"{mine}/{name}")
        store.copy_file(f"{src}/{name}/{manifest['state']}", f"{mine}/{name}/{manifest['state']}")
        store.copy_file(f"{src}/{name}/{CHECKPOINT_MANIFEST}", f"{mine}/{name}/{CHECKPOINT_MANIFEST}")
        log.info("%s: carried the checkpoint of %s at iteration %d over from %s", folder, name, iteration,
                 store.display(src))
    for src in others:
        store.delete_dir(src)
    for name in store.names(base):  # the staging layout before the lock: one folder shared by every driver
        if name.startswith(("run=", "checkpoint-runs=")):
            store.delete_dir(f"{base}/{name}")


def _parts(store: Store, stage: str) -> list[str]:
    return [n for n in store.names(stage) if n.startswith("part-") and n.endswith(".parquet")]


def write_checkpoint(cfg: RunConfig, runs: Sequence[int], engine: PopulationEngine,
                     stages: Sequence[str | os.PathLike[str]], rows: int, root: str) -> str:
    """Commit the batch's state after iteration engine.iteration - 1 (see the comment above)."""
    from simulator.contracts import Checkpointable

    t0 = time.perf_counter()
    store, d = store_of(cfg), checkpoint_dir(root, runs)
    store.makedirs(d)
    state_name = f"state-{engine.iteration:08d}.pt"
    groups = [g.state_dict() if isinstance(g, Checkpointable) else g for g in engine.groups]
    # torch.save keeps tensors that share storage (DQN parameter views) shared, unlike plain pickle
    size = store.save_torch({"engine": engine.state_dict(), "groups": groups}, f"{d}/{state_name}")
    manifest = {
        "iteration": engine.iteration,
        "runs": list(runs),
        "rows": rows,
        "state": state_name,
        "parts": {str(r): _parts(store, os.fspath(stage)) for r, stage in zip(runs, stages, strict=True)},
        "config": json.loads(json.dumps(cfg.identity(), default=_json_default)),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store.write_json(f"{d}/{CHECKPOINT_MANIFEST}", manifest, indent=1)  # the commit
    for name in store.names(d):
        if name.startswith("state-") and name != state_name:
            store.delete_file(f"{d}/{name}")
    log.info("checkpoint at iteration %d: %.1f MB in %.2f s (%s)", engine.iteration, size / 2**20,
             time.perf_counter() - t0, store.display(d))
    return d


def read_checkpoint(cfg: RunConfig, runs: Sequence[int], root: str) -> tuple[str, dict[str, Any]] | None:
    """The batch's last committed checkpoint in the writer's staging folder root, or None (none, another batch
    layout, or another configuration)."""
    store, d = store_of(cfg), checkpoint_dir(root, runs)
    path = f"{d}/{CHECKPOINT_MANIFEST}"
    if not store.is_file(path):
        return None
    try:
        manifest = store.read_json(path)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable checkpoint %s: %s", store.display(path), e)
        return None
    mine = json.loads(json.dumps(cfg.identity(), default=_json_default))
    if manifest.get("config") != mine or manifest.get("runs") != list(runs):
        log.warning("ignoring checkpoint %s: it was written for another configuration or batch", store.display(d))
        return None
    return d, manifest


def resume_from_checkpoint(cfg: RunConfig, runs: Sequence[int], engine: PopulationEngine,
                           stages: Sequence[str | os.PathLike[str]], root: str) -> tuple[int, int]:
    """Continue the batch from its last checkpoint: (first iteration to run, rows already written per run).
    (0, 0) when there is none. Parts written after the checkpoint are deleted; the ones it lists stay untouched."""
    from simulator.contracts import Checkpointable

    found = read_checkpoint(cfg, runs, root)
    if found is None:
        return 0, 0
    d, manifest = found
    store = store_of(cfg)
    for r, stage in zip(runs, [os.fspath(s) for s in stages], strict=True):
        listed = set(manifest["parts"].get(str(r), []))
        missing = sorted(listed - set(_parts(store, stage)))
        if missing:
            raise CorruptDataError(f"checkpoint {store.display(d)} lists record parts that are gone from "
                                   f"{store.display(stage)}: {missing[:3]}; delete {store.display(d)} to start the "
                                   "batch over")
        for name in store.names(stage):
            if name not in listed and (name.startswith("part-") or name.endswith(".tmp")):
                store.delete_file(f"{stage}/{name}")  # written after the checkpoint: written again, identically
    state = store.load_torch(f"{d}/{manifest['state']}")
    engine.load_state_dict(state["engine"])
    for k, (group, saved) in enumerate(zip(engine.groups, state["groups"], strict=True)):
        if isinstance(group, Checkpointable):
            group.load_state_dict(saved)
        else:
            engine.groups[k] = saved
    log.info("%s runs %s: resuming from the checkpoint at iteration %d", cfg.destination_folder, list(runs),
             engine.iteration)
    return engine.iteration, int(manifest["rows"])


# -- manifest -------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("moralsim", "numpy", "pyarrow", "polars", "torch", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def read_manifest(path: str, store: Store) -> dict[str, Any]:
    try:
        data: dict[str, Any] = store.read_json(path)
        return data
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptDataError(f"cannot read manifest {store.display(path)}: {e}") from e


def _json_default(o: object) -> object:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_manifest(cfg: RunConfig, runs: dict[int, dict[str, Any]]) -> None:
    store = store_of(cfg)
    pop = cfg.population
    doc = {
        "schema_version": SCHEMA_VERSION,
        "population": cfg.destination_folder,
        "agents": list(pop.codes),
        "game": cfg.game.id,
        "num_iterations": cfg.num_iterations,
        "num_runs": cfg.num_runs,
        "seed": cfg.seed,
        "seeding": "SeedSequence(seed, spawn_key=(run,)).spawn(1 + N): [protocol, agent 0..N-1]",
        "config": cfg.identity(),
        "versions": _versions(),
        "command": [redact(a) for a in sys.argv],
        "runs": {str(k): v for k, v in sorted(runs.items())},
    }
    store.makedirs(dataset_path(cfg))
    store.write_json(f"{dataset_path(cfg)}/{MANIFEST}", doc, indent=2, default=_json_default)


def _completed_runs(cfg: RunConfig) -> dict[int, dict[str, Any]]:
    """Runs already in the dataset (committed, and matching the size and SHA-256 of every file their _SUCCESS
    lists) with their row counts. A classic run that does not match is moved aside into <output>/.moralsim-damaged/
    and left out, so that it runs again from its seed (the same records); an LLM run cannot be recomputed that way,
    so a mismatch there is a CorruptDataError naming the bad files. Runs whose _SUCCESS lists no hashes (written
    before it did) count as done unchecked. Call it holding the dataset's lock."""
    done: dict[int, dict[str, Any]] = {}
    damaged: list[str] = []
    store = store_of(cfg)
    manifest_path = f"{dataset_path(cfg)}/{MANIFEST}"
    old: dict[str, Any] = {}
    if store.exists(manifest_path):
        doc = read_manifest(manifest_path, store)
        mine = json.loads(json.dumps(cfg.identity(), default=_json_default))
        theirs = doc.get("config", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ConfigError(
                f"{store.display(dataset_path(cfg))} already holds runs made with a different configuration "
                f"(differs in: {', '.join(diff)}). Use another --output, or delete that folder."
            )
        old = doc.get("runs", {})
    llm = any(a.learner == "llm" for a in cfg.population.agents)
    for k in cfg.run_indices:
        d = run_dir(cfg, k)
        if store.committed(d):
            problems = verify_run(store, d)
            if problems and llm:
                damaged.append(f"run={k} ({'; '.join(problems)})")
                continue
            if problems:
                aside = store.path(DAMAGED, cfg.destination_folder, f"run={k}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
                store.move_dir(d, aside)
                log.warning("%s does not match its _SUCCESS (%s): moved aside to %s; running it again from its seed",
                            store.display(d), "; ".join(problems), store.display(aside))
                continue
            info = old.get(str(k))
            if info is None:  # finished but the manifest was not updated before a crash
                info = {"rows": sum(store.num_rows(f"{d}/{p}") for p in _parts(store, d))}
            done[k] = info
    if damaged:
        where = store.display(dataset_path(cfg))
        raise CorruptDataError(
            f"{where}: LLM runs whose files do not match their _SUCCESS: {', '.join(damaged)}. An LLM run cannot be "
            "run again identically from its seed, and a finished one keeps no checkpoint: restore those files from a "
            f"copy, or move the run folder out of {where} to run it again from the start")
    return done


# -- backends -------------------------------------------------------------------------------------------------
def plan_batches(pending: Sequence[int], workers: int, num_agents: int, max_stack_agents: int = 2048) -> list[list[int]]:
    """Split pending runs into batches: about one batch per worker, with at most max_stack_agents stacked."""
    if not pending:
        return []
    per = math.ceil(len(pending) / max(1, workers))
    per = max(1, min(per, max_stack_agents // max(1, num_agents)))
    return [list(pending[i : i + per]) for i in range(0, len(pending), per)]


def local_backend(backend: str, ray_address: str | None, batches: Sequence[RunConfig]) -> str:
    """The backend for these batches (one config per batch) on this machine: "inline" where Ray has nothing to
    spread, else `backend`."""
    if backend != "ray" or ray_address is not None:
        return backend
    if len(batches) == 1:
        # one batch (e.g. one LLM run) has nothing to spread: Ray would add its start-up and a low-priority worker
        log.info("one batch of runs: running it in this process")
        return "inline"
    if all(stack_workers(cfg, 2) == 1 for cfg in batches):
        # LLM stacks on this machine's CPU: each wants every core (its OpenMP threads), and two side by side spin
        # on each other's cores at half the speed of one after the other (measured: 15 s against 7.7 s an episode)
        log.info("%d LLM stacks on the CPU: running them one after the other in this process", len(batches))
        return "inline"
    return backend


def run_sweep(
    cfg: RunConfig,
    factory: GroupFactory,
    backend: str = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    show_progress: bool | None = None,
    runs_per_batch: int | None = None,
) -> dict[int, dict[str, Any]]:
    """Run every run of cfg that is not in the dataset yet; returns the manifest's run table."""
    return run_datasets([cfg], factory, backend, ray_address, num_cpus, show_progress, runs_per_batch)[0]


def run_datasets(
    cfgs: Sequence[RunConfig],
    factory: GroupFactory,
    backend: str = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    show_progress: bool | None = None,
    runs_per_batch: int | None = None,
) -> list[dict[int, dict[str, Any]]]:
    """Run every missing run of several datasets (e.g. the nine AIES populations) as one job: the batches of all of
    them share one pool (one Ray task per batch, or one after the other inline) and one progress bar. Each dataset
    keeps its own manifest and resumes on its own, and its own lock, held from the first read to the last write.
    Returns each dataset's manifest run table, in the order of cfgs."""
    if backend not in ("ray", "inline"):
        raise ConfigError(f"unknown backend {backend!r}; valid: ray, inline")
    if runs_per_batch is not None and runs_per_batch < 1:
        raise ConfigError(f"runs_per_batch must be at least 1, got {runs_per_batch}")
    dirs = [store_of(cfg).display(dataset_path(cfg)) for cfg in cfgs]
    repeated = sorted({str(d) for d in dirs if dirs.count(d) > 1})
    if repeated:
        raise ConfigError(f"each dataset may appear once in a sweep; repeated: {', '.join(repeated)}")
    with contextlib.ExitStack() as held:
        # every dataset's lock first (one held by a live driver refuses the whole command before any write), then
        # every dataset checked (a different configuration is refused, damaged runs moved aside) before any work
        locks = [held.enter_context(take_lock(cfg)) for cfg in cfgs]
        done = [_completed_runs(cfg) for cfg in cfgs]
        return _run_locked(cfgs, locks, done, factory, backend, ray_address, num_cpus, show_progress, runs_per_batch)


def _run_locked(
    cfgs: Sequence[RunConfig],
    locks: Sequence[DatasetLock],
    done: list[dict[int, dict[str, Any]]],
    factory: GroupFactory,
    backend: str,
    ray_address: str | None,
    num_cpus: int | None,
    show_progress: bool | None,
    runs_per_batch: int | None,
) -> list[dict[int, dict[str, Any]]]:
    from tqdm.auto import tqdm

    cpus = num_cpus or os.cpu_count() or 1
    workers = 1 if backend == "inline" else cpus
    jobs: list[tuple[int, list[int]]] = []  # (index into cfgs, runs stacked in one engine)
    for i, cfg in enumerate(cfgs):
        pending = [k for k in cfg.run_indices if k not in done[i]]
        write_manifest(cfg, done[i])
        if not pending:
            log.info("all %d runs of %s are complete; nothing to do", cfg.num_runs, store_of(cfg).display(dataset_path(cfg)))
            store_of(cfg).delete_dir(locks[i].staging)
            continue
        if done[i]:
            log.info("%s: resuming, %d runs complete, %d to run", cfg.destination_folder, len(done[i]), len(pending))
        batches = (
            [pending[j : j + runs_per_batch] for j in range(0, len(pending), runs_per_batch)]
            if runs_per_batch
            else plan_batches(pending, stack_workers(cfg, workers), cfg.population.size)
        )
        jobs.extend((i, batch) for batch in batches)
    if not jobs:
        return list(done)
    backend = local_backend(backend, ray_address, [cfgs[i] for i, _ in jobs])
    runs = sum(len(batch) for _, batch in jobs)
    populations = len({i for i, _ in jobs})
    total = sum(len(batch) * cfgs[i].num_iterations for i, batch in jobs)
    desc = (f"{cfgs[jobs[0][0]].destination_folder} ({runs} runs)" if populations == 1
            else f"{populations} populations ({runs} runs)")
    bar = tqdm(total=total, unit="it", unit_scale=True, disable=show_progress is False, smoothing=0.05, desc=desc)
    eta = Eta(total, desc)
    failures: list[str] = []

    def advance(n: int) -> None:
        bar.update(n)
        eta.update(n)

    def finished(i: int, results: list[RunResult]) -> None:
        for res in results:
            done[i][res.run] = {"rows": res.rows, "seconds": round(res.seconds, 3), "entropy": str(res.entropy)}
        locks[i].verify()
        write_manifest(cfgs[i], done[i])

    try:
        if backend == "inline":
            for i, batch in jobs:
                finished(i, run_batch(cfgs[i], batch, factory, advance, locks[i]))
        else:
            failures = _run_ray(cfgs, locks, jobs, factory, advance, finished, ray_address, num_cpus)
    finally:
        bar.close()
    if failures:
        raise RuntimeError(
            f"{len(failures)} batch(es) failed; completed runs are kept and a re-run resumes the rest:\n"
            + "\n".join(failures)
        )
    for cfg, lock in zip(cfgs, locks, strict=True):
        store_of(cfg).delete_dir(lock.staging)  # every run committed: nothing left to resume
    return list(done)


class Eta:
    """Says once how long a job will take when its first iterations put it above LONG_JOB_S: the progress bar's
    ETA is easy to miss (or off, with --no_progress), and a job of hours is worth knowing about at its start.
    The rate is measured from the first progress report on, which leaves set-up (Ray, model loading) out."""

    def __init__(self, total: int, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.clock = total, label, clock
        self.start = clock()
        self.done = 0
        self.first: tuple[float, int] | None = None  # (time, iterations done) at the first report
        self.said: str | None = None
        self.decided = False

    def update(self, n: int) -> None:
        self.done += n
        if self.decided or n <= 0:
            return
        now = self.clock()
        if self.first is None:
            self.first = (now, self.done)
            return
        measured, since = now - self.first[0], self.done - self.first[1]
        if measured < ETA_AFTER_S or since <= 0:
            return
        self.decided = True
        left = (self.total - self.done) * measured / since
        if now - self.start + left > LONG_JOB_S:
            self.said = (f"{self.label}: about {_duration(now - self.start + left)} in all, {_duration(left)} to go "
                         f"({since / measured:,.1f} it/s over {since:,} iterations; {self.total:,} iterations)")
            log.info("%s", self.said)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours / 24:.1f} days"


class ProgressCounter:
    """Counts iterations reported by Ray tasks; the driver reads and resets it (hosted as a Ray actor)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def _ray_task(cfg: RunConfig, runs: list[int], factory: GroupFactory, counter: Any, lock: DatasetLock) -> list[RunResult]:
    return run_batch(cfg, runs, factory, lambda n: counter.add.remote(n), lock)


def _run_ray(
    cfgs: Sequence[RunConfig],
    locks: Sequence[DatasetLock],
    jobs: list[tuple[int, list[int]]],
    factory: GroupFactory,
    advance: Progress,
    finished: Callable[[int, list[RunResult]], None],
    address: str | None,
    num_cpus: int | None,
) -> list[str]:
    import ray

    from simulator.cluster import connect

    connect(address, num_cpus)  # fails fast, naming the address, when no cluster answers there
    if address:  # tasks on other nodes write the records: they must land where this driver reads them
        from simulator.cluster import check_shared_output

        for out in dict.fromkeys(str(c.output) for c in cfgs):
            check_shared_output(out)
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    task = ray.remote(max_retries=0)(_ray_task)  # a CPU each; a GPU each for LLM stacks on CUDA (batch_resources)
    refs = {task.options(**batch_resources(cfgs[i])).remote(cfgs[i], batch, factory, counter, locks[i]): (i, batch)
            for i, batch in jobs}
    failures = []
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        advance(ray.get(counter.take.remote()))  # type: ignore[attr-defined,arg-type]
        try:
            for lock in locks:
                lock.check()
        except Exception:  # taken over: this driver's tasks must not go on writing
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        for ref in ready:
            i, batch = refs[ref]
            try:
                finished(i, ray.get(ref))
            except Exception as e:  # a failed batch must not lose the others
                log.error("%s runs %s failed: %s", cfgs[i].destination_folder, batch, e)
                failures.append(f"{cfgs[i].destination_folder} runs {batch}: {type(e).__name__}: {e}")
    advance(ray.get(counter.take.remote()))  # type: ignore[attr-defined,arg-type]
    return failures
