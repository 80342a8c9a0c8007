"""Seconds per iteration of the moral LLM population `1xUT@llm_1xaUT@llm_1xDE@llm` on SmolLM2-135M, and where the time
goes: today's code path against the CPU path, interleaved iteration by iteration in one process (the machine is shared,
so a slow minute hits both alike).

    OMP_NUM_THREADS=2 python benchmarks/llm_population.py --iterations 6

Paths (all: masked answers, learning rate 2e-4 as the demo, the paper's PPO otherwise, HF engine, in process):
    today       structured prompt (~220 tokens), float32, DQN selection head, no prompt-head cache in the engine,
                peft's own adapter switching (issue 16's 20 s/iteration)
    cpu         compact prompt (~107 tokens, ~30 after the ~77 cached), adapters switched without walking the
                model (actors/llm/lora_switch.py), the prompt prefix that a PPO step's samples share computed once
                (ppo.share_prefix; the reference policy's head cached for good), each adapter's prompt head cached
                by the engine until its next weights (HFEngine.prefix_cache), Adam as one fused kernel
                (ppo.fused_adam), float32, DQN selection head
    cpu_mixed   the CPU path in bf16-mixed: float32 model, matmuls in bf16 under torch.autocast with the linear
                weights stored in bf16 (AMX-BF16 on this CPU; actors/llm/models.py); LoRA, value heads, Adam float32
    cpu_bf16    the CPU path with every base weight in bfloat16 (the residual stream too)
    cpu_prompt  the CPU path with masked partner selection by prompt (the demo's set-up: 1.5x the PPO samples)
Shares per path: prompts (building and tokenising), rollouts (masked scoring of the decisions), scoring (P(C) and
virtue scores; free in mask mode), ppo (learner steps), sync (adapter loads), records (RecordBuffer.add), other
(protocol, DQN selection head). Set-up (models, engines) is not timed. Also printed, for each bf16 path run beside
today's: the largest and the mean |log pi| difference between today's float32 engine and that path's engine on
the same prompts, answers and adapters (the bf16 check).
Last lines: `speedup_<path>_over_today=<today s/it / path s/it>` per path, the CPU path's last (target >= 4).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POPULATION = "1xUT@llm_1xaUT@llm_1xDE@llm"


def paths(lr: float) -> dict[str, Any]:
    from actors.llm.config import LLMAgentConfig, PPOConfig

    today = LLMAgentConfig(answer_mode="mask", selection="dqn", ppo=PPOConfig(learning_rate=lr))
    cpu = replace(today, variant="compact", ppo=replace(today.ppo, share_prefix=True, fused_adam=True))
    return {"today": today, "cpu": cpu, "cpu_mixed": replace(cpu, dtype="bf16-mixed"),
            "cpu_bf16": replace(cpu, dtype="bfloat16"), "cpu_prompt": replace(cpu, selection="prompt")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--paths", default="today,cpu,cpu_mixed")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    args = p.parse_args()

    import numpy as np

    from actors.llm.agent import PHASES, LLMGroup
    from scenarios.factory import build_groups
    from scenarios.run import with_agents
    from simulator.config import RunConfig
    from simulator.driver import build_engine
    from simulator.records import RecordBuffer

    chosen = {k: v for k, v in paths(args.learning_rate).items() if k in args.paths.split(",")}
    engines: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    steps: dict[str, list[float]] = {}
    records: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, llm in chosen.items():
            cfg = with_agents(RunConfig(POPULATION, num_iterations=args.iterations, num_runs=1, seed=0,
                                        output=Path(tmp) / label), llm=llm)
            engines[label], _ = build_engine(cfg, [0], build_groups)
            if label == "today":
                _today(next(g for g in engines[label].groups if isinstance(g, LLMGroup)))
            buffers[label] = RecordBuffer(1, cfg.population.codes, capacity=args.iterations + 1,
                                          llm_columns=True, games=cfg.games_per_iteration)
            steps[label], records[label] = [], 0.0
        for t in range(args.iterations):  # interleaved: every path's iteration t before any path's t + 1
            for label, engine in engines.items():
                t0 = time.perf_counter()
                rec = engine.step()
                t1 = time.perf_counter()
                buffers[label].add(rec)
                records[label] += time.perf_counter() - t1
                steps[label].append(time.perf_counter() - t0)
                print(f"iteration {t} {label:10s} {steps[label][-1]:6.1f} s", flush=True)
        groups = {k: next(g for g in e.groups if isinstance(g, LLMGroup)) for k, e in engines.items()}
        diffs = {k: _bf16_check(groups, k) for k in ("cpu_mixed", "cpu_bf16") if k in groups and "today" in groups}
        print(f"\n{'path':10s} {'s/it':>6s} " + " ".join(f"{ph:>8s}" for ph in (*PHASES, "records", "other")))
        per_it = {}
        for label in engines:
            total = float(np.sum(steps[label]))
            per_it[label] = total / args.iterations
            phases = dict(groups[label].clock.seconds)
            phases["records"] = records[label]
            phases["other"] = total - sum(phases.values())
            print(f"{label:10s} {per_it[label]:6.2f} " + " ".join(f"{phases[ph] / total:8.1%}" for ph in phases))
        for e in engines.values():
            for g in e.groups:
                if hasattr(g, "close"):
                    g.close()
    for label, (worst, mean) in diffs.items():
        print(f"{label}: |log pi - float32 log pi| max {worst:.4f}, mean {mean:.4f}")
    if "today" in per_it:
        for label in sorted((k for k in per_it if k != "today"), key=lambda k: k == "cpu_mixed"):
            print(f"speedup_{label}_over_today={per_it['today'] / per_it[label]:.2f}")


def _today(group: Any) -> None:
    """Today's engine and learners: every scoring call on its own (no cached prompt heads), and peft's own adapter
    switching (set_adapter / disable_adapter / train walk the model; actors/llm/lora_switch.py)."""
    group.engine.prefix_cache = False
    group.engine.fast_switch = False
    if group.engine._switch is not None:
        group.engine._switch.fast = False
    group.learners.host.switch.fast = False


def _bf16_check(groups: dict[str, Any], label: str) -> tuple[float, float]:
    """(largest, mean) |log pi(answer)| difference, today's float32 engine vs the `label` path's bf16 engine, on
    compact prompts: today's learners' adapters are served by both engines under a probe name, and both score the
    same answers."""
    import numpy as np

    from actors.llm.prompts import chat_ids, game_prompt_text, variant_system
    from simulator.contracts import Action
    from simulator.games import GAMES

    fp32, bf16 = groups["today"], groups[label]
    tokens = fp32.runs[0].tokens
    rng = np.random.default_rng(0)
    prompts = [chat_ids(fp32.tokenizer, game_prompt_text(GAMES["IPD"], tokens, own, opp, rng, "compact", False, None),
                        variant_system("compact"))
               for own in Action for opp in Action]
    answers = [list(q) for q in fp32.runs[0].trie.sequences]
    diffs: list[float] = []
    for name, weights in zip(fp32.serving.names, fp32.learners.export(fp32.serving.names), strict=True):
        probe = replace(weights, name=f"probe-{label}-{name}", version=0)
        for engine in (fp32.engine, bf16.engine):
            engine.load_adapter(probe)
        for prompt in prompts:
            for answer in answers:
                a = fp32.engine.score(probe.name, prompt, answer)
                b = bf16.engine.score(probe.name, prompt, answer)
                diffs.extend(np.abs(np.subtract(a, b)).tolist())
    return float(np.max(diffs)), float(np.mean(diffs))


if __name__ == "__main__":
    main()
