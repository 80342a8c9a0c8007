"""Serving: which LoRA adapter each LLM agent plays with, and which version of it the rollout engine serves.

    agents b = run * G + member ──adapter_of[b]──► adapters (one per agent | per moral type | per run)
                                                        │
    learner step result ──land()──► engine.load_adapter ┴─► served[adapter] = version; stats[adapter]

`adapters` (LLMAgentConfig.adapters): `per_agent` is the paper's set-up, one LoRA per agent; `per_type` gives the
agents of one moral type one LoRA, trained on all their samples; `shared` gives all LLM agents of a run one LoRA.
Adapters never cross runs, so a run's records do not depend on how runs are batched into one engine. An agent's
identity, partner memory and records stay its own whatever adapter it plays with.

A plain class: it holds names, versions and the updates in flight, and calls the engine it is handed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from actors.llm.config import ADAPTER_MODES
from actors.llm.learners import StepHandle, StepResult
from simulator.errors import ConfigError


def adapter_names(mode: str, runs: int, slots: Sequence[int], codes: Sequence[str]) -> list[str]:
    """The adapter of every agent b = run * G + member (G = len(slots)); `codes` are the members' moral types."""
    if mode not in ADAPTER_MODES:
        raise ConfigError(f"unknown LLM adapters mode {mode!r}; valid: {', '.join(ADAPTER_MODES)}")
    if len(codes) != len(slots):
        raise ConfigError(f"one moral type per slot: {len(slots)} slots, {len(codes)} types")

    def one(r: int, slot: int, code: str) -> str:
        if mode == "per_agent":
            return f"run{r}-slot{int(slot)}"
        if mode == "per_type":  # peft adapter names become module keys: letters, digits, '_' and '-' only
            return f"run{r}-type-{re.sub(r'[^A-Za-z0-9_-]', '_', code)}"
        return f"run{r}-shared"

    return [one(r, s, c) for r in range(runs) for s, c in zip(slots, codes, strict=True)]


class Serving:
    """Per adapter: the version the engine serves, its last update's statistics, the update in flight."""

    def __init__(self, adapter_of: Sequence[str]) -> None:
        self.adapter_of = list(adapter_of)  # per agent b
        self.names = list(dict.fromkeys(self.adapter_of))  # adapters, in order of their first agent
        self.served = dict.fromkeys(self.names, 0)  # v0: every learner's initialisation
        self.stats: dict[str, dict[str, float]] = {n: {} for n in self.names}
        self.pending: dict[str, StepHandle] = {}  # overlap: at most one update in flight per adapter

    def agents(self, name: str) -> list[int]:
        return [b for b, a in enumerate(self.adapter_of) if a == name]

    def expected(self, bs: Sequence[int]) -> dict[str, int]:
        """adapter -> the version its results must come from (check_fresh), for the agents `bs`."""
        return {self.adapter_of[b]: self.served[self.adapter_of[b]] for b in bs}

    def trained_version(self, name: str) -> int:
        """The learner's version once the update in flight (if any) lands."""
        return self.served[name] + (name in self.pending)

    def land(self, engine: Any, result: StepResult) -> dict[str, float]:
        """An update finished: keep its statistics and serve its adapter (the next rollout uses it)."""
        self.stats[result.name] = result.stats
        engine.load_adapter(result.weights)
        self.served[result.name] = result.version
        return result.stats

    def sync(self, engine: Any, block: bool) -> list[dict[str, float]]:
        """Land the updates in flight: all of them (block), or those that finished."""
        return [self.land(engine, self.pending.pop(n).result())
                for n in sorted(self.pending) if block or self.pending[n].done()]
