"""LLM agents in the population: one `LLMGroup` plays every LLM slot of R stacked runs.

    engine (hf | vllm, one for the group)         learners (one PPOLearner per agent, one shared PolicyHost)
    ┌──────────────────────────────────────┐      ┌───────────────────────────────────────────────────────┐
    │ act(): every decision of the         │      │ learn(): each agent's (prompt, answer, reward) samples │
    │ iteration in ONE generate call, each │◄─────│ buffer until batch_size, then PPO step, then           │
    │ request with its agent's adapter     │ sync │ engine.load_adapter(learner.export_adapter())          │
    └──────────────────────────────────────┘      └───────────────────────────────────────────────────────┘

Decisions: the game prompt (actors/llm/prompts.py) shows last round's moves and points, the two action tokens in a
random order drawn from the agent's own stream; the answer is parsed strictly. An illegal answer plays D (no
cooperation took place) with reason `illegal`, and the engine gives it the learning reward R_illegal.
Partner selection: `random` (uniform), `dqn` (a DQN selection head per agent, actors/dqn.py) or `prompt` (the model
picks an agent id from a list of candidates and their last moves; that answer is trained with PPO too, rewarded with
the learning reward of the game it led to, or R_illegal).
Every rollout is checked against the learner's version before use: a stale adapter raises StaleAdapterError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from actors.dqn import DQNConfig, DQNGroup
from actors.llm.engine import GenerationRequest, GenerationResult, RolloutEngine, check_fresh
from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
from actors.llm.prompts import (
    STRUCTURED,
    TokenPair,
    chat_ids,
    check_variant,
    game_prompt_text,
    parse_answer,
    parse_partner,
    partner_prompt_text,
    random_token_pair,
    token_pair,
)
from actors.static import uniform_partner
from simulator.contracts import Action, Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions
from simulator.errors import ConfigError
from simulator.games import Game
from simulator.rewards import R_ILLEGAL

log = logging.getLogger(__name__)

SELECTION_MODES = ("random", "dqn", "prompt")
ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class LLMAgentConfig:
    model: str = "smollm2-135m-instruct"
    """a local Hugging Face folder, a hub id, or the embedded smollm2-135m-instruct"""
    engine: str = "hf"
    """rollout engine: hf (transformers, CPU or GPU) or vllm"""
    device: str = "cpu"
    tokens: str = "action12"
    """action-token pair (actors.llm.prompts.TOKEN_PAIRS) or random:<length>"""
    variant: str = STRUCTURED
    selection: str = "random"
    """partner selection: random, dqn or prompt"""
    max_new_tokens: int = 4
    temperature: float = 1.0
    train: bool = True
    p_cooperate: bool = True
    """record P(C token) / (P(C) + P(D)) per decision (one extra scoring pass where the engine offers it)"""
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown LLM engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.selection not in SELECTION_MODES:
            raise ConfigError(f"unknown LLM partner selection {self.selection!r}; valid: {', '.join(SELECTION_MODES)}")
        check_variant(self.variant)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def resolve_tokens(spec: str, rng: np.random.Generator) -> TokenPair:
    if spec.startswith("random:"):
        try:
            length = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"random action tokens are written random:<length>, got {spec!r}") from None
        return random_token_pair(length, rng)
    return token_pair(spec)


def make_engine(config: LLMAgentConfig, model_dir: Path, seed: int, max_loras: int) -> RolloutEngine:
    if config.engine == "vllm":
        from actors.llm.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, max_loras=max(1, max_loras), max_lora_rank=config.ppo.lora_r, seed=seed)
    from actors.llm.hf_engine import HFEngine

    return HFEngine(model_dir, device=config.device, seed=seed)


def cooperation_probability(
    engine: RolloutEngine, tokenizer: Any, tokens: TokenPair, adapters: list[str | None], prompts: list[list[int]]
) -> np.ndarray:
    """(B,) P(C answer) / (P(C answer) + P(D answer)) per prompt, one scoring call; NaN where the engine cannot score."""
    probs = getattr(engine, "action_probs", None)
    if probs is None:
        return np.full(len(prompts), np.nan)
    c_ids = tokenizer(tokens.c, add_special_tokens=False)["input_ids"]
    d_ids = tokenizer(tokens.d, add_special_tokens=False)["input_ids"]
    p = probs(adapters, prompts, c_ids, d_ids)
    return p[:, 0] / np.maximum(p.sum(axis=1), 1e-30)


@dataclass
class _Sample:
    prompt: list[int]
    response: list[int]


class LLMGroup:
    """All LLM slots of a population for R runs (see module docstring)."""

    learns = True

    def __init__(
        self,
        slots: np.ndarray,
        num_agents: int,
        game: Game,
        rngs: list[list[np.random.Generator]],
        config: LLMAgentConfig,
        *,
        seed: int = 0,
        engine: RolloutEngine | None = None,
        model_dir: Path | None = None,
    ) -> None:
        from actors.llm.models import resolve_model

        self.slots = np.asarray(slots, dtype=np.int64)
        self.cfg = config
        self.game = game
        self.R, self.G, self.n_others = len(rngs), len(self.slots), num_agents - 1
        self.rngs = [rng for run in rngs for rng in run]  # b = run * G + member: option order, token draws
        self.tokens = resolve_tokens(config.tokens, np.random.default_rng(seed))
        model_dir = model_dir or resolve_model(config.model)
        self.host = PolicyHost(model_dir, device=config.device)
        self.tokenizer = self.host.tokenizer
        self.names = [f"run{r}-slot{int(s)}" for r in range(self.R) for s in self.slots]
        self.learners = [
            PPOLearner(self.host, name, replace(config.ppo, seed=config.ppo.seed + b))
            for b, name in enumerate(self.names)
        ]
        self.engine = engine or make_engine(config, model_dir, seed, len(self.names))
        for learner in self.learners:
            self.engine.load_adapter(learner.export_adapter())
        self.buffers: list[list[tuple[_Sample, float]]] = [[] for _ in self.names]
        self.last_stats: list[dict[str, float]] = [{} for _ in self.names]
        self._act_samples: list[_Sample] = []
        self._sel_samples: dict[int, _Sample] = {}
        self._sel_illegal: np.ndarray = np.zeros(0, dtype=bool)
        self.head: DQNGroup | None = None
        if config.selection == "dqn":
            self.head = DQNGroup(self.slots, num_agents, rngs, DQNConfig(learn_dilemma=False))

    # -- engine calls -------------------------------------------------------------------------------------------
    def _generate(self, bs: list[int], prompts: list[list[int]]) -> list[GenerationResult]:
        requests = [
            GenerationRequest(tuple(p), self.names[b], self.cfg.max_new_tokens, self.cfg.temperature)
            for b, p in zip(bs, prompts, strict=True)
        ]
        results = self.engine.generate(requests)
        check_fresh(results, {self.names[b]: self.learners[b].version for b in set(bs)})
        return results

    def _p_cooperate(self, bs: list[int], prompts: list[list[int]]) -> np.ndarray:
        if not self.cfg.p_cooperate:
            return np.full(len(bs), np.nan)
        return cooperation_probability(self.engine, self.tokenizer, self.tokens, [self.names[b] for b in bs], prompts)

    # -- decisions ----------------------------------------------------------------------------------------------
    def select(self, batch: SelectionBatch) -> Decisions:
        random_choice = uniform_partner(batch.u[..., 1], self.n_others)
        if self.cfg.selection == "random":
            return Decisions(random_choice, np.full(random_choice.shape, Reason.STATIC, dtype=np.int8))
        if self.head is not None:
            return self.head.select(batch)
        bs, prompts, others = [], [], []
        for r in range(self.R):
            for g, slot in enumerate(self.slots):
                b = r * self.G + g
                ids = [i for i in range(self.n_others + 1) if i != slot]
                last = [None if batch.iteration == 0 else Action(int(m)) for m in batch.state[r, g]]
                text = partner_prompt_text(list(zip(ids, last, strict=True)), self.tokens, self.rngs[b])
                bs.append(b)
                prompts.append(chat_ids(self.tokenizer, text))
                others.append(ids)
        results = self._generate(bs, prompts)
        choice = random_choice.copy()
        reason = np.full(choice.shape, Reason.POLICY, dtype=np.int8)
        self._sel_samples = {}
        self._sel_illegal = np.zeros(choice.shape, dtype=bool)
        for b, prompt, ids, res in zip(bs, prompts, others, results, strict=True):
            r, g = divmod(b, self.G)
            picked = parse_partner(res.text, ids)
            if picked is None:
                reason[r, g] = Reason.ILLEGAL
                self._sel_illegal[r, g] = True
            else:
                choice[r, g] = ids.index(picked)
            self._sel_samples[b] = _Sample(prompt, list(res.token_ids))
        return Decisions(choice, reason)

    def act(self, batch: DilemmaBatch) -> Decisions:
        bs = (batch.run * self.G + batch.member).tolist()
        prompts = []
        for k, b in enumerate(bs):
            first = batch.iteration == 0
            own = None if first else Action(int(batch.own_prev[k]))
            opp = None if first else Action(int(batch.state[k]))
            text = game_prompt_text(self.game, self.tokens, own, opp, self.rngs[b], self.cfg.variant)
            prompts.append(chat_ids(self.tokenizer, text))
        results = self._generate(bs, prompts)
        parsed = [parse_answer(res.text, self.tokens) for res in results]
        legal = np.array([p is not None for p in parsed])
        action = np.array([int(p) if p is not None else int(Action.D) for p in parsed], dtype=np.int64)
        reason = np.where(legal, Reason.POLICY, Reason.ILLEGAL).astype(np.int8)
        self._act_samples = [_Sample(p, list(res.token_ids)) for p, res in zip(prompts, results, strict=True)]
        stats = [self.last_stats[b] for b in bs]
        extra: dict[str, np.ndarray] = {
            "prompt_variant": np.array([self.cfg.variant] * len(bs), dtype=object),
            "action_tokens": np.array([f"{self.tokens.c}|{self.tokens.d}"] * len(bs), dtype=object),
            "raw_answer": np.array([res.text for res in results], dtype=object),
            "legal": legal.astype(np.float32),
            "p_cooperate": self._p_cooperate(bs, prompts).astype(np.float32),
            "adapter_version": np.array([res.adapter_version for res in results], dtype=np.float64),
            "kl": np.array([s.get("kl", np.nan) for s in stats], dtype=np.float32),
            "policy_loss": np.array([s.get("policy_loss", np.nan) for s in stats], dtype=np.float32),
            "value_loss": np.array([s.get("value_loss", np.nan) for s in stats], dtype=np.float32),
        }
        return Decisions(action, reason, extra)

    # -- learning -----------------------------------------------------------------------------------------------
    def learn(self, tr: Transitions) -> dict[str, Any]:
        if not self.cfg.train:
            return {}
        if self.head is not None:
            self.head.learn(tr)
        bs = (tr.run * self.G + tr.member).tolist()
        for b, sample, reward in zip(bs, self._act_samples, tr.reward.tolist(), strict=True):
            self.buffers[b].append((sample, float(reward)))
        for b, sample in self._sel_samples.items():
            r, g = divmod(b, self.G)
            reward = R_ILLEGAL if self._sel_illegal[r, g] else float(tr.sel_reward[r, g])
            self.buffers[b].append((sample, reward))
        self._sel_samples = {}
        updated = 0
        for b, learner in enumerate(self.learners):
            n = learner.config.batch_size
            while len(self.buffers[b]) >= n:
                chunk, self.buffers[b] = self.buffers[b][:n], self.buffers[b][n:]
                self.last_stats[b] = learner.step(
                    [s.prompt for s, _ in chunk], [s.response for s, _ in chunk], [r for _, r in chunk]
                )
                self.engine.load_adapter(learner.export_adapter())  # weight sync: the next rollout uses v+1
                updated += 1
        return {"ppo_updates": updated}

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None

    def save(self, run_dirs: list[Path]) -> None:
        """Each agent's final adapter as a peft folder: <run dir>/adapters/slot<k>/ (PeftModel.from_pretrained reads it)."""
        from actors.llm.weight_sync import adapter_to_peft_dir

        for b, learner in enumerate(self.learners):
            r, g = divmod(b, self.G)
            adapter_to_peft_dir(learner.export_adapter(), Path(run_dirs[r]) / "adapters" / f"slot{int(self.slots[g])}")
