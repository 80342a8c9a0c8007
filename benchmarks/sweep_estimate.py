"""How long the AIES 2024 sweep takes here: 9 populations x 20 runs x 30,000 iterations x 16 agents = 86.4M games.

Runs one 16-agent population's 20 runs for a slice of the iterations through the real driver (Ray backend,
runs stacked per CPU, Parquet written), and extrapolates from the measured games per second, which does not
depend on the iteration count (logging cost per game is constant). The anchor would need about 200 days.

    python benchmarks/sweep_estimate.py --iterations 3000     # last line: sweep_hours=<n>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.driver import run_sweep

POPULATION = "8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg"
SWEEP_GAMES = 9 * 20 * 30_000 * 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--backend", default="ray", choices=["ray", "inline"])
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(POPULATION, num_iterations=args.iterations, num_runs=args.runs, seed=0, output=Path(tmp))
        t0 = time.perf_counter()
        run_sweep(cfg, build_groups, backend=args.backend,
                  num_cpus=args.num_cpus, show_progress=False)
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
    games = args.runs * args.iterations * 16
    rate = games / dt
    print(f"{games} games in {dt:.1f} s (Ray start-up included), parquet {size / games * 1e6 / 2**20:.2f} MiB per million games")
    print(f"games_per_s={rate:.0f}")
    print(f"sweep_hours={SWEEP_GAMES / rate / 3600:.2f}")


if __name__ == "__main__":
    main()
