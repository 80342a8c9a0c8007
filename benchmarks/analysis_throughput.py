"""Analysis throughput: every report metric over a generated dataset, with the polars streaming engine.

    python benchmarks/analysis_throughput.py                      # 10M rows
    python benchmarks/analysis_throughput.py --rows 100000000     # the 100M-row case (a few GiB of temp disk)

Generates a synthetic dataset of the record schema (analysis.synthetic) in a temp dir, then times
`analysis.report.analyse` (footer checks + all metrics, no figures). Peak RSS covers this process and its children.
Last line: rows_per_s=<number>.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from analysis.dataset import open_dataset
from analysis.report import analyse
from analysis.synthetic import SyntheticSpec, write_synthetic
from simulator.population import parse_population


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="rows (games) to generate (default: %(default)s)")
    p.add_argument("--population", default="8xS_2xUT_2xDE_2xVEe_2xTFT", help="population string (16 agents)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--iterations-per-part", type=int, default=5000)
    p.add_argument("--dir", type=Path, default=None, help="where to generate (default: a temp dir, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the generated dataset")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    n_agents = parse_population(args.population).size
    iterations = math.ceil(args.rows / (args.runs * n_agents))
    root = args.dir or Path(tempfile.mkdtemp(prefix="moralsim-bench-"))
    try:
        t0 = time.perf_counter()
        folder = write_synthetic(root, SyntheticSpec(args.population, "IPD", args.runs, iterations,
                                                     args.iterations_per_part))
        gen_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in folder.rglob("*.parquet"))
        rss_after_gen = peak_rss_mib()

        t0 = time.perf_counter()
        ds = open_dataset(folder)
        result = analyse(ds)
        analyse_s = time.perf_counter() - t0
        rows = ds.num_rows
        print(f"dataset: {rows:,} rows, {args.runs} runs x {iterations} iterations x {n_agents} agents, "
              f"{len(ds.parts)} parts, {size / 2**20:.0f} MiB on disk; generated in {gen_s:.1f} s")
        print(f"analysis: {len(result.frames)} metrics, bin size {result.bin_size}, {analyse_s:.2f} s")
        print(f"peak_rss_mib={peak_rss_mib():.0f} (after generation: {rss_after_gen:.0f})")
        print(f"rows_per_s={rows / analyse_s:.0f}")
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
