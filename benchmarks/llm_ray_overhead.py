"""Ray's cost for a population of LLM agents, iterations per second: in process, with 1 rollout actor, with 2 (and with overlap).

Every configuration runs the same population, seed and iterations through the real driver (run_batch), one after
the other in this process, so the figures are comparable; start-up (engines, actors, models) is not timed.

    OMP_NUM_THREADS=2 python benchmarks/llm_ray_overhead.py              # 8 SmolLM2 agents on vLLM, training on
    python benchmarks/llm_ray_overhead.py --iterations 4 --no-train      # rollouts only (where Ray's cost shows most)
    python benchmarks/llm_ray_overhead.py --overlap                      # adds 1 rollout actor + overlapped updates

Last line: `ray_overhead_1_actor=<(in-process it/s) / (1-actor it/s) - 1>` (the target is < 0.10).
Actors ask for `--cpus` CPUs each (default: all of this machine's), so an actor's torch uses as many threads as the
in-process run: the comparison is Ray's cost, not a thread-count change. Engine and learner alternate without
overlap, so they do not compete for the cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--population", default="8xDe@llm", help="population string; every @llm entry is an LLM agent")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--no-train", action="store_true", help="rollouts only (no PPO updates)")
    p.add_argument("--overlap", action="store_true", help="also time 1 rollout actor with overlapped updates")
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="CPUs per actor")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of in_process,1_actor,2_actors,1_actor_overlap (default: the first "
                        "three, plus the overlap with --overlap)")
    args = p.parse_args()

    import ray

    from actors.llm.config import LLMActors, LLMAgentConfig, PPOConfig
    from scenarios.factory import build_groups
    from scenarios.run import with_agents
    from simulator.config import RunConfig
    from simulator.driver import run_batch

    n = int(2 + 2 * args.cpus)  # two actors of `cpus` each plus a learner: logical CPUs, this machine shares them
    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    cpus = dict(rollout_cpus=args.cpus, learner_cpus=args.cpus)
    modes = [("in_process", LLMActors()), ("1_actor", LLMActors(rollout_actors=1, **cpus)),
             ("2_actors", LLMActors(rollout_actors=2, **cpus))]
    if args.overlap or (args.modes and "1_actor_overlap" in args.modes):
        modes.append(("1_actor_overlap", LLMActors(rollout_actors=1, overlap=True, **cpus)))
    if args.modes:
        modes = [m for m in modes if m[0] in args.modes.split(",")]
    rate: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, actors in modes:
            cfg = RunConfig(args.population, num_iterations=args.iterations, num_runs=1, seed=0, output=Path(tmp) / label)
            llm = LLMAgentConfig(model=args.model, engine=args.engine, train=not args.no_train, actors=actors,
                                 ppo=replace(PPOConfig(), lora_r=args.lora_r))
            cfg = with_agents(cfg, llm=llm)
            t0 = time.perf_counter()
            (res,) = run_batch(cfg, [0], build_groups)
            loop = res.seconds - res.setup_seconds
            rate[label] = args.iterations / loop
            print(f"{label:16s} {rate[label]:.4f} it/s  ({args.iterations} iterations in {loop:.1f} s; "
                  f"set-up {res.setup_seconds:.1f} s, wall {time.perf_counter() - t0:.1f} s)", flush=True)
    ray.shutdown()
    for label in rate:
        if label != "in_process" and "in_process" in rate:
            print(f"{label}_over_in_process={rate[label] / rate['in_process']:.3f}")
    if "1_actor_overlap" in rate and "1_actor" in rate:
        print(f"overlap_gain={rate['1_actor_overlap'] / rate['1_actor']:.3f}")
    if "in_process" in rate and "1_actor" in rate:
        print(f"ray_overhead_1_actor={rate['in_process'] / rate['1_actor'] - 1:.3f}")


if __name__ == "__main__":
    main()
