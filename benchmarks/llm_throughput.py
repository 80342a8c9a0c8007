"""LLM decisions per second, `hf` against `vllm`, on the prompts of one population iteration; and PPO updates per second.

The batch is what one iteration of a population of LLM agents asks for: every agent decides as selector and as
selected partner, each with its own LoRA adapter, the option order and last-round history drawn per agent. Both
engines get the same requests in one call. Default model: the embedded SmolLM2-135M-Instruct.

    python benchmarks/llm_throughput.py                  # last line: vllm_over_hf=<ratio>
    python benchmarks/llm_throughput.py --agents 8 --repeats 2 --ppo-steps 2
    python benchmarks/llm_throughput.py --ppo-only       # last line: ppo_merged_over_every=<ratio>

PPO is timed twice in the same run, with the paper's settings (batch 5 = mini-batch, 4 epochs, grad accumulation 4,
LoRA r64): computing every pass, and merging the passes that see the same weights (actors/llm/learner.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--agents", type=int, default=16, help="LLM agents, each with its own adapter")
    p.add_argument("--repeats", type=int, default=3, help="timed engine calls per engine (after one warm-up)")
    p.add_argument("--ppo-steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--ppo-only", action="store_true", help="time only the PPO updates (every pass vs merged)")
    args = p.parse_args()

    from actors.llm.engine import GenerationRequest
    from actors.llm.hf_engine import HFEngine
    from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
    from actors.llm.models import resolve_model
    from actors.llm.prompts import chat_ids, game_prompt_text, token_pair
    from simulator.contracts import Action
    from simulator.games import GAMES

    model_dir = resolve_model(args.model)
    host = PolicyHost(model_dir)
    learners = [PPOLearner(host, f"agent{i}", PPOConfig(seed=i)) for i in range(args.agents)]
    adapters = [lr.export_adapter() for lr in learners]
    rng = np.random.default_rng(0)
    tokens = token_pair("action12")
    requests = []
    for i in range(2 * args.agents):  # each agent plays as selector and as selected
        own, opp = (Action(int(x)) for x in rng.integers(0, 2, 2))
        text = game_prompt_text(GAMES["IPD"], tokens, own, opp, rng)
        requests.append(GenerationRequest(tuple(chat_ids(host.tokenizer, text)), f"agent{i % args.agents}",
                                          args.max_new_tokens, 1.0))
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)

    if args.ppo_only:
        ppo_benchmark(host, requests, rng, args.ppo_steps)
        return

    def measure(engine) -> float:  # type: ignore[no-untyped-def]
        for a in adapters:
            engine.load_adapter(a)
        engine.generate(requests)  # warm-up (and prefix cache fill, as in a running simulation)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            engine.generate(requests)
        return len(requests) * args.repeats / (time.perf_counter() - t0)

    hf = measure(HFEngine(model_dir))
    print(f"batch: {len(requests)} decisions, {args.agents} adapters, {prompt_tokens / len(requests):.0f} prompt tokens each")
    print(f"hf_decisions_per_s={hf:.2f}")
    vllm = float("nan")
    if not args.skip_vllm:
        from actors.llm.vllm_engine import VLLMEngine

        vllm = measure(VLLMEngine(model_dir, max_loras=args.agents, seed=0))
        print(f"vllm_decisions_per_s={vllm:.2f}")

    ppo_benchmark(host, requests, rng, args.ppo_steps)
    print(f"vllm_over_hf={vllm / hf:.2f}")


def ppo_benchmark(host, requests, rng, steps: int) -> float:  # type: ignore[no-untyped-def]
    """PPO updates/s computing every pass, then merging identical passes, on the same batch; returns the ratio."""
    from actors.llm.learner import PPOConfig, PPOLearner

    rates = {}
    for merge in (False, True):
        learner = PPOLearner(host, f"ppo-merge-{merge}", PPOConfig(seed=7, merge_identical_passes=merge))
        n = learner.config.batch_size
        queries = [list(requests[i % len(requests)].prompt_ids) for i in range(n)]
        answer = host.tokenizer("action1", add_special_tokens=False)["input_ids"]  # the paper's fixed-length answer
        learner.step(queries, [answer] * n, [3.0] * n)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            learner.step(queries, [answer] * n, list(rng.normal(size=n)))
        rates[merge] = steps / (time.perf_counter() - t0)
        name = "merged" if merge else "every_pass"
        print(f"ppo_updates_per_s_{name}={rates[merge]:.4f} (batch {n}, {learner.config.ppo_epochs} epochs, "
              f"grad accumulation {learner.config.gradient_accumulation_steps}, LoRA r{learner.config.lora_r})")
    ratio = rates[True] / rates[False]
    print(f"ppo_merged_over_every={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
