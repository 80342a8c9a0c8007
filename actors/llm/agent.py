"""LLM agents in the population: one `LLMGroup` plays every LLM slot of R stacked runs.

    engine (hf | vllm, one for the group)         learners (one PPOLearner per agent, one shared PolicyHost)
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
picks an agent id from a list of candidates and their last moves; that answer is trained with PPO too, rewarded with
the learning reward of the game it led to, or R_illegal).
Every rollout is checked against the learner's version before use: a stale adapter raises StaleAdapterError.
Moral types that score a stated reason (VR, Game+VR; actors/llm/virtue/dilemma.py): after the move, the agent is
asked for a one-sentence reason (a second generate call through the same engine, its own adapter,
`[llm.virtue] reason_tokens`); the three virtue reward models (loaded once per group) score the conversation, and
weight * ensemble is the decision's Decisions.reward_term, which the engine adds to the type's payoff part. PPO
trains the move answer only, on that reward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from actors.dqn import DQNConfig, DQNGroup
from actors.llm.answers import AnswerTrie, answer_length, sample_masked
from actors.llm.config import LLMAgentConfig, VirtueConfig
from actors.llm.engine import (
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    action_logprobs,
    check_fresh,
    legal_share,
    make_engine,
)
from actors.llm.learners import LearnerGroup, LearnerPool, StepHandle, StepJob, StepResult
from actors.llm.prompts import (
    TokenPair,
    chat_ids,
    game_prompt_text,
    parse_answer,
    parse_partner,
    partner_prompt_text,
    random_token_pair,
    token_pair,
)
from actors.llm.virtue.dilemma import reason_context, scored_conversation
from actors.static import uniform_partner
from simulator.contracts import Action, Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions
from simulator.errors import ConfigError
from simulator.games import Game
from simulator.rewards import R_ILLEGAL, REASON_TYPES
from simulator.seeding import side_stream

log = logging.getLogger(__name__)





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
                       max_lora_rank=config.ppo.lora_r, gpu_memory_utilization=config.actors.gpu_memory_utilization)


def cooperation_probability(
    engine: RolloutEngine, tokenizer: Any, tokens: TokenPair, adapters: list[str | None], prompts: list[list[int]]
) -> np.ndarray:
    """(B,) P(C answer) / (P(C answer) + P(D answer)) per prompt, one scoring call on either engine."""
    c_ids = tokenizer(tokens.c, add_special_tokens=False)["input_ids"]
    d_ids = tokenizer(tokens.d, add_special_tokens=False)["input_ids"]
    lp = action_logprobs(engine, adapters, prompts, c_ids, d_ids)
    return legal_share(lp[:, 0], lp[:, 1])


@dataclass(frozen=True)
class RunAnswers:
    """One run's legal answers: its action-token pair, their trie (mask mode) and the answer length in tokens."""

    tokens: TokenPair
    trie: AnswerTrie | None
    max_new_tokens: int

    @property
    def answers(self) -> tuple[str, str]:
        return (self.tokens.c, self.tokens.d)


@dataclass
class _Sample:
    prompt: list[int]
    response: list[int]
    logprobs: list[float]  # behaviour log pi per response token (masked in mask mode)
    version: int  # adapter version that produced it
    allowed: list[list[int]] | None = None  # mask mode: the allowed tokens per response position


