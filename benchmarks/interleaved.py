"""One benchmark against several checkouts in one sitting, alternating, so a shared machine's noise hits all alike.

Runs this repository's copy of a benchmark script with the code of each checkout (MORALSIM_SRC and PYTHONPATH
point at it; Ray workers inherit both), round after round in turn, and reports each checkout's median of the
figure the script prints last (`name=value`) and its ratio to the first checkout.

    git worktree add /tmp/base 2f15ff0
    python benchmarks/interleaved.py --rounds 5 /tmp/base . -- benchmarks/sweep_estimate.py --iterations 3000
    python benchmarks/interleaved.py --rounds 5 /tmp/base . -- benchmarks/population_throughput.py
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

FIGURE = re.compile(r"^([a-z_]+)=([0-9.]+)$", re.M)


def run_once(tree: Path, script: list[str], figure: str | None) -> tuple[str, float, str]:
    env = {**os.environ, "MORALSIM_SRC": str(tree), "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *script], env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{tree}: {' '.join(script)} failed ({out.returncode}):\n{out.stderr[-1500:]}")
    found = FIGURE.findall(out.stdout)
    if figure:
        found = [f for f in found if f[0] == figure]
    if not found:
        raise SystemExit(f"{tree}: no name=value figure in the output:\n{out.stdout[-2000:]}")
    name, value = found[-1]
    return name, float(value), " ".join(f"{k}={v}" for k, v in FIGURE.findall(out.stdout))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--figure", default=None, help="which name=value line to compare (default: the last one)")
    p.add_argument("trees", nargs="+", type=Path, help="checkouts to compare; the first is the baseline")
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        p.error("give the benchmark after --, e.g. -- benchmarks/population_throughput.py")
    cut = argv.index("--")
    args, script = p.parse_args(argv[:cut]), argv[cut + 1 :]
    script[0] = str(Path(script[0]).resolve())
    trees = [t.resolve() for t in args.trees]
    values: dict[Path, list[float]] = {t: [] for t in trees}
    name = ""
    for k in range(args.rounds):
        order = trees if k % 2 == 0 else trees[::-1]  # alternate who goes first
        for tree in order:
            try:
                name, v, everything = run_once(tree, script, args.figure)
            except RuntimeError as e:  # a shared machine: one failed run is reported, the comparison goes on
                print(f"round {k + 1}: {e}", flush=True)
                continue
            values[tree].append(v)
            print(f"round {k + 1}: {tree}: {everything}", flush=True)
    if not all(values.values()):
        raise SystemExit("no successful run for some checkout")
    base = statistics.median(values[trees[0]])
    print(f"| checkout | {name} (median of {args.rounds}) | all | ratio to {trees[0].name} |")
    print("|---|---|---|---|")
    for tree in trees:
        med = statistics.median(values[tree])
        print(f"| {tree} | {med:g} | {', '.join(f'{v:g}' for v in values[tree])} | {med / base:.2f}x |")
    print(f"ratio={statistics.median(values[trees[-1]]) / base:.3f}")


if __name__ == "__main__":
    main()
