"""Will an LLM population fit? Memory estimated from the model's config.json before any model loads (torch-free).

    base weights     params x bytes(dtype), once per engine and once per learner host (bf16-mixed: linear weights
                     in bf16, embeddings float32, a tied output layer's bf16 copy beside them)
    learner state    per adapter: LoRA weights, gradients and two Adam moments (float32, 16 bytes a parameter)
    served adapters  per adapter one float32 copy in the engine (vLLM's CPU LoRA cache holds them all)
    KV cache         every decision of an iteration (N moves x 2 + N selections) x prompt tokens x
                     2 (K, V) x layers x kv_heads x head_dim x bytes; on vLLM its reserved share of the GPU instead
    PPO activations  batch_size x prompt tokens x layers x hidden x ~24 floats (forward kept for backward)

LoRA parameters per adapter (all-linear on a Llama block): r x (in + out) summed over q, k, v, o, gate, up, down;
SmolLM2-135M at r = 64: 19.5M. Like simulator/resources.py it errs on the high side and names the big terms.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from actors.llm.config import LLMAgentConfig
from simulator.errors import ConfigError

GiB = 1 << 30
PROMPT_TOKENS = 256  # a structured game prompt is ~220 tokens with SmolLM2's template; the selection prompt grows
# with the candidates (about 12 tokens each), counted separately below


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> ModelShape:
        c = json.loads((Path(model_dir) / "config.json").read_text())
        c = c.get("text_config", c)  # multimodal configs nest the language model's
        heads = int(c["num_attention_heads"])
        return cls(int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"]), heads,
                   int(c.get("num_key_value_heads", heads)), int(c.get("head_dim") or c["hidden_size"] // heads),
                   int(c["vocab_size"]), bool(c.get("tie_word_embeddings", False)))

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * sum(a * b for a, b in self.linears())

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (a + b) for a, b in self.linears())


def adapter_count(mode: str, codes: list[str], runs: int) -> int:
    """Adapters a population's LLM agents need (LLMAgentConfig.adapters), over `runs` stacked runs."""
    per_run = {"per_agent": len(codes), "per_type": len(set(codes)), "shared": 1 if codes else 0}[mode]
    return per_run * runs


def estimate(cfg: LLMAgentConfig, shape: ModelShape, codes: list[str], num_agents: int, runs: int) -> dict[str, int]:
    """Bytes by what holds them, for the LLM agents `codes` (their moral types) of a population of num_agents."""
    wbytes = 2 if cfg.dtype == "bfloat16" else 4
    base = shape.params * wbytes
    if cfg.dtype == "bf16-mixed":  # linear weights (and a tied output layer's copy) in bf16, embeddings in float32
        base = shape.params * 2 + shape.vocab * shape.hidden * (2 + (2 if shape.tied else 0))
    engines = max(1, cfg.actors.rollout_actors)
    hosts = cfg.actors.learner_actors if cfg.actors.enabled else 1
    n_adapters = adapter_count(cfg.adapters, codes, runs)
    lora = shape.lora_params(cfg.ppo.lora_r)
    selection_tokens = 12 * (num_agents - 1) if cfg.selection == "prompt" else 0
    decisions = runs * (2 * len(codes) + (len(codes) if cfg.selection == "prompt" else 0))
    kv_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * wbytes
    parts = {
        "base weights": base * (engines + hosts),
        "learner state": n_adapters * (lora * 16 + shape.hidden * 4 * 4),
        "served adapters": n_adapters * lora * 4,
        "KV cache": decisions * (PROMPT_TOKENS + selection_tokens) * kv_token,
        "PPO activations": hosts * cfg.ppo.mini_batch_size * PROMPT_TOKENS * shape.layers * shape.hidden * 24 * 4,
    }
    return parts


def check_memory(cfg: LLMAgentConfig, shape: ModelShape, codes: list[str], num_agents: int, runs: int,
                 available: int) -> int:
    """ConfigError naming the big terms and the valid ways out when the estimate exceeds `available` bytes."""
    parts = estimate(cfg, shape, codes, num_agents, runs)
    total = sum(parts.values())
    if total <= available:
        return total
    big = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    n = adapter_count(cfg.adapters, codes, runs)
    raise ConfigError(
        f"{len(codes)} LLM agents x {runs} runs need about {total / GiB:.1f} GiB ({big}; {n} adapters of rank "
        f"{cfg.ppo.lora_r}), more than the {available / GiB:.1f} GiB there is; valid ways out: adapters = per_type "
        f"or shared (one LoRA per moral type / per run), a smaller lora_r, dtype = bfloat16, fewer runs at once "
        f"(--runs_per_batch), or more devices (llm.actors)")


def runs_per_device(cfg: LLMAgentConfig, shape: ModelShape, codes: list[str], num_agents: int, available: int) -> int:
    """How many runs of this population one device holds when they stack on one engine and one learner host: the
    base weights once, then per run its adapters, learner state, KV cache (the estimate is linear in runs). 0 when
    not even one fits."""
    one = sum(estimate(cfg, shape, codes, num_agents, 1).values())
    two = sum(estimate(cfg, shape, codes, num_agents, 2).values())
    per_run = max(1, two - one)
    fixed = one - per_run
    return max(0, (available - fixed) // per_run)


def available_bytes(cfg: LLMAgentConfig) -> int:
    """What the LLM stack may use: the machine's memory on CPU, the GPUs' on CUDA (LLMActors.gpu_memory_gib each)."""
    if cfg.device.startswith("cuda"):
        a = cfg.actors
        gpus = a.rollout_actors * a.rollout_gpus + a.learner_actors * a.learner_gpus if a.enabled else 1.0
        return int(gpus * a.gpu_memory_gib * GiB)
    from simulator.resources import machine_memory

    return machine_memory()[0]
