"""LLM agents in the population: one `LLMGroup` plays every LLM slot of R stacked runs.

    engine (hf | vllm, one for the group)         learners (one PPOLearner per adapter, one shared PolicyHost)
    ┌──────────────────────────────────────┐      ┌───────────────────────────────────────────────────────┐
    │ act(): every decision of the         │      │ learn(): each agent's (prompt, answer, reward) samples │
    │ iteration in ONE generate call, each │◄─────│ buffer until batch_size, then PPO step, then           │
    │ request with its agent's adapter     │ sync │ engine.load_adapter(learner.export_adapter())          │
    └──────────────────────────────────────┘      └───────────────────────────────────────────────────────┘

Decisions: the game prompt (actors/llm/prompts.py) shows last round's moves and points, the two action tokens in a
random order drawn from the agent's own stream; the answer is parsed strictly. In a population of more than two
the agent's own last move and its partner's come from different games, and the prompt says so.
Answers end as the paper's did (actors/llm/answers.py): by default exactly the action token's length in tokens;
`answer_mode = "mask"` restricts the answer to the two legal token sequences (for models too small to follow the
format), and PPO then trains the masked policy.
An illegal answer: reason `illegal`, learning reward R_illegal, and the agent's move stays its previous one (its
snapshot move), as in the paper: `fine_tune.py` does not update the learner's state after an illegal token, so TFT
copies the last legal move, and `fine_tune_2learners.py` pays the opponent against the illegal player's last legal
move. The record's action is that carried-over move; its `legal` column is false.

Randomness: every learner's initialisation and every sampling coin comes from its agent's own stream of the run
(simulator/seeding.py), so a run's records do not depend on how runs are batched into one engine. Run-level draws
(a `random:<len>` action-token pair, one per run; the engine's seed) come from a side stream of the run's first LLM
agent (`seeding.side_stream`), which leaves that agent's own draws unchanged.
Samples keep the adapter version and the behaviour log pi that produced them: a sample older than its learner is
trained with the importance ratio (`off_policy = "ratio"`) or dropped and counted (`"drop"`).
Partner selection: `random` (uniform), `dqn` (a DQN selection head per agent, actors/dqn.py) or `prompt` (the model
picks an agent id from a list of candidates, their most recent moves and their last moves against it; that answer
is trained with PPO too, rewarded with the learning reward of the game it led to, or R_illegal). In mask mode the
partner answer is restricted to the candidates' ids, as a move is to the action tokens, and PPO trains that mask.

The group is four plain parts and the calls between them (one engine call per phase of an iteration):
    Decider (actors/llm/deciding.py)       prompts, partner memory, answers -> decisions
    Rollouts (actors/llm/rollouts.py)      the engine calls: free or masked answers, P(C), any requests
    SampleBuffers (actors/llm/learning.py) rewarded samples per adapter -> PPO steps
    Serving (actors/llm/serving.py)        agent -> adapter (per_agent | per_type | shared), served versions, sync
`clock` adds up the seconds of each phase (prompts, rollouts, scoring, ppo, sync) for benchmarks/llm_population.py.
Every rollout is checked against the learner's version before use: a stale adapter raises StaleAdapterError.
Moral types that score a stated reason (VR, Game+VR; actors/llm/virtue/dilemma.py): after the move, the agent is
asked for a one-sentence reason (a second generate call through the same engine, its own adapter,
`[llm.virtue] reason_tokens`); the three virtue reward models (loaded once per group) score the conversation, and
weight * ensemble is the decision's Decisions.reward_term, which the engine adds to the type's payoff part. PPO
trains the move answer only, on that reward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from actors.dqn import DQNConfig, DQNGroup
from actors.llm import budget
from actors.llm.config import LLMAgentConfig, VirtueConfig
from actors.llm.deciding import Decider
from actors.llm.engine import (
    RolloutEngine,
    legal_share,
    make_engine,
)
from actors.llm.learners import LearnerGroup, LearnerPool, StepJob
from actors.llm.learning import Sample, SampleBuffers
from actors.llm.prompts import TokenPair, parse_answer, random_token_pair, token_pair
from actors.llm.rollouts import Rollouts
from actors.llm.serving import Serving, adapter_names
from actors.llm.virtue.dilemma import stated_reasons
from actors.static import uniform_partner
from simulator.contracts import Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions
from simulator.errors import ConfigError
from simulator.games import Game
from simulator.rewards import REASON_TYPES
from simulator.seeding import side_stream

log = logging.getLogger(__name__)

PHASES = ("prompts", "rollouts", "scoring", "ppo", "sync")


def resolve_tokens(spec: str, rng: np.random.Generator) -> TokenPair:
    if spec.startswith("random:"):
        try:
            length = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"random action tokens are written random:<length>, got {spec!r}") from None
        return random_token_pair(length, rng)
    return token_pair(spec)


def group_engine(config: LLMAgentConfig, model_dir: Path, seed: int, max_loras: int) -> RolloutEngine:
    """`make_engine` with an LLM group's settings (a top-level function: Ray pickles it for the rollout actors)."""
    return make_engine(config.engine, model_dir, device=config.device, seed=seed, max_loras=max_loras,
                       max_lora_rank=config.ppo.lora_r, gpu_memory_utilization=config.actors.gpu_memory_utilization,
                       dtype=config.dtype, quantize=config.quantize)


