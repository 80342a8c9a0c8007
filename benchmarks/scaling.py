"""How the classic engine scales: games/s, setup and peak memory against population size and runs stacked in one engine.

Each cell is one `benchmarks/population_throughput.py` process (DQN, one torch thread, Parquet written), so its peak
RSS is its own. A cell whose estimated memory (simulator.resources.estimate_batch) is above --max-gib is not run,
and the table says so with the estimate. Iterations shrink with the population, so the whole table takes a few
minutes (games/s excludes building the networks, which the setup column shows).

    python benchmarks/scaling.py                                    # sizes 16 64 256 1024 x runs 1 5 20
    python benchmarks/scaling.py --sizes 16 64 --runs 1 5
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.environ.get("MORALSIM_SRC") or str(Path(__file__).resolve().parents[1]))  # see interleaved.py

from simulator.config import RunConfig
from simulator.resources import PROCESS_BYTES, GiB, estimate_batch

ROOT = Path(sys.path[0])
ITERATIONS = {16: 400, 64: 100, 256: 20, 1024: 5}
FIGURES = re.compile(r"setup_s=([0-9.]+) .*peak_rss_gib=([0-9.]+).*\ngames_per_s=([0-9]+)", re.S)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--runs", type=int, nargs="+", default=[1, 5, 20])
    p.add_argument("--max-gib", type=float, default=7.0, help="skip cells estimated above this (a shared machine)")
    args = p.parse_args()
    script = Path(__file__).resolve().parent / "population_throughput.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MORALSIM_SRC": str(ROOT)}
    print("| agents | runs stacked | games/s | setup | peak RSS |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        for r in args.runs:
            its = ITERATIONS.get(n, max(5, 6400 // n))
            size = "_".join(f"{k * n // 16}x{c}" for k, c in
                            [(8, "S"), (1, "UT"), (1, "aUT"), (1, "DE"), (1, "mDE"), (1, "VEe"), (1, "Vie"), (1, "VEk"),
                             (1, "Vagg")])
            est = (estimate_batch(RunConfig(size, num_iterations=its, num_runs=r), r).total + PROCESS_BYTES) / GiB
            if est > args.max_gib:
                print(f"| {n} | {r} | not run: estimated {est:.1f} GiB > --max-gib {args.max_gib:g} | | |", flush=True)
                continue
            out = subprocess.run([sys.executable, str(script), "--population-size", str(n), "--runs", str(r),
                                  "--iterations", str(its), "--threads", "1"], env=env, capture_output=True, text=True)
            m = FIGURES.search(out.stdout)
            if out.returncode or not m:
                print(f"| {n} | {r} | failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]} | | |")
                continue
            setup, rss, rate = m.groups()
            print(f"| {n} | {r} | {int(rate):,} | {float(setup):.1f} s | {float(rss):.2f} GiB "
                  f"(estimated {est:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
