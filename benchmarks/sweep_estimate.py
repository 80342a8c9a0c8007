"""How long the AIES 2024 sweep takes here: 9 populations x 20 runs x 30,000 iterations x 16 agents = 86.4M games.

Runs one 16-agent population's 20 runs for a slice of the iterations through the real driver (Ray backend,
runs stacked per CPU, Parquet written) and extrapolates. The wall time of this slice is a fixed start-up (Ray,
its workers importing torch, the manifests) plus the batches; the batches' own seconds (each run's manifest
entry) give the simulation rate, which does not depend on the iteration count once past the first few hundred
iterations. The sweep's estimate is that start-up once plus 86.4M games at that rate. The anchor would need
about 200 days.

    python benchmarks/sweep_estimate.py --iterations 3000     # last line: sweep_hours=<n>
    python benchmarks/interleaved.py --rounds 3 --figure games_per_s /path/to/base . -- benchmarks/sweep_estimate.py

With interleaved.py this script runs against another checkout's code (MORALSIM_SRC), back to 2f15ff0, whose
build_groups still took the agent settings apart: both checkouts are then measured by the same rule.

Warm workers (the default; --cold-workers for the earlier rule): before the batches, each Ray worker imports what it
pays for once, whatever the number of its batches (the engine, the agents and torch, and numba's kernels where the
checkout has them: about 2 s a worker), so the batches' seconds hold their own set-up and iterations only, as in the
real sweep, where each of the two workers runs 9 batches of 30,000 iterations. That import time is in the start-up.
With cold workers each of the 2 batches here pays it, which the short slice weighs 9 x 10 times more than the sweep.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("MORALSIM_SRC") or str(Path(__file__).resolve().parents[1]))  # see interleaved.py

import scenarios.factory
from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.driver import run_sweep

POPULATION = "8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg"
SWEEP_GAMES = 9 * 20 * 30_000 * 16


def warm_worker(pause: float) -> int:
    """A worker's once-only cost: the engine, the agents (torch) and, where the checkout has them, numba's DQN kernels
    (loaded from its cache and checked against torch, as the first DQN group of a process does)."""
    import actors.dqn
    import scenarios.factory  # noqa: F401

    check = getattr(actors.dqn, "compiled_matches_torch", None)
    if check is not None:
        check("float32")
    time.sleep(pause)  # the tasks overlap, so each lands on its own worker
    return os.getpid()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--backend", default="ray", choices=["ray", "inline"])
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--cold-workers", action="store_true", help="no warm-up: every batch pays its worker's imports")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(POPULATION, num_iterations=args.iterations, num_runs=args.runs, seed=0, output=Path(tmp))
        t0 = time.perf_counter()
        if args.backend == "ray":  # a Ray of its own: ray.init() would join any other local Ray on this machine
            import ray

            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
            if not args.cold_workers:
                cpus = args.num_cpus or os.cpu_count() or 1
                warm = ray.remote(num_cpus=1)(warm_worker)
                pids = ray.get([warm.remote(1.0) for _ in range(cpus)])
                if len(set(pids)) < len(pids):
                    print(f"warm-up: {len(set(pids))} worker(s) of {len(pids)} warmed")
        factory: Any = build_groups
        if "settings" in inspect.signature(build_groups).parameters:  # before the resolved RunConfig (2f15ff0)
            factory = partial(build_groups, settings=scenarios.factory.AgentSettings())  # type: ignore[attr-defined,call-arg]
        done = run_sweep(cfg, factory, backend=args.backend,
                         num_cpus=args.num_cpus, show_progress=False)
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
    games = args.runs * args.iterations * 16
    # the runs of one batch share its seconds; batches run side by side on the workers (ray) or in turn (inline)
    batches = sorted({float(info["seconds"]) for info in done.values()})
    workers = min(len(batches), args.num_cpus or os.cpu_count() or 1) if args.backend == "ray" else 1
    busy = sum(batches) / workers
    rate, startup = games / busy, max(0.0, dt - busy)
    print(f"{games} games in {dt:.1f} s: start-up {startup:.1f} s (Ray, workers, manifests), batches "
          f"{', '.join(f'{b:.1f}' for b in batches)} s; parquet {size / games * 1e6 / 2**20:.2f} MiB per million games")
    print(f"wall_games_per_s={games / dt:.0f}")
    print(f"games_per_s={rate:.0f}")
    print(f"sweep_hours={(startup + SWEEP_GAMES / rate) / 3600:.2f}")


if __name__ == "__main__":
    main()
