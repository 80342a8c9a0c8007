"""Where the time of one stacked batch goes: the classic engine's loop, phase by phase, in this process.

Runs the driver's loop (engine.step, RecordBuffer.add, the Parquet parts) for R runs of the AIES 16-agent
population stacked in one engine, as one Ray task of the sweep does (20 runs on 2 cores = 10 runs a task), and
times each phase with wrappers around the group and record calls (a few hundred ns each, under 1% of a step):

    selection forward   DQNGroup.select: the selection nets on the snapshot, greedy / explore partners
    dilemma forward     DQNGroup.act: the dilemma nets on both states, greedy / explore moves
    gradients           DQNGroup.learn without Adam: TD targets (the next-state selection forward) and gradients
    Adam                the fused Adam step over every stacked weight
    fused step          (DQNConfig.fused, the default) the compiled pass of actors/dqn_fused.py: both nets' TD
                        targets (the selection net's from its net on the next state, agent by agent), gradients and
                        Adam update, and the nets with the updated weights on the next states, which the next
                        select / act take (the two forward phases above are then what is left of select / act: the
                        choices; "gradients" what is left of learn: the glue)
    static strategies   StaticGroup.select / act / end_iteration
    engine bookkeeping  PopulationEngine.step minus the group calls: uniforms, order, payoffs, rewards, state (compiled
                        by default: simulator/engine_kernels.py)
    records             RecordBuffer.add: the iteration's columns into the run buffers
    Arrow tables        RecordBuffer.table at each flush (this thread)
    Parquet             compression and the disk (a background thread in the driver; timed here on this one)

Ray's share is not in this process: `benchmarks/sweep_estimate.py` reports its start-up and the sweep's rate.

    python benchmarks/profile_engine.py                         # 10 runs x 1000 iterations, a table of shares
    python benchmarks/profile_engine.py --runs 1 --iterations 3000
    MORALSIM_SRC=/path/to/other/checkout python benchmarks/profile_engine.py   # profile another commit's code
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("MORALSIM_SRC") or str(Path(__file__).resolve().parents[1]))  # see interleaved.py

from actors.dqn import DQNConfig
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.driver import build_engine
from simulator.records import RecordBuffer, write_table_atomic

POPULATION = "8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg"
PHASES = ("selection forward", "dilemma forward", "gradients", "Adam", "fused step", "static strategies",
          "engine bookkeeping", "records", "Arrow tables", "Parquet")


now = time.perf_counter  # --clock cpu: this thread's CPU time, which a loaded machine disturbs far less


class Clock:
    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, name: str, phase: str) -> None:
        """Time obj.name under phase (an instance attribute shadows the method)."""
        fn: Callable[..., Any] = getattr(obj, name)
        total = self.total

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                total[phase] += now() - t0

        setattr(obj, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="runs stacked in the engine (the sweep: 10 a task)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--population", default=POPULATION)
    p.add_argument("--threads", type=int, default=1, help="torch threads (Ray tasks use 1)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this thread's CPU time")
    args = p.parse_args()
    global now
    if args.clock == "cpu":
        now = time.thread_time
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(args.population, num_iterations=args.iterations, num_runs=args.runs, seed=0, output=Path(tmp))
        cfg = with_agents(cfg, dqn=DQNConfig(threads=args.threads))
        t0 = now()
        engine, _ = build_engine(cfg, list(range(args.runs)), build_groups)
        setup = now() - t0
        for g in engine.groups:
            if hasattr(g, "opt"):  # DQN: Adam inside learn is timed apart and taken out of "gradients"
                clock.wrap(g, "select", "selection forward")
                clock.wrap(g, "act", "dilemma forward")
                clock.wrap(g, "learn", "gradients")
                if getattr(g, "_fused", False):  # TD targets, gradients, Adam and next forwards in one compiled pass
                    clock.wrap(g, "_fused_step", "fused step")
                else:
                    clock.wrap(g.opt, "update" if hasattr(g.opt, "update") else "step", "Adam")  # the kernel calls
            elif not g.learns:
                for name in ("select", "act", "end_iteration"):
                    clock.wrap(g, name, "static strategies")
            else:
                for name in ("select", "act", "learn"):
                    clock.wrap(g, name, f"{type(g).__name__}")
        codes = cfg.population.resolved(cfg.method).codes
        # sized as the driver sizes it: a part's rows, or the whole run when it is shorter
        buffer = RecordBuffer(args.runs, codes, capacity=max(1, min(cfg.flush_rows // len(codes), args.iterations)))
        clock.wrap(buffer, "add", "records")
        clock.wrap(buffer, "table", "Arrow tables")
        stages = [Path(tmp) / f"run={r}" for r in range(args.runs)]
        for d in stages:
            d.mkdir()

        def flush() -> None:
            first, tables = buffer.first_iteration, [buffer.table(r) for r in range(args.runs)]
            buffer.filled = 0
            t1 = now()
            for table, d in zip(tables, stages, strict=True):
                write_table_atomic(table, d / f"part-{first:08d}.parquet")
            clock.total["Parquet"] += now() - t1

        step_time = 0.0
        t0 = now()
        for _ in range(args.iterations):
            t1 = now()
            rec = engine.step()
            step_time += now() - t1
            buffer.add(rec)
            if buffer.full:
                flush()
        flush()
        wall = now() - t0
    inner = ("Adam", "fused step")  # inside learn
    inside = sum(v for k, v in clock.total.items() if k not in ("records", "Arrow tables", "Parquet", *inner))
    clock.total["gradients"] -= sum(clock.total.get(k, 0.0) for k in inner)
    clock.total["engine bookkeeping"] = step_time - inside
    other = wall - sum(clock.total.values())
    games = args.runs * args.iterations * len(codes)
    print(f"{args.runs} runs x {args.iterations} iterations x {len(codes)} agents, {args.threads} torch thread(s), "
          f"{args.clock} clock; "
          f"setup {setup:.2f} s; {wall:.2f} s, {games / wall:,.0f} games/s, {wall / args.iterations * 1e6:,.0f} us "
          "an iteration")
    print("| phase | share | us per iteration |")
    print("|---|---|---|")
    for phase in [*PHASES, *sorted(set(clock.total) - set(PHASES))]:
        if phase in clock.total:
            v = clock.total[phase]
            print(f"| {phase} | {v / wall:.1%} | {v / args.iterations * 1e6:,.0f} |")
    print(f"| driver loop (the rest) | {other / wall:.1%} | {other / args.iterations * 1e6:,.0f} |")
    print(f"games_per_s={games / wall:.0f}")


if __name__ == "__main__":
    main()
