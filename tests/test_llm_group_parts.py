"""The three parts of an LLM group, without a model: Decider (prompts, partner memory, answers), SampleBuffers (PPO
batches per adapter) and Serving (agent -> adapter, versions, sync). A fake tokenizer: one token per character."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from actors.llm.config import LLMAgentConfig
from actors.llm.deciding import Decider, PartnerMemory, masked_picks, masked_rows
from actors.llm.learners import DoneStep, StepResult
from actors.llm.learning import Sample, SampleBuffers
from actors.llm.prompts import TOKEN_PAIRS, TokenPair
from actors.llm.serving import Serving
from simulator.contracts import Action, DilemmaBatch, SelectionBatch
from simulator.games import GAMES

A12 = TOKEN_PAIRS["action12"]


class CharTokenizer:
    """Each character is a token (its code point); the chat template is the bare text."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):  # type: ignore[no-untyped-def]
        return messages[0]["content"]


def decider(n: int = 12, mode: str = "mask", runs: int = 1) -> Decider:
    cfg = LLMAgentConfig(selection="prompt", answer_mode=mode)
    return Decider(CharTokenizer(), GAMES["IPD"], cfg, [0, 5, 11], n, [A12] * runs)


def test_partner_memory_keeps_each_pairs_last_move_against_each_agent():
    mem = PartnerMemory(agents=2, num_agents=4)
    assert mem.get(0, 3) is None
    mem.remember([0, 0, 1], [3, 3, 2], [1, 0, 1])  # games in play order: the later game of the pair wins
    assert mem.get(0, 3) == Action.C and mem.get(1, 2) == Action.D and mem.get(1, 3) is None


def test_selection_prompts_tell_what_each_agent_knows_and_mask_to_candidate_ids():
    d = decider()
    d.memory.remember([1], [0], [1])  # agent 0 defected against member 1 (slot 5) when they last met
    state = np.zeros((1, 3, 11), dtype=np.int8)
    state[0, 1, 0] = 1  # slot 0's most recent move, as member 1 sees the others
    prompts = d.selection_prompts(SelectionBatch(3, state, np.zeros((1, 3, 2))), [np.random.default_rng(k)
                                                                                 for k in range(3)])
    text = "".join(map(chr, prompts[1]))
    assert "agent 00: last played action2, played action2 against you" in text
    assert "agent 11: last played action1, never met you" in text and "agent 05:" not in text  # not itself
    assert "| action1 | 3, 3 | 0, 4 |" in text  # the game's own payoff table
    trie = d.partner_trie(1)
    assert len(trie.sequences) == 11 and d.partner_answers(1)[0] == "00"
    assert d.partner_choice(1, "06") == d.others(1).index(6) and d.partner_choice(1, "6") is None
    assert d.partner_choice(1, "05") is None  # itself is no candidate


def test_game_prompts_carry_the_opponents_move_against_this_agent():
    d = decider(n=4)
    d.memory.remember([0], [1], [0])
    batch = DilemmaBatch(2, np.array([0, 0]), np.array([0, 0]), np.array([1, 2]), np.array([1, 0], np.int8),
                         np.array([0, 0], np.int8), np.zeros((2, 2)))
    bs, texts, prompts = d.game_prompts(batch, [np.random.default_rng(0)] * 3)
    assert bs == [0, 0] and "".join(map(chr, prompts[0])) == texts[0]
    assert "this opponent played action1 against you" in texts[0]
    assert "You have not played this opponent before" in texts[1]


def test_masked_picks_sample_each_decision_on_its_own_trie():
    d = decider()
    tries = [d.partner_trie(0), d.runs[0].trie]
    assert tries[1] is not None
    rows = masked_rows(tries)  # type: ignore[arg-type]
    assert rows == [11, 2]
    raw = [[-1.0, -1.0]] * 11 + [[-0.1] * 7, [-3.0] * 7]
    picks = masked_picks(tries, raw, [np.zeros(2), np.zeros(7)], temperature=1.0)  # type: ignore[arg-type]
    assert picks[0][0] == 0 and picks[1][0] == 0  # coins 0: the first branch
    assert np.exp(sum(picks[1][1])) == pytest.approx(1 / (1 + np.exp(-2.9 * 1)), rel=1e-6)


def _sample(version: int, mask: bool = False) -> Sample:
    return Sample([1, 2], [3], [-0.5], version, [[3, 4]] if mask else None)


def test_sample_buffers_cut_batches_per_adapter_and_drop_stale_samples():
    buf = SampleBuffers(["a", "b"], batch_size=2)
    for k in range(5):
        buf.add("a" if k < 3 else "b", _sample(0, mask=k == 1), float(k))
    jobs = buf.jobs(lambda name: 0)
    assert [(j.name, j.scores) for j in jobs] == [("a", [0.0, 1.0]), ("b", [3.0, 4.0])]
    assert jobs[0].allowed == [None, [[3, 4]]] and jobs[1].allowed is None
    assert len(buf.buffers["a"]) == 1
    drop = SampleBuffers(["a"], batch_size=2, off_policy="drop")
    for v in (0, 1, 1):
        drop.add("a", _sample(v), 1.0)
    assert [j.versions for j in drop.jobs(lambda name: 1)] == [[1, 1]] and drop.dropped == 1


