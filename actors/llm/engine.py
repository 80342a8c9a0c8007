"""The rollout-engine contract shared by the `hf` and `vllm` engines.

Engines take and return plain data (token ids, floats), so a Ray shell can host them unchanged.

    requests (one per agent decision)          results (same order)
    ┌───────────────────────────────┐          ┌──────────────────────────────────┐
    │ adapter: "agent-3"            │  engine  │ token_ids      (T,) generated ids │
    │ prompt_ids: chat-templated ids│ ───────► │ logprobs       (T,) log pi(tok)   │
    │ max_new_tokens, temperature   │          │ text, adapter_version             │
    └───────────────────────────────┘          └──────────────────────────────────┘

Every agent's LoRA adapter is served on one shared base model; requests for different adapters
are mixed in one batch. `adapter=None` means the base model (adapter disabled).

Weight sync, the one rule every engine and the Ray proxy apply (`check_version`): an adapter's versions strictly
increase. A version equal to the served one is refused like an older one: a learner never exports two different
weights under one version, so an equal version is a replayed or reordered sync. Only `restore` (a run rolled back to
its checkpoint) may go back. Base-model results carry BASE_VERSION; BASE_ADAPTER is the reserved adapter name under
which an engine serves the base model itself. `make_engine` is the one factory (main.py's groups, the Ray rollout
actors, `main.py evaluate` and the virtue pipeline).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from simulator.errors import ConfigError, StaleAdapterError

BASE_ADAPTER = "__base__"  # reserved: peft's "adapter disabled" in a mixed batch, vLLM's all-zero stand-in
BASE_VERSION = -1  # adapter_version of results from the base model (adapter=None)
ENGINE_KINDS = ("hf", "vllm")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]  # (P,) chat-templated prompt token ids
    adapter: str | None = None  # adapter name (one per agent); None = frozen base
    max_new_tokens: int = 4
    temperature: float = 1.0  # 1.0 samples from pi; 0.0 is greedy
    stop_at_eos: bool = True  # False: exactly max_new_tokens tokens, as the paper generated (actors/llm/answers.py)
    seed: int | None = None  # per-request sampling seed (from the agent's own stream); None = the engine's stream


@dataclass(frozen=True)
class GenerationResult:
    token_ids: tuple[int, ...]  # (T,) generated token ids, EOS included when produced
    logprobs: tuple[float, ...]  # (T,) log pi(token_t | prompt, tokens_<t) under the serving weights
    text: str  # decoded completion, special tokens skipped
    adapter: str | None
    adapter_version: int  # version of the adapter weights that produced this completion (-1 = base)


@dataclass(frozen=True)
class AdapterWeights:
    """One LoRA adapter as plain tensors, keyed by peft state-dict names (no adapter-name infix)."""

    name: str
    version: int
    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    peft_config: Mapping[str, object] = field(repr=False)  # LoraConfig.to_dict()


@runtime_checkable
class RolloutEngine(Protocol):
    """Generation and scoring on served adapters. Stopping: a request with stop_at_eos stops at any id of
    `eos_ids` (the tokenizer's EOS plus the generation config's; both engines use that same set)."""

    tokenizer: Any  # the served model's tokenizer (chat template, action-token ids)
    eos_ids: tuple[int, ...]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate one completion per request, all in one batch where the backend allows."""
        ...

    def score(
        self, adapter: str | None, prompt_ids: Sequence[int], completion_ids: Sequence[int]
    ) -> list[float]:
        """log pi(completion_t | prompt, completion_<t) for each completion token, served weights."""
        ...

    def score_batch(
        self, adapters: Sequence[str | None], prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """score() for many rows in one call (P(cooperate), masked answers)."""
        ...

    def load_adapter(self, weights: AdapterWeights, restore: bool = False) -> None:
        """Serve these weights for `weights.name` from now on (the weight sync). Versions only move forward, except
        with `restore`: a run rolled back to its last checkpoint serves that checkpoint's versions again."""
        ...

    def adapter_version(self, adapter: str) -> int:
        """The version now served for `adapter`; raises if the adapter is unknown."""
        ...

    def close(self) -> None:
        """Release what the engine holds (vLLM's engine core and adapter folders); a no-op where nothing is held."""
        ...


def check_version(name: str, version: int, served: int | None, restore: bool = False) -> None:
    """The weight-sync rule (module docstring): raise StaleAdapterError unless `version` is newer than `served`."""
    if name == BASE_ADAPTER:
        raise ConfigError(f"adapter name {BASE_ADAPTER!r} is reserved for the engine's base model")
    if served is not None and version <= served and not restore:
        raise StaleAdapterError(f"adapter {name!r}: expected a version newer than the served v{served}, got v{version}")


def make_engine(
    kind: str,
    model_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    seed: int = 0,
    max_loras: int = 1,
    max_lora_rank: int = 64,
    gpu_memory_utilization: float | None = None,
    dtype: str = "float32",
    quantize: str = "none",
) -> RolloutEngine:
    """The one engine factory: `kind` hf (transformers + peft) or vllm, serving up to `max_loras` adapters at once;
    `dtype` float32, bfloat16 or bf16-mixed (actors/llm/models.py; vLLM computes bf16-mixed as bfloat16);
    `quantize` nf4 / nf4_double: a 4-bit base (hf only, LLMAgentConfig refuses it with vllm)."""
    if kind == "vllm":
        from actors.llm.vllm_engine import VLLMEngine

        extra: dict[str, Any] = {}
        if device.startswith("cuda") and gpu_memory_utilization is not None:  # vLLM picks the GPU Ray made visible
            extra["gpu_memory_utilization"] = gpu_memory_utilization
        if dtype != "float32":
            extra["dtype"] = "bfloat16"  # bfloat16 and bf16-mixed: vLLM's own bf16 kernels
        return VLLMEngine(model_dir, max_loras=max(1, max_loras), max_lora_rank=max_lora_rank, seed=seed, **extra)
    if kind == "hf":
        from actors.llm.hf_engine import HFEngine
        from actors.llm.models import weights_dtype

        torch_dtype, mixed = weights_dtype(dtype)
        return HFEngine(model_dir, device=device, seed=seed, dtype=torch_dtype, quantize=quantize, mixed=mixed)
    raise ConfigError(f"unknown LLM engine {kind!r}; valid: {', '.join(ENGINE_KINDS)}")


def common_prefix(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """Tokens that every sequence starts with, at most `limit`."""
    first, n = seqs[0], limit
    for q in seqs[1:]:
        k = 0
        while k < n and q[k] == first[k]:
            k += 1
        n = k
    return n


def check_fresh(results: Sequence[GenerationResult], latest: Mapping[str, int]) -> None:
    """Raise StaleAdapterError if any result was produced by an adapter older than `latest[adapter]`.

    `latest` maps adapter name -> the learner's newest exported version; adapters not in it are not checked.
    """
    for k, r in enumerate(results):
        want = latest.get(r.adapter) if r.adapter is not None else None
        if want is not None and r.adapter_version < want:
            raise StaleAdapterError(
                f"result {k} for adapter {r.adapter!r} came from version {r.adapter_version}, expected >= {want}; "
                "sync weights (engine.load_adapter(learner.export_adapter())) before generating"
            )


def action_logprobs(
    engine: RolloutEngine,
    adapters: Sequence[str | None],
    prompts: Sequence[Sequence[int]],
    c_ids: Sequence[int],
    d_ids: Sequence[int],
) -> np.ndarray:
    """(B, 2) log pi of answering exactly the C tokens / the D tokens first (EOS not required), one scoring call."""
    B = len(prompts)
    lp = engine.score_batch([*adapters, *adapters], [*prompts, *prompts], [list(c_ids)] * B + [list(d_ids)] * B)
    total = np.array([sum(x) for x in lp], dtype=np.float64)
    return np.stack([total[:B], total[B:]], axis=1)


def action_probs(
    engine: RolloutEngine,
    adapters: Sequence[str | None],
    prompts: Sequence[Sequence[int]],
    c_ids: Sequence[int],
    d_ids: Sequence[int],
) -> np.ndarray:
    """(B, 2) probabilities of answering exactly the C tokens / the D tokens first (EOS not required), one scoring call.

    For single-token answers this is P(C token), P(D token) at the first answer position. P(C | legal) is
    `legal_share` of the log pi; 1 - p.sum(1) is the probability mass of answers that start illegally.
    """
    return np.exp(action_logprobs(engine, adapters, prompts, c_ids, d_ids))


def legal_share(logp_c: np.ndarray | float, logp_d: np.ndarray | float) -> np.ndarray:
    """P(C) / (P(C) + P(D)) from the two answers' total log pi: the one formula for P(cooperate) everywhere
    (free answers, masked answers, evaluation); stable where both probabilities underflow."""
    return 1.0 / (1.0 + np.exp(np.asarray(logp_d, dtype=np.float64) - np.asarray(logp_c, dtype=np.float64)))
