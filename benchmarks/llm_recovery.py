"""What a crash costs an LLM run: checkpoint time and size for 8 SmolLM2 agents, and restart times of killed actors.

    OMP_NUM_THREADS=2 python benchmarks/llm_recovery.py          # 8 agents, LoRA r64, vLLM rollout actor

1. Checkpoint: 8 agents each take one PPO step (so Adam's moments exist), then the batch's checkpoint is written and
   read back (`simulator/driver.py` write_checkpoint / resume_from_checkpoint): seconds and MB.
2. Restarts: the rollout actor (a vLLM engine serving the 8 adapters) and then the learner actor (the 8 learners) are
   killed with SIGKILL by pid; timed until Ray has restarted them and they serve / hold the 8 agents again.
Last line: `checkpoint_s=<s> checkpoint_mb=<MB> rollout_restart_s=<s> learner_restart_s=<s>`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    args = p.parse_args()

    import ray

    from actors.llm.config import LLMActors, LLMAgentConfig
    from actors.llm.learners import StepJob
    from actors.llm.models import resolve_model
    from actors.llm.prompts import chat_ids
    from actors.llm.remote import wait_until_back
    from scenarios.factory import build_groups
    from scenarios.run import with_agents
    from simulator.config import RunConfig
    from simulator.driver import build_engine, resume_from_checkpoint, write_checkpoint

    model_dir = resolve_model(args.model)
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)

    # 1. checkpoint of a batch with N LLM agents on actors
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(f"{args.agents}xDe@llm", num_iterations=10, num_runs=1, seed=0, output=Path(tmp))
        llm = LLMAgentConfig(model=str(model_dir), engine=args.engine,
                             actors=LLMActors(rollout_actors=1, rollout_cpus=2, learner_cpus=2))
        cfg = with_agents(cfg, llm=llm)
        engine, _ = build_engine(cfg, [0], build_groups)
        (group,) = [g for g in engine.groups if hasattr(g, "learners")]
        tok = group.tokenizer
        prompt = chat_ids(tok, "You play a game. Answer with action1 or action2.")
        answer = tok("action1", add_special_tokens=False)["input_ids"]
        sync: list[float] = []
        t0 = time.perf_counter()
        jobs = [StepJob(n, [prompt] * 5, [answer] * 5, [1.0, 0.0, 1.0, 0.0, 1.0]) for n in group.names]
        for handle in group.learners.submit(jobs):
            group.serving.land(group.engine, handle.result())
        print(f"{args.agents} PPO steps (Adam moments now exist): {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        for handle in group.learners.submit(jobs):  # a second round, to time the sync alone
            result = handle.result()
            t1 = time.perf_counter()
            group.serving.land(group.engine, result)
            group.engine.flush()  # the engine serves the new version now
            sync.append(time.perf_counter() - t1)
        print(f"weight sync per adapter version (learner actor -> object store -> vLLM actor, registered): "
              f"median {sorted(sync)[len(sync) // 2]:.2f} s, engine side {sorted(group.engine.sync_seconds)[-len(sync):]}",
              flush=True)
        stage = Path(tmp) / "stage"
        stage.mkdir()
        t0 = time.perf_counter()
        ckpt = write_checkpoint(cfg, [0], engine, [stage], rows=0)
        write_s = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in Path(ckpt).iterdir()) / 2**20
        t0 = time.perf_counter()
        resume_from_checkpoint(cfg, [0], engine, [stage])
        read_s = time.perf_counter() - t0
        print(f"checkpoint: {mb:.0f} MB written in {write_s:.1f} s, read and restored in {read_s:.1f} s", flush=True)

        # 2. restarts, by pid
        cluster = group.cluster
        rollout_pid = ray.get(cluster.rollout_actors[0].placement.remote())["pid"]
        t0 = time.perf_counter()
        os.kill(rollout_pid, signal.SIGKILL)
        time.sleep(0.5)
        request_prompts = [prompt] * len(group.names)
        group.engine.score_batch(group.names, request_prompts, [answer] * len(group.names))  # waits, re-serves, retries
        rollout_s = time.perf_counter() - t0
        print(f"rollout actor killed: serving {len(group.names)} adapters again after {rollout_s:.1f} s "
              f"({group.engine.restarts} restart)", flush=True)
        learner_pid = ray.get(cluster.learner_actors[0].placement.remote())["pid"]
        state = group.state_dict()
        t0 = time.perf_counter()
        os.kill(learner_pid, signal.SIGKILL)
        time.sleep(0.5)
        wait_until_back(cluster.learner_actors[0])
        group.learners.load_state_dicts(state["learners"])
        learner_s = time.perf_counter() - t0
        print(f"learner actor killed: {len(group.names)} learners restored after {learner_s:.1f} s", flush=True)
        group.close()
    ray.shutdown()
    print(f"checkpoint_s={write_s:.2f} checkpoint_mb={mb:.0f} rollout_restart_s={rollout_s:.1f} "
          f"learner_restart_s={learner_s:.1f} sync_s={sorted(sync)[len(sync) // 2]:.2f}")


if __name__ == "__main__":
    main()