def test_serving_lands_updates_per_adapter():
    serving = Serving(["run0-type-UT", "run0-type-DE", "run0-type-UT"])
    loaded: list[tuple[str, int]] = []
    engine = SimpleNamespace(load_adapter=lambda w: loaded.append((w.name, w.version)))
    weights = SimpleNamespace(name="run0-type-UT", version=1)
    serving.pending["run0-type-UT"] = DoneStep("run0-type-UT", StepResult("run0-type-UT", {"kl": 0.1}, 1, weights))
    assert serving.trained_version("run0-type-UT") == 1 and serving.expected([0, 1]) == {"run0-type-UT": 0,
                                                                                          "run0-type-DE": 0}
    assert serving.sync(engine, block=False) == [{"kl": 0.1}]
    assert loaded == [("run0-type-UT", 1)] and serving.served == {"run0-type-UT": 1, "run0-type-DE": 0}
    assert serving.stats["run0-type-UT"] == {"kl": 0.1} and serving.expected([2]) == {"run0-type-UT": 1}


class TableEngine:
    """A fake RolloutEngine: log pi of a completion is looked up by its first token (one per character), the same
    whatever the prompt; it records every call and serves a version per adapter."""

    eos_ids = (0,)

    def __init__(self, logp: dict[str, float]) -> None:
        self.logp = {ord(k): v for k, v in logp.items()}
        self.versions: dict[str, int] = {}
        self.calls: list[tuple[str, Any]] = []

    def adapter_version(self, name: str) -> int:
        return self.versions.get(name, 0)

    def score_batch(self, adapters, prompts, completions):  # type: ignore[no-untyped-def]
        self.calls.append(("score", list(adapters)))
        return [[self.logp.get(c[0], -5.0)] + [0.0] * (len(c) - 1) for c in completions]

    def generate(self, requests):  # type: ignore[no-untyped-def]
        from actors.llm.engine import GenerationResult

        self.calls.append(("generate", [(r.adapter, r.seed) for r in requests]))
        return [GenerationResult((ord("x"),), (-1.0,), "x", r.adapter, self.adapter_version(r.adapter)) for r in requests]


def rollouts(engine: TableEngine, serving: Serving, seed: int = 0) -> Any:
    from contextlib import nullcontext

    from actors.llm.rollouts import Rollouts

    rngs = [np.random.default_rng(seed + b) for b in range(len(serving.adapter_of))]
    return Rollouts(engine, CharTokenizer(), serving, rngs, 1.0, True, lambda phase: nullcontext())


def test_rollouts_sample_masked_answers_with_each_agents_coins_and_refuse_stale_results():
    from actors.llm.answers import AnswerTrie
    from simulator.errors import StaleAdapterError

    tok = CharTokenizer()
    trie = AnswerTrie.from_texts(tok, ("C", "D"))
    serving = Serving(["a", "b", "a"])
    engine = TableEngine({"C": np.log(0.9), "D": np.log(0.1)})  # masked policy: P(C) = 0.9 for everyone
    ro = rollouts(engine, serving)
    picks = []
    for _ in range(200):
        results, scores = ro.masked([0, 1, 2], [[1, 2]] * 3, [trie] * 3, [("C", "D")] * 3)
        assert [r.adapter for r in results] == ["a", "b", "a"]
        picks.append([r.text for r in results])
        assert scores[0] == [[pytest.approx(np.log(0.9))], [pytest.approx(np.log(0.1))]]
    share_c = np.mean(np.array(picks) == "C")
    assert 0.85 < share_c < 0.95  # 600 draws of P(C) = 0.9
    assert engine.calls[0] == ("score", ["a", "a", "b", "b", "a", "a"])  # one call, every legal answer of every agent
    # agent 1's draws come from its own stream: the same coins whatever the other agents decide
    again = rollouts(TableEngine({"C": np.log(0.9), "D": np.log(0.1)}), Serving(["a", "b", "a"]))
    alone = [again.masked([1], [[1, 2]], [trie], [("C", "D")])[0][0].text for _ in range(200)]
    assert alone == [p[1] for p in picks]
    serving.served["a"] = 3  # the learner moved on; the engine still serves v0
    with pytest.raises(StaleAdapterError):
        ro.masked([0], [[1, 2]], [trie], [("C", "D")])


def test_rollouts_free_answers_carry_each_agents_adapter_and_seed_and_p_cooperate_groups_token_pairs():
    serving = Serving(["a", "b"])
    engine = TableEngine({"C": np.log(0.75), "D": np.log(0.25), "K": np.log(0.2), "L": np.log(0.2)})
    ro = rollouts(engine, serving, seed=7)
    ro.generate([0, 1], [[1], [2]], [3, 3])
    seeds = [int(np.random.default_rng(7 + b).integers(2**63)) for b in (0, 1)]
    assert engine.calls[-1] == ("generate", [("a", seeds[0]), ("b", seeds[1])])
    pair_of = {0: TokenPair("CD", "C", "D"), 1: TokenPair("KL", "K", "L")}
    p_c = ro.p_cooperate([0, 1, 0], [[1], [2], [3]], lambda b: pair_of[b])
    np.testing.assert_allclose(p_c, [0.75, 0.5, 0.75])
    assert sum(1 for kind, _ in engine.calls if kind == "score") == 2  # one scoring call per token pair
