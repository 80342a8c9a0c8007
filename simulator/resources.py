"""How much memory a run needs, estimated before anything is allocated, against what the machine has.

What grows with the population size N (per batch of R runs stacked in one engine, S games an iteration):
    partner selection   every agent sees the other N-1: the engine's (N, N-1) index, (R, N, N-1) states a step
    DQN networks        per agent a selection net (N-1) -> H -> (N-1): about 2 (N-1) H floats, held three times
                        (weights, two Adam moments; the torch path, DQNConfig(fused=False), adds the gradients):
                        so R N^2 H * 24 bytes in all, the term that makes '2000xS' need hundreds of GiB
    tabular Q tables    one row of N-1 values per visited selection state, up to min(iterations, 2^(N-1)) an agent
    record buffer       flush_rows rows per run (at least one iteration, N rows), plus one run's copy at a flush
    random numbers      256 iterations of (N, 7) uniforms per run
LLM model weights are not counted (the LLM stack sizes those itself). The estimate errs on the high side for the
big terms and ignores what does not grow with N.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from simulator.config import RunConfig
from simulator.errors import ConfigError

log = logging.getLogger("moralsim.resources")

GiB = 1 << 30
PROCESS_BYTES = 400 << 20  # Python with numpy, torch and pyarrow imported: the driver, and each Ray worker
RAY_BYTES = 600 << 20  # a local Ray's own processes (GCS, raylet, ...)
STRING_BYTES = 64  # a buffered LLM string column: the pointer and a short str object
RANDOMNESS_CHUNK, U_COLUMNS = 256, 7  # simulator.engine's block of uniforms (not imported: keeps this module light)
MAX_STACK_AGENTS = 2048  # simulator.driver.plan_batches' default cap on the agents stacked in one engine


@dataclass(frozen=True)
class MemoryEstimate:
    runs: int  # runs stacked in the batch
    parts: dict[str, int] = field(default_factory=dict)  # bytes by what holds them

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self, top: int = 3) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{name} {gib(b)}" for name, b in big if b)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.0f} MiB"


def record_row_bytes(llm: bool) -> int:
    """Bytes one buffered record row takes (simulator.records.RecordBuffer's column dtypes)."""
    from simulator.schema import LLM_RECORD_SCHEMA, RECORD_SCHEMA

    total = 0
    for f in LLM_RECORD_SCHEMA if llm else RECORD_SCHEMA:
        if f.name in ("selector_type", "selected_type"):  # derived from selector/selected at a flush
            continue
        t = f.type
        if pa.types.is_dictionary(t):
            total += 1
        elif pa.types.is_string(t):
            total += 8 + STRING_BYTES
        elif pa.types.is_boolean(t):
            total += 4
        elif pa.types.is_integer(t) and f.nullable:
            total += 8
        else:
            total += t.bit_width // 8
    return total


DQN_GRAD_CHUNK_BYTES = 64 << 20  # actors.dqn.GRAD_CHUNK_BYTES: above it, selection gradients are held a chunk at a time


def estimate_batch(cfg: RunConfig, runs: int, hidden: int = 256) -> MemoryEstimate:
    """Peak memory of one batch of `runs` runs of cfg in one engine, without the process itself."""
    pop = cfg.population
    n_agents, R, S = pop.size, runs, cfg.games_per_iteration
    n = n_agents - 1
    kinds = Counter("static" if a.is_static else a.learner for a in pop.agents)
    parts: dict[str, int] = {}
    # others index (int64) and its temporaries, and each step's selection states and their index gathers
    parts["partner-selection state"] = 32 * n_agents * n + 2 * R * n_agents * n
    parts["random numbers"] = 2 * R * RANDOMNESS_CHUNK * n_agents * U_COLUMNS * 8
    parts["per-iteration arrays"] = R * (640 * S + 160 * n_agents)
    if kinds["dqn"]:
        B = R * kinds["dqn"]
        sel, dil = 2 * n * hidden + hidden + n, 4 * hidden + 2
        copies = 2 if cfg.random_matching else 3  # weights and gradients; trained: weights and two Adam moments
        # DQNConfig.fused (the default): gradients are made inside the Adam step (actors/dqn_fused.py), none held
        fused = getattr(getattr(cfg.agents, "dqn", None), "fused", True) and not cfg.random_matching
        parts["DQN networks"] = 4 * B * (copies * sel + (3 if fused else 4) * dil + 3 * n + 2 * hidden)
        if fused:  # LLVM's memory while numba compiles the fused kernels, once per process (less from numba's cache)
            parts["compiled DQN kernels"] = NUMBA_JIT_BYTES
        if not (cfg.random_matching or fused):  # selection gradients: whole, or one chunk of agents at a time
            whole = 4 * B * sel
            parts["DQN selection gradients"] = min(whole, DQN_GRAD_CHUNK_BYTES) if B % 16 == 0 else whole
    if kinds["tabularQ"] and not cfg.random_matching:
        states = min(cfg.num_iterations, 2 ** min(n, 62))
        parts["tabular Q tables"] = R * kinds["tabularQ"] * (32 + states * (8 * n + 250))
    rows = max(1, cfg.flush_rows // S) * S
    row = record_row_bytes(kinds["llm"] > 0)
    parts["record buffer"] = (R + 2) * rows * row
    return MemoryEstimate(R, parts)


def machine_memory() -> tuple[int, int]:
    """(total, available now) bytes of memory this process may use: physical memory, capped by a cgroup limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
        break
    available = total
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = min(total, int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return total, available


NUMBA_JIT_BYTES = 128 * 2**20  # measured: a fresh checkout's first DQN group grew its process by ~130 MiB more than
# its arrays (tests/test_cli_hardening.py, test_memory_estimate_matches_what_a_run_allocates)


def stack_workers(cfg: RunConfig, workers: int) -> int:
    """The workers cfg's runs are spread over: all of them for classic runs; one for runs with LLM agents on the CPU,
    whose runs stack in one engine and one learner host (one model copy, every run's decisions in one call), where a
    batch per core would load a copy per core and split the same cores between them."""
    if not any(a.learner == "llm" for a in cfg.population.agents):
        return workers
    llm = getattr(cfg.agents, "llm", None)
    return 1 if getattr(llm, "device", "cpu") == "cpu" else workers


def batch_resources(cfg: RunConfig) -> dict[str, float]:
    """What one batch's Ray task asks of the cluster: a CPU; and a whole GPU when its LLM agents run on CUDA in the
    task's own process (engine and learners beside the records), so Ray places one stack of runs per GPU and queues
    the rest. With rollout actors the actors hold the GPUs (llm.actors), and the task needs none."""
    llm = getattr(cfg.agents, "llm", None)
    on_gpu = (any(a.learner == "llm" for a in cfg.population.agents) and llm is not None
              and str(getattr(llm, "device", "cpu")).startswith("cuda") and not llm.actors.enabled)
    return {"num_cpus": 1.0, "num_gpus": 1.0} if on_gpu else {"num_cpus": 1.0}


def batch_sizes(cfg: RunConfig, workers: int, runs_per_batch: int | None) -> dict[int, int]:
    """{runs stacked in a batch: number of such batches}, as simulator.driver.plan_batches splits cfg.num_runs
    pending runs (counted, not listed: --num_runs 10**9 must not build a list here)."""
    runs, workers = cfg.num_runs, stack_workers(cfg, workers)
    # plan_batches: about one batch per worker, at most MAX_STACK_AGENTS agents stacked
    planned = max(1, min(math.ceil(runs / max(1, workers)), MAX_STACK_AGENTS // max(1, cfg.population.size)))
    per = runs_per_batch or planned
    full, rest = divmod(runs, per)
    sizes = {per: full} if full else {}
    if rest:
        sizes[rest] = 1
    return sizes


def check_memory(
    cfgs: Sequence[RunConfig],
    *,
    workers: int,
    concurrent: int,
    runs_per_batch: int | None = None,
    ray: bool = False,
    hidden: int = 256,
    memory: tuple[int, int] | None = None,
) -> int:
    """Raise ConfigError when the runs of cfgs cannot fit in this machine's memory; returns the estimated peak.

    workers: what the driver spreads the runs over (batch planning); concurrent: batches held at once (1 inline, up
    to the CPUs under Ray); ray: a local Ray with one worker process per concurrent batch.
    """
    total, available = memory or machine_memory()
    batches = [(cfg, estimate_batch(cfg, size, hidden), count) for cfg in cfgs
               for size, count in batch_sizes(cfg, workers, runs_per_batch).items()]
    held: list[tuple[RunConfig, MemoryEstimate]] = []  # the largest batches that can be in memory at once
    for cfg, est, count in sorted(batches, key=lambda b: -b[1].total):
        held.extend([(cfg, est)] * min(count, max(1, concurrent) - len(held)))
    if not held:
        return 0
    overhead = PROCESS_BYTES + (RAY_BYTES + len(held) * PROCESS_BYTES if ray else 0)
    peak = overhead + sum(e.total for _, e in held)
    if peak <= total:
        if peak > available:
            log.warning("the runs need about %s of memory and %s is available now (of %s)", gib(peak),
                        gib(available), gib(total))
        return peak
    cfg, worst = held[0]
    one = estimate_batch(cfg, 1, hidden)
    fits = int((total - PROCESS_BYTES - (RAY_BYTES if ray else 0)) // (one.total + (PROCESS_BYTES if ray else 0)))
    if one.total + PROCESS_BYTES > total:
        advice = ("Use a smaller population: most of this grows with the square of the number of agents "
                  f"({cfg.population.size} here)")
    elif fits <= 1 or not ray:
        advice = "Run one run at a time: --runs_per_batch 1 --backend inline"
    else:
        advice = f"Hold fewer runs at once: --runs_per_batch 1 --num_cpus {min(fits, concurrent)}"
    runs = f"{worst.runs} run{'s' if worst.runs > 1 else ''}"
    at_once = f"{len(held)} batches of up to {runs} at once" if len(held) > 1 else f"{runs} at once"
    raise ConfigError(
        f"population {cfg.destination_folder!r} needs about {gib(peak)} of memory ({at_once}; {worst.describe()} "
        f"per batch), more than this machine has: {gib(total)} in all, {gib(available)} available now. {advice}."
    )


def check_run_memory(
    cfgs: Sequence[RunConfig],
    backend: str = "ray",
    ray_address: str | None = None,
    num_cpus: int | None = None,
    runs_per_batch: int | None = None,
    hidden: int = 256,
    memory: tuple[int, int] | None = None,
) -> int | None:
    """check_memory with the batching simulator.driver.run_datasets will use for these arguments.

    Joining a cluster (ray_address) skips the check: the batches run on its nodes, whose memory is not this one's.
    """
    if backend == "ray" and ray_address is not None:
        return None
    cpus = num_cpus or os.cpu_count() or 1
    workers = 1 if backend == "inline" else cpus
    n_batches = sum(sum(batch_sizes(cfg, workers, runs_per_batch).values()) for cfg in cfgs)
    local_ray = backend == "ray" and n_batches > 1  # one batch runs in this process (run_datasets)
    return check_memory(cfgs, workers=workers, concurrent=min(cpus, n_batches) if local_ray else 1,
                        runs_per_batch=runs_per_batch, ray=local_ray, hidden=hidden, memory=memory)
