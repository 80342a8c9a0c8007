"""Runs per hour of one ICLR fine-tuning group with its runs stacked on one engine and one learner host, against the
same group one run at a time: `De vs TFT` of the job file (scenarios/iclr2025/jobs.toml) on SmolLM2-135M, masked
answers (the CPU demos' set-up), the paper's PPO settings, a few episodes.

    OMP_NUM_THREADS=2 python benchmarks/llm_stacking.py --episodes 4 --stack 5

Order 1 run, `stack` stacked runs, 1 run again (a drift on the shared machine shows as a gap between the two single
runs). Set-up (models, adapters) is timed apart from the episodes. Stacked runs share the base weights (one copy
in the engine, one in the learner host) and one scoring call per game step; each run keeps its own LoRA, learner and
records, and its PPO steps run one after the other on the host.
Last line: `stacked_runs_per_hour_ratio=<stacked runs/h / single runs/h>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(runs: int, episodes: int, tmp: Path) -> tuple[float, float]:
    """(set-up seconds, seconds for `episodes` PPO episodes) of `runs` stacked runs of De vs TFT."""
    from actors.llm.agent import LLMGroup
    from scenarios.factory import build_groups
    from scenarios.run import resolve
    from simulator.driver import build_engine

    job = resolve(["--scenario", "iclr2025/jobs", "--only", "De vs TFT", "--num_runs", str(runs),
                   "--llm_answer_mode", "mask", "--output", str(tmp / f"stack{runs}-{time.time_ns()}")])
    cfg = job.runs[0]
    cfg = replace(cfg, num_iterations=episodes * cfg.episode_length)
    t0 = time.perf_counter()
    engine, _ = build_engine(cfg, list(range(runs)), build_groups)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(cfg.num_iterations):
        engine.step()
    play = time.perf_counter() - t0
    for g in engine.groups:
        if isinstance(g, LLMGroup):
            g.close()
    return setup, play


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=4, help="PPO episodes (updates) per run")
    p.add_argument("--stack", type=int, default=5, help="runs stacked in the second measurement")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for runs in (1, args.stack, 1):
            setup, play = timed(runs, args.episodes, Path(tmp))
            per_hour = runs * 3600 / play
            rows.append((runs, setup, play, per_hour))
            print(f"{runs} run(s): set-up {setup:6.1f} s, {args.episodes} episodes {play:7.1f} s, "
                  f"{per_hour:8.1f} runs/h of {args.episodes} episodes", flush=True)
    single = (rows[0][3] + rows[2][3]) / 2
    print(f"single runs/h (mean of the two) {single:.1f}; stacked {rows[1][3]:.1f}")
    print(f"stacked_runs_per_hour_ratio={rows[1][3] / single:.2f}")


if __name__ == "__main__":
    main()
