"""Games per second of the population engine, Parquet logging included.

Default: one run of the AIES 16-agent population 8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg with DQN
agents, on one process. The anchor implementation ran this population at about 97 games/s here.

    python benchmarks/population_throughput.py                        # last line: games_per_s=<n>
    python benchmarks/population_throughput.py --population-size 1024 --iterations 20
    python benchmarks/population_throughput.py --runs 10              # 10 runs stacked in one engine
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.environ.get("MORALSIM_SRC") or str(Path(__file__).resolve().parents[1]))  # see interleaved.py

from actors.dqn import DQNConfig
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.driver import run_batch

BASE = [(8, "S"), (1, "UT"), (1, "aUT"), (1, "DE"), (1, "mDE"), (1, "VEe"), (1, "Vie"), (1, "VEk"), (1, "Vagg")]


def population(size: int) -> str:
    """The 16-agent mix scaled to `size` agents (half S, the rest split evenly over the 8 other types)."""
    if size % 16:
        raise SystemExit(f"--population-size must be a multiple of 16, got {size}")
    k = size // 16
    return "_".join(f"{n * k}x{code}" for n, code in BASE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population-size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--runs", type=int, default=1, help="runs stacked in one engine on this one process")
    p.add_argument("--method", default="dqn", choices=["dqn", "tabularQ"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for the stacked networks (default: every core; Ray workers use 1 each)")
    args = p.parse_args()
    pop = population(args.population_size)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(pop, num_iterations=args.iterations, num_runs=args.runs, seed=0, output=Path(tmp),
                        method=args.method)
        cfg = with_agents(cfg, dqn=DQNConfig(threads=args.threads))
        res = run_batch(cfg, list(range(args.runs)), build_groups)[0]
        setup, dt = res.setup_seconds, res.seconds - res.setup_seconds  # games/s excludes building the networks
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
    games = args.runs * args.iterations * args.population_size
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"population={args.population_size} agents, runs={args.runs}, iterations={args.iterations}, method={args.method}")
    print(f"setup_s={setup:.2f} games={games} seconds={dt:.2f} peak_rss_gib={peak_gib:.2f} "
          f"parquet_bytes_per_million_games={size / games * 1e6:.0f}")
    print(f"games_per_s={games / dt:.0f}")


if __name__ == "__main__":
    main()