class PhaseClock:
    """Seconds spent per phase, added up over a run (benchmarks/llm_population.py reads them)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0


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
        engine: RolloutEngine | None = None,
        model_dir: Path | None = None,
        codes: list[str] | None = None,
    ) -> None:
        """codes: the moral type of each slot (per_type adapters need them); a reason-scoring type (VR) loads the
        reward models now, so a missing folder fails before any game; otherwise at the first such decision."""
        from actors.llm.models import resolve_model

        config.check_population(num_agents)  # before any model loads
        if config.adapters == "per_type" and codes is None:
            raise ConfigError("per_type adapters need each slot's moral type (codes)")
        model_dir = model_dir or resolve_model(config.model)  # a folder: the weights load later
        budget.check_memory(config, budget.ModelShape.from_dir(model_dir), codes or ["-"] * len(slots), num_agents,
                            len(rngs), budget.available_bytes(config))
        self.slots = np.asarray(slots, dtype=np.int64)
        self.cfg = config
        self.clock = PhaseClock()
        self._scorer: Any = None  # actors.llm.virtue.dilemma.VirtueScorer, loaded once
        if codes is not None and REASON_TYPES & set(codes):
            self.scorer()  # before the policy: a missing reward-model folder fails first
        self.R, self.G, self.n_others = len(rngs), len(self.slots), num_agents - 1
        # b = run * G + member. Each agent's own stream of its run: learner seed, option order, sampling coins
        self.rngs = [rng for run in rngs for rng in run]
        side = [side_stream(run[0]) for run in rngs]
        run_tokens = [resolve_tokens(config.tokens, s) for s in side]
        seed = int(side[0].integers(2**31))  # the engine's own stream (requests carry their agents' seeds)
        self.names = [f"run{r}-slot{int(s)}" for r in range(self.R) for s in self.slots]  # the agents
        self.serving = Serving(adapter_names(config.adapters, self.R, self.slots.tolist(), codes or ["-"] * self.G))
        seeds = [int(rng.integers(2**31)) for rng in self.rngs]  # every agent draws; an adapter takes its first's
        adapters = self.serving.names
        specs = [(name, replace(config.ppo, seed=seeds[self.serving.agents(name)[0]])) for name in adapters]
        self.cluster: Any = None  # actors.llm.remote.Cluster when the agents live on Ray actors
        self.learners: LearnerPool
        if config.actors.enabled:
            from transformers import AutoTokenizer

            from actors.llm.remote import launch, learner_group_factory

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.cluster = launch(
                config.actors, adapters, specs,
                lambda names: partial(group_engine, config, model_dir, seed, len(names)),
                learner_group_factory(str(model_dir), config.device, config.dtype, config.quantize), tokenizer,
                config.device,
            )
            self.learners = self.cluster.learners
            self.engine = engine or self.cluster.engine
        else:
            local = LearnerGroup(model_dir, specs, device=config.device, dtype=config.dtype, quantize=config.quantize)
            self.learners, tokenizer = local, local.tokenizer
            self.engine = engine or group_engine(config, model_dir, seed, len(adapters))
        self.tokenizer = tokenizer
        self._own_engine = engine is None  # an engine handed in belongs to the caller, who closes it
        for weights in self.learners.export(adapters):
            self.engine.load_adapter(weights)
        self.decider = Decider(tokenizer, game, config, self.slots.tolist(), num_agents, run_tokens)
        self.rollouts = Rollouts(self.engine, tokenizer, self.serving, self.rngs, config.temperature,
                                 config.stop == "eos", self.clock)
        self.buffers = SampleBuffers(adapters, config.ppo.batch_size, config.off_policy)
        self._act_samples: list[Sample] = []
        self._act_opponents: np.ndarray = np.zeros(0, dtype=np.int64)
        self._sel_samples: dict[int, Sample] = {}
        self._sel_illegal: np.ndarray = np.zeros(0, dtype=bool)
        self.head: DQNGroup | None = None
        if config.selection == "dqn":
            self.head = DQNGroup(self.slots, num_agents, rngs, DQNConfig(learn_dilemma=False))

    @property
    def runs(self) -> list[Any]:
        """Each run's legal answers (deciding.RunAnswers)."""
        return self.decider.runs

    def adapter(self, b: int) -> str:
        """The adapter agent b plays with."""
        return self.serving.adapter_of[b]

    # -- the virtue reward models (VR types) --------------------------------------------------------------------
    def scorer(self) -> Any:
        """The virtue reward models, loaded once (ConfigError naming the pipeline command when they are not there)."""
        if self._scorer is None:
            from actors.llm.virtue.dilemma import VirtueScorer

            self._scorer = VirtueScorer(self.virtue_cfg, self.cfg.device)
        return self._scorer

    @property
    def virtue_cfg(self) -> VirtueConfig:
        """[llm.virtue], or its defaults (the pipeline's default output folder) when the scenario has none."""
        return self.cfg.virtue or VirtueConfig()

    # -- decisions ----------------------------------------------------------------------------------------------
    def select(self, batch: SelectionBatch) -> Decisions:
        random_choice = uniform_partner(batch.u[..., 1], self.n_others)
        if self.cfg.selection == "random":
            return Decisions(random_choice, np.full(random_choice.shape, Reason.STATIC, dtype=np.int8))
        if self.head is not None:
            return self.head.select(batch)
        with self.clock("prompts"):
            prompts = self.decider.selection_prompts(batch, self.rngs)
        bs = list(range(self.R * self.G))
        members = [b % self.G for b in bs]
        if self.cfg.answer_mode == "mask":
            tries = [self.decider.partner_trie(g) for g in members]
            texts = [self.decider.partner_answers(g) for g in members]
            results, _ = self.rollouts.masked(bs, prompts, tries, texts)
            allowed: list[Any] = [t.allowed(res.token_ids) for t, res in zip(tries, results, strict=True)]
        else:
            results = self.rollouts.generate(bs, prompts, [self.decider.selection_tokens()] * len(bs))
            allowed = [None] * len(bs)
        choice = random_choice.copy()
        reason = np.full(choice.shape, Reason.POLICY, dtype=np.int8)
        self._sel_samples = {}
        self._sel_illegal = np.zeros(choice.shape, dtype=bool)
        for b, g, prompt, res, mask in zip(bs, members, prompts, results, allowed, strict=True):
            r = b // self.G
            picked = self.decider.partner_choice(g, res.text)
            if picked is None:
                reason[r, g] = Reason.ILLEGAL
                self._sel_illegal[r, g] = True
            else:
                choice[r, g] = picked
            self._sel_samples[b] = Sample(prompt, list(res.token_ids), list(res.logprobs), res.adapter_version, mask)
        return Decisions(choice, reason)

    def act(self, batch: DilemmaBatch) -> Decisions:
        with self.clock("prompts"):
            bs, texts, prompts = self.decider.game_prompts(batch, self.rngs)
        runs = [self.decider.run_of(b) for b in bs]
        if self.cfg.answer_mode == "mask":
            tries = [run.trie for run in runs if run.trie is not None]  # mask mode: every run has its trie
            results, scores = self.rollouts.masked(bs, prompts, tries, [run.answers for run in runs])
            # the trie's sequences are (C, D): P(C | legal) from the same scores
            p_c = np.array([legal_share(float(np.sum(s[0])), float(np.sum(s[1]))) for s in scores])
            if not self.cfg.p_cooperate:
                p_c[:] = np.nan
        else:
            results = self.rollouts.generate(bs, prompts, [run.max_new_tokens for run in runs])
            p_c = (self.rollouts.p_cooperate(bs, prompts, lambda b: self.decider.run_of(b).tokens)
                   if self.cfg.p_cooperate else np.full(len(bs), np.nan))
        period = self.cfg.answer_period
        parsed = [parse_answer(res.text, run.tokens, period) for res, run in zip(results, runs, strict=True)]
        legal = np.array([p is not None for p in parsed])
        # an illegal answer changes nothing: the agent's move stays its snapshot move (module docstring)
        action = np.array([int(p) if p is not None else int(batch.own_prev[k]) for k, p in enumerate(parsed)],
                          dtype=np.int64)
        reason = np.where(legal, Reason.POLICY, Reason.ILLEGAL).astype(np.int8)
        self._act_samples = [
            Sample(p, list(res.token_ids), list(res.logprobs), res.adapter_version,
                   None if run.trie is None else run.trie.allowed(res.token_ids))
            for p, res, run in zip(prompts, results, runs, strict=True)
        ]
        self._act_opponents = np.asarray(batch.opponent, dtype=np.int64)
        stats = [self.serving.stats[self.adapter(b)] for b in bs]
        extra: dict[str, np.ndarray] = {
            "prompt_variant": np.array([self.cfg.variant] * len(bs), dtype=object),
            "action_tokens": np.array([f"{run.tokens.c}|{run.tokens.d}" for run in runs], dtype=object),
            "answer_mode": np.array([self.cfg.answer_mode] * len(bs), dtype=object),
            "raw_answer": np.array([res.text for res in results], dtype=object),
            "legal": legal.astype(np.float32),
            "p_cooperate": p_c.astype(np.float32),
            "adapter_version": np.array([res.adapter_version for res in results], dtype=np.float64),
            "kl": np.array([s.get("kl", np.nan) for s in stats], dtype=np.float32),
            "policy_loss": np.array([s.get("policy_loss", np.nan) for s in stats], dtype=np.float32),
            "value_loss": np.array([s.get("value_loss", np.nan) for s in stats], dtype=np.float32),
        }
        # every LLM row carries the virtue columns (null unless its type scores a stated reason)
        reasoned = np.zeros(len(bs), dtype=bool) if batch.reasoned is None else np.asarray(batch.reasoned, dtype=bool)
        virtue = stated_reasons(self.rollouts, self.scorer() if reasoned.any() else None, self.virtue_cfg,
                                self.cfg.temperature, bs, texts, [res.text for res in results], reasoned)
        term = virtue.pop("_term")
        extra.update(virtue)
        return Decisions(action, reason, extra, term if reasoned.any() else None)

    # -- learning -----------------------------------------------------------------------------------------------
    def learn(self, tr: Transitions) -> dict[str, Any]:
        bs = (tr.run * self.G + tr.member).tolist()
        self.decider.memory.remember(bs, self._act_opponents.tolist(), tr.next_state.tolist())
        if not self.cfg.train:
            return {}
        if self.head is not None:
            self.head.learn(tr)
        for b, sample, reward in zip(bs, self._act_samples, tr.reward.tolist(), strict=True):
            self.buffers.add(self.adapter(b), sample, reward)
        for b, sample in self._sel_samples.items():
            r, g = divmod(b, self.G)
            self.buffers.add(self.adapter(b), sample, float(tr.sel_reward[r, g]))  # the engine pays -r_illegal
        self._sel_samples = {}
        overlap = self.cfg.actors.overlap
        with self.clock("sync"):
            updated = self.serving.sync(self.engine, block=not overlap)  # overlap: the updates that finished
        jobs = self.buffers.jobs(self.serving.trained_version)
        updated += self._train(jobs, overlap)
        out: dict[str, float] = {"ppo_updates": float(len(updated)), "stale_dropped": float(self.buffers.dropped)}
        if updated:  # the mean over this iteration's updates, for live tracking (Parquet keeps per-agent values)
            for key in ("kl", "kl_coef", "policy_loss", "value_loss", "entropy", "mean_score", "stale_samples"):
                out[key] = float(np.mean([st[key] for st in updated]))
        return out

    def _train(self, jobs: list[StepJob], overlap: bool) -> list[dict[str, float]]:
        """Run the PPO steps and serve their adapters; with overlap, leave each in flight (at most one per adapter,
        so rollouts are at most one version behind)."""
        updated: list[dict[str, float]] = []
        if overlap:
            for job in jobs:
                if job.name in self.serving.pending:
                    with self.clock("sync"):
                        updated.append(self.serving.land(self.engine, self.serving.pending.pop(job.name).result()))
                (self.serving.pending[job.name],) = self.learners.submit([job])
            return updated
        if jobs:
            with self.clock("ppo"):
                handles = self.learners.submit(jobs)  # learner actors run in parallel
                results = [h.result() for h in handles]
            with self.clock("sync"):
                updated = [self.serving.land(self.engine, res) for res in results]
        return updated

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None

    def save(self, run_dirs: list[Path]) -> None:
        """Each adapter as a peft folder: <run dir>/adapters/slot<k>/ per agent, type-<code>/ per type, shared/."""
        from actors.llm.weight_sync import adapter_to_peft_dir, fetch

        self.serving.sync(self.engine, block=True)  # overlap: the last updates belong to the run
        for name, weights in zip(self.serving.names, self.learners.export(self.serving.names), strict=True):
            run, folder = name.split("-", 1)
            adapter_to_peft_dir(fetch(weights), Path(run_dirs[int(run[3:])]) / "adapters" / folder)

    # -- checkpoint (simulator.contracts.Checkpointable) -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The group's whole learning state at an iteration boundary: learners (adapters, value heads, Adam, KL,
        score moments, RNGs), sample buffers, partner memories, the agents' random streams, the DQN selection head."""
        self.serving.sync(self.engine, block=True)  # overlap: an update in flight belongs to the checkpoint
        return {
            "learners": self.learners.state_dicts(),
            "buffers": self.buffers.buffers,
            "last_stats": self.serving.stats,
            "dropped": self.buffers.dropped,
            "served": self.serving.served,
            "memory": self.decider.memory.against,
            "rngs": [rng.bit_generator.state for rng in self.rngs],
            "head": self.head,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; the engine is then served every restored adapter."""
        names = self.serving.names
        if sorted(state["learners"]) != sorted(names):
            raise ConfigError(f"checkpoint holds adapters {sorted(state['learners'])}, this group plays {names}")
        self.learners.load_state_dicts(state["learners"])
        self.buffers.buffers, self.buffers.dropped = state["buffers"], int(state["dropped"])
        self.serving.stats = state["last_stats"]
        self.decider.memory.against = np.array(state["memory"], dtype=np.int8)
        for rng, st in zip(self.rngs, state["rngs"], strict=True):
            rng.bit_generator.state = st
        self.head = state["head"]
        self.serving.pending = {}  # updates in flight died with the state they would have changed
        restored = {n: int(v) for n, v in state["served"].items()}
        for name, weights in zip(names, self.learners.export(names), strict=True):
            if restored[name] != self.serving.served[name]:  # v0 is the initialisation, the same in every process
                self.engine.load_adapter(weights, restore=True)
        self.serving.served = restored

    def close(self) -> None:
        """Release the engine (vLLM's engine core) and the actors; called by the driver at the end of a batch."""
        if self._own_engine:
            self.engine.close()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