class LLMGroup:
    """All LLM slots of a population for R runs (see module docstring)."""

    learns = True
    states_reasons = True  # the engine may give this group VR / Game+VR slots (simulator.rewards.REASON_TYPES)

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
        """codes: the moral type of each slot (optional); a reason-scoring type (VR) loads the reward models now,
        so a missing folder fails before any game; otherwise they are loaded at the first such decision."""
        from actors.llm.models import resolve_model

        self.slots = np.asarray(slots, dtype=np.int64)
        self.cfg = config
        self._scorer: Any = None  # actors.llm.virtue.dilemma.VirtueScorer, loaded once
        if codes is not None and REASON_TYPES & set(codes):
            self.scorer()  # before the policy: a missing reward-model folder fails first
        self.game = game
        self.R, self.G, self.n_others = len(rngs), len(self.slots), num_agents - 1
        self.same_game = num_agents == 2  # two agents: both last moves are the moves of one game
        # b = run * G + member. Each agent's own stream of its run: learner seed, option order, sampling coins
        self.rngs = [rng for run in rngs for rng in run]
        side = [side_stream(run[0]) for run in rngs]
        run_tokens = [resolve_tokens(config.tokens, s) for s in side]
        seed = int(side[0].integers(2**31))  # the engine's own stream (requests carry their agents' seeds)
        model_dir = model_dir or resolve_model(config.model)
        self.names = [f"run{r}-slot{int(s)}" for r in range(self.R) for s in self.slots]
        specs = [(name, replace(config.ppo, seed=int(rng.integers(2**31))))
                 for rng, name in zip(self.rngs, self.names, strict=True)]
        self.cluster: Any = None  # actors.llm.remote.Cluster when the agents live on Ray actors
        self.learners: LearnerPool
        if config.actors.enabled:
            from transformers import AutoTokenizer

            from actors.llm.remote import launch, learner_group_factory

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.cluster = launch(
                config.actors, self.names, specs,
                lambda names: partial(group_engine, config, model_dir, seed, len(names)),
                learner_group_factory(str(model_dir), config.device), self.tokenizer, config.device,
            )
            self.learners = self.cluster.learners
            self.engine = engine or self.cluster.engine
        else:
            local = LearnerGroup(model_dir, specs, device=config.device)
            self.learners, self.tokenizer = local, local.tokenizer
            self.engine = engine or group_engine(config, model_dir, seed, len(self.names))
        self._own_engine = engine is None  # an engine handed in belongs to the caller, who closes it
        for weights in self.learners.export(self.names):
            self.engine.load_adapter(weights)
        self.batch_size = config.ppo.batch_size
        self.served = [0] * len(self.names)  # adapter version the engine serves per agent (the learners' after sync)
        self.pending: dict[int, StepHandle] = {}  # overlap: the update in flight per agent (at most one)
        self.runs = [self._run_answers(t) for t in run_tokens]
        self.buffers: list[list[tuple[_Sample, float]]] = [[] for _ in self.names]
        self.last_stats: list[dict[str, float]] = [{} for _ in self.names]
        self.dropped = 0  # stale samples discarded (off_policy = "drop")
        self._act_samples: list[_Sample] = []
        self._sel_samples: dict[int, _Sample] = {}
        self._sel_illegal: np.ndarray = np.zeros(0, dtype=bool)
        self.head: DQNGroup | None = None
        if config.selection == "dqn":
            self.head = DQNGroup(self.slots, num_agents, rngs, DQNConfig(learn_dilemma=False))

    def _run_answers(self, tokens: TokenPair) -> RunAnswers:
        answers = (tokens.c, tokens.d)
        trie = AnswerTrie.from_texts(self.tokenizer, answers) if self.cfg.answer_mode == "mask" else None
        return RunAnswers(tokens, trie, self.cfg.max_new_tokens or answer_length(self.tokenizer, answers))

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

    def _state_reasons(
        self, bs: list[int], texts: list[str], answers: list[str], reasoned: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Ask the reasoned decisions why (one generate call), score them; the virtue columns and the reward term."""
        n = len(bs)
        out: dict[str, np.ndarray] = {
            "stated_reason": np.full(n, None, dtype=object),
            "stated_reason_cut": np.full(n, np.nan, dtype=np.float32),
            **{f"virtue_{t}": np.full(n, np.nan, dtype=np.float32) for t in ("action", "motivation", "consequences")},
            "virtue_score": np.full(n, np.nan, dtype=np.float32),
        }
        term = np.full(n, np.nan)
        ks = np.flatnonzero(reasoned).tolist()
        if not ks:
            return out | {"_term": term}
        vc = self.virtue_cfg
        scorer = self.scorer()
        from actors.llm.virtue.dialogue import template_ids

        limit = vc.reason_tokens
        temperature = self.cfg.temperature if vc.temperature is None else vc.temperature
        requests = [
            GenerationRequest(
                tuple(template_ids(self.tokenizer, reason_context(texts[k], answers[k]), add_generation_prompt=True)),
                self.names[bs[k]], limit, temperature, stop_at_eos=True, seed=int(self.rngs[bs[k]].integers(2**63)))
            for k in ks
        ]
        results = self.engine.generate(requests)
        check_fresh(results, {self.names[bs[k]]: self.served[bs[k]] for k in ks})
        eos = set(self.engine.eos_ids)
        reasons = [res.text.strip() for res in results]
        virtue, per_model = scorer.score(
            [scored_conversation(texts[k], answers[k], r) for k, r in zip(ks, reasons, strict=True)])
        for j, (k, res) in enumerate(zip(ks, results, strict=True)):
            ids = res.token_ids
            out["stated_reason"][k] = reasons[j]
            out["stated_reason_cut"][k] = float(len(ids) >= limit and (not ids or ids[-1] not in eos))
            for m, name in enumerate(scorer.names):
                out[f"virtue_{name}"][k] = per_model[j, m]
            out["virtue_score"][k] = virtue[j]
            term[k] = vc.weight * float(np.float32(virtue[j]))  # the recorded (float32) score, so records add up
        return out | {"_term": term}

    # -- engine calls -------------------------------------------------------------------------------------------
    def _generate(self, bs: list[int], prompts: list[list[int]], max_new_tokens: list[int]) -> list[GenerationResult]:
        requests = [
            GenerationRequest(tuple(p), self.names[b], n, self.cfg.temperature,
                              stop_at_eos=self.cfg.stop == "eos", seed=int(self.rngs[b].integers(2**63)))
            for b, p, n in zip(bs, prompts, max_new_tokens, strict=True)
        ]
        results = self.engine.generate(requests)
        check_fresh(results, {self.names[b]: self.served[b] for b in set(bs)})
        return results

    def _masked(self, bs: list[int], prompts: list[list[int]]) -> tuple[list[GenerationResult], np.ndarray]:
        """Mask mode: score both legal answers per prompt (one call), sample each on the trie with the agent's coins.

        Returns the results (as if generated) and P(C)/(P(C)+P(D)) from the same scores.
        """
        tries = [self.runs[b // self.G].trie for b in bs]
        assert all(t is not None for t in tries)
        names = [self.names[b] for b in bs]
        rows_of = [len(t.sequences) for t in tries if t is not None]
        raw = self.engine.score_batch(
            [n for n, t in zip(names, tries, strict=True) if t for _ in t.sequences],
            [p for p, t in zip(prompts, tries, strict=True) if t for _ in t.sequences],
            [list(q) for t in tries if t for q in t.sequences],
        )
        results, p_c = [], np.empty(len(bs))
        start = 0
        for k, (b, name, trie) in enumerate(zip(bs, names, tries, strict=True)):
            assert trie is not None
            seqs = trie.sequences
            rows = raw[start : start + rows_of[k]]
            start += rows_of[k]
            width = max(len(q) for q in seqs)
            pick, logps = sample_masked(trie, rows, self.rngs[b].random(width), self.cfg.temperature)
            p_c[k] = legal_share(float(np.sum(rows[0])), float(np.sum(rows[1])))  # the trie's sequences: (C, D)
            results.append(GenerationResult(seqs[pick], tuple(logps), self.runs[b // self.G].answers[pick], name,
                                            self.engine.adapter_version(name)))
        check_fresh(results, {self.names[b]: self.served[b] for b in set(bs)})
        return results, p_c

    def _p_cooperate(self, bs: list[int], prompts: list[list[int]]) -> np.ndarray:
        if not self.cfg.p_cooperate:
            return np.full(len(bs), np.nan)
        p_c = np.empty(len(bs))
        for tokens in {self.runs[b // self.G].tokens for b in bs}:  # one scoring call per distinct action-token pair
            ks = [k for k, b in enumerate(bs) if self.runs[b // self.G].tokens == tokens]
            p_c[ks] = cooperation_probability(self.engine, self.tokenizer, tokens, [self.names[bs[k]] for k in ks],
                                              [prompts[k] for k in ks])
        return p_c

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
                text = partner_prompt_text(list(zip(ids, last, strict=True)), self.runs[r].tokens, self.rngs[b])
                bs.append(b)
                prompts.append(chat_ids(self.tokenizer, text))
                others.append(ids)
        results = self._generate(bs, prompts, [max(self.runs[b // self.G].max_new_tokens, len(str(self.n_others)))
                                               for b in bs])
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
            self._sel_samples[b] = _Sample(prompt, list(res.token_ids), list(res.logprobs), res.adapter_version)
        return Decisions(choice, reason)

    def act(self, batch: DilemmaBatch) -> Decisions:
        bs = (batch.run * self.G + batch.member).tolist()
        prompts, texts = [], []
        for k, b in enumerate(bs):
            own = None if batch.first else Action(int(batch.own_prev[k]))
            opp = None if batch.first else Action(int(batch.state[k]))
            text = game_prompt_text(self.game, self.runs[b // self.G].tokens, own, opp, self.rngs[b], self.cfg.variant,
                                    self.same_game)
            texts.append(text)
            prompts.append(chat_ids(self.tokenizer, text))
        runs = [self.runs[b // self.G] for b in bs]
        if self.cfg.answer_mode == "mask":
            results, p_c = self._masked(bs, prompts)
            if not self.cfg.p_cooperate:
                p_c[:] = np.nan
        else:
            results = self._generate(bs, prompts, [run.max_new_tokens for run in runs])
            p_c = self._p_cooperate(bs, prompts)
        parsed = [parse_answer(res.text, run.tokens) for res, run in zip(results, runs, strict=True)]
        legal = np.array([p is not None for p in parsed])
        # an illegal answer changes nothing: the agent's move stays its snapshot move (module docstring)
        action = np.array([int(p) if p is not None else int(batch.own_prev[k]) for k, p in enumerate(parsed)],
                          dtype=np.int64)
        reason = np.where(legal, Reason.POLICY, Reason.ILLEGAL).astype(np.int8)
        self._act_samples = [
            _Sample(p, list(res.token_ids), list(res.logprobs), res.adapter_version,
                    None if run.trie is None else run.trie.allowed(res.token_ids))
            for p, res, run in zip(prompts, results, runs, strict=True)
        ]
        stats = [self.last_stats[b] for b in bs]
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
        virtue = self._state_reasons(bs, texts, [res.text for res in results], reasoned)
        term = virtue.pop("_term")
        extra.update(virtue)
        return Decisions(action, reason, extra, term if reasoned.any() else None)

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
        overlap = self.cfg.actors.overlap
        updated = self._sync(block=not overlap)  # overlap: only the updates that finished meanwhile
        jobs: list[StepJob] = []
        for b in range(len(self.names)):
            if self.cfg.off_policy == "drop":
                trained = self.served[b] + (b in self.pending)  # the learner's version once its update lands
                fresh = [(smp, r) for smp, r in self.buffers[b] if smp.version >= trained]
                self.dropped += len(self.buffers[b]) - len(fresh)
                self.buffers[b] = fresh
            n = self.batch_size
            while len(self.buffers[b]) >= n:
                chunk, self.buffers[b] = self.buffers[b][:n], self.buffers[b][n:]
                jobs.append(StepJob(
                    self.names[b], [s.prompt for s, _ in chunk], [s.response for s, _ in chunk], [r for _, r in chunk],
                    behaviour_logprobs=[s.logprobs for s, _ in chunk], versions=[s.version for s, _ in chunk],
                    allowed=None if self.cfg.answer_mode != "mask" else [s.allowed for s, _ in chunk],
                ))
        index = {name: b for b, name in enumerate(self.names)}
        if overlap:
            for job in jobs:  # at most one update in flight per agent: rollouts are at most one version behind
                b = index[job.name]
                if b in self.pending:
                    updated += self.land(b, self.pending.pop(b).result())
                (self.pending[b],) = self.learners.submit([job])
        elif jobs:
            for job, handle in zip(jobs, self.learners.submit(jobs), strict=True):  # learner actors run in parallel
                updated += self.land(index[job.name], handle.result())
        out: dict[str, float] = {"ppo_updates": float(len(updated)), "stale_dropped": float(self.dropped)}
        if updated:  # the mean over this iteration's updates, for live tracking (Parquet keeps per-agent values)
            for key in ("kl", "kl_coef", "policy_loss", "value_loss", "entropy", "mean_score", "stale_samples"):
                out[key] = float(np.mean([st[key] for st in updated]))
        return out

    def land(self, b: int, result: StepResult) -> list[dict[str, float]]:
        """Agent b's update finished: keep its statistics and sync its adapter to the engine (the next rollout uses
        it). Called by learn() and the checkpoint; public for tools that drive the learners directly (benchmarks)."""
        self.last_stats[b] = result.stats
        self.engine.load_adapter(result.weights)
        self.served[b] = result.version
        return [result.stats]

    def _sync(self, block: bool) -> list[dict[str, float]]:
        """Land the updates in flight: all of them (block), or those that finished."""
        out: list[dict[str, float]] = []
        for b in sorted(self.pending):
            if block or self.pending[b].done():
                out += self.land(b, self.pending.pop(b).result())
        return out

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None

    def save(self, run_dirs: list[Path]) -> None:
        """Each agent's final adapter as a peft folder: <run dir>/adapters/slot<k>/ (PeftModel.from_pretrained reads it)."""
        from actors.llm.weight_sync import adapter_to_peft_dir, fetch

        self._sync(block=True)  # overlap: the last updates belong to the run
        for b, weights in enumerate(self.learners.export(self.names)):
            r, g = divmod(b, self.G)
            adapter_to_peft_dir(fetch(weights), Path(run_dirs[r]) / "adapters" / f"slot{int(self.slots[g])}")

    # -- checkpoint (simulator.contracts.Checkpointable) -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The group's whole learning state at an iteration boundary: learners (adapters, value heads, Adam, KL,
        score moments, RNGs), sample buffers, the agents' random streams, the DQN selection head."""
        self._sync(block=True)  # overlap: an update in flight belongs to the checkpoint
        return {
            "learners": self.learners.state_dicts(),
            "buffers": self.buffers,
            "last_stats": self.last_stats,
            "dropped": self.dropped,
            "served": self.served,
            "rngs": [rng.bit_generator.state for rng in self.rngs],
            "head": self.head,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; the engine is then served every restored adapter."""
        if sorted(state["learners"]) != sorted(self.names):
            raise ConfigError(f"checkpoint holds agents {sorted(state['learners'])}, this group plays {self.names}")
        self.learners.load_state_dicts(state["learners"])
        self.buffers, self.last_stats, self.dropped = state["buffers"], state["last_stats"], int(state["dropped"])
        for rng, st in zip(self.rngs, state["rngs"], strict=True):
            rng.bit_generator.state = st
        self.head = state["head"]
        self.pending = {}  # updates in flight died with the state they would have changed
        restored = [int(v) for v in state["served"]]
        for b, weights in enumerate(self.learners.export(self.names)):
            if restored[b] != self.served[b]:  # v0 is the initialisation, the same in every process
                self.engine.load_adapter(weights, restore=True)
        self.served = restored

    def close(self) -> None:
        """Release the engine (vLLM's engine core) and the actors; called by the driver at the end of a batch."""
        if self._own_engine:
            self.engine.close()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
