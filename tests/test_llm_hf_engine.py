"""HFEngine: mixed-adapter batches, weight sync from PPOLearner, stale versions (actors/llm/hf_engine.py).

Tolerances. Weight sync compares the engine's `score` with the learner's `logprobs` on the same unpadded sequence:
both run the same float32 kernels on the same weights, measured difference 0.0; atol 1e-5 leaves room for another
BLAS/thread count while staying far below the change one PPO step makes (> 1e-2 here). Batched generation uses left
padding and peft's mixed-adapter path, so its logprobs match single-sequence `score` only up to float32 summation
order: measured <= 5e-7, checked at atol 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.llm import prompts as P
from actors.llm.engine import GenerationRequest, RolloutEngine, action_probs, check_fresh
from actors.llm.hf_engine import HFEngine
from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
from simulator.contracts import Action
from simulator.errors import StaleAdapterError, UnknownNameError
from simulator.games import GAMES

SYNC_ATOL = 1e-5
BATCH_ATOL = 1e-4
A12 = P.TOKEN_PAIRS["action12"]


def _prompts(tok, n: int, seed: int = 0) -> list[list[int]]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    histories = [(None, None), (Action.C, Action.D), (Action.D, Action.D), (Action.C, Action.C)]
    variants = list(P.PROMPT_VARIANTS)
    return [
        P.game_prompt_ids(tok, GAMES["IPD"], A12, *histories[i % 4], rng, variants[i % len(variants)])
        for i in range(n)
    ]


def _trained_pair(path: Path) -> tuple[PPOLearner, PPOLearner]:
    """Two learners sharing one base, each stepped once with a large lr so their adapters differ."""
    host = PolicyHost(path)
    cfg = PPOConfig(learning_rate=1e-2, batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1, ppo_epochs=1)
    a = PPOLearner(host, "agent-a", cfg)
    b = PPOLearner(host, "agent-b", PPOConfig(**{**cfg.__dict__, "seed": 1}))
    tok = host.tokenizer
    q = _prompts(tok, 2)
    c, d = P.answer_ids(tok, "action1"), P.answer_ids(tok, "action2")
    a.step(q, [c, d], [1.0, 0.0])
    b.step(q, [c, d], [0.0, 1.0])
    return a, b


def test_engine_satisfies_protocol(tiny_model_path: Path) -> None:
    assert isinstance(HFEngine(tiny_model_path), RolloutEngine)


def test_mixed_adapter_batch_matches_single_scoring(tiny_model_path: Path) -> None:
    a, b = _trained_pair(tiny_model_path)
    engine = HFEngine(tiny_model_path, seed=3)
    engine.load_adapter(a.export_adapter())
    engine.load_adapter(b.export_adapter())
    tok = engine.tokenizer
    prompts = _prompts(tok, 6, seed=1)
    adapters = ["agent-a", "agent-b", None, "agent-a", "agent-b", None]
    reqs = [GenerationRequest(tuple(p), ad, max_new_tokens=3) for p, ad in zip(prompts, adapters, strict=True)]
    results = engine.generate(reqs)
    for p, ad, r in zip(prompts, adapters, results, strict=True):
        assert r.adapter == ad and len(r.token_ids) == len(r.logprobs) >= 1
        assert r.adapter_version == (1 if ad else -1)
        single = engine.score(ad, p, r.token_ids)
        np.testing.assert_allclose(r.logprobs, single, atol=BATCH_ATOL, rtol=0)
        learner = {"agent-a": a, "agent-b": b}.get(ad)  # type: ignore[arg-type]
        if learner is not None:
            np.testing.assert_allclose(learner.logprobs(p, r.token_ids), single, atol=SYNC_ATOL, rtol=0)
    # the adapters really differ from each other and from the base
    c = P.answer_ids(tok, "action1")
    s = {ad: np.array(engine.score(ad, prompts[0], c)) for ad in ("agent-a", "agent-b", None)}
    assert np.abs(s["agent-a"] - s["agent-b"]).max() > 1e-3 and np.abs(s["agent-a"] - s[None]).max() > 1e-3


def test_generation_is_seeded_and_greedy_is_argmax(tiny_model_path: Path) -> None:
    e1, e2 = HFEngine(tiny_model_path, seed=7), HFEngine(tiny_model_path, seed=7)
    prompts = _prompts(e1.tokenizer, 3)
    reqs = [GenerationRequest(tuple(p), None, 4) for p in prompts]
    assert e1.generate(reqs) == e2.generate(reqs)
    greedy = e1.generate([GenerationRequest(tuple(prompts[0]), None, 1, temperature=0.0)])[0]
    probs = action_probs(e1, [None], [prompts[0]], greedy.token_ids, [0])  # P(greedy token) vs P(id 0)
    assert probs[0, 0] >= probs[0, 1]
    assert e1.generate([GenerationRequest(tuple(prompts[0]), None, 0)])[0].token_ids == ()


def test_weight_sync_from_learner(tiny_model_path: Path) -> None:
    learner = PPOLearner(tiny_model_path, "agent-0", PPOConfig(learning_rate=5e-3))
    engine = HFEngine(tiny_model_path)
    engine.load_adapter(learner.export_adapter())
    tok = engine.tokenizer
    q = _prompts(tok, 5)
    c, d = P.answer_ids(tok, "action1"), P.answer_ids(tok, "action2")
    probe_p, probe_c = q[1], c
    np.testing.assert_allclose(engine.score("agent-0", probe_p, probe_c), learner.logprobs(probe_p, probe_c),
                               atol=SYNC_ATOL, rtol=0)
    learner.step(q, [c, c, d, d, c], [3.0, 3.0, 0.0, 0.0, 3.0])
    before = np.array(engine.score("agent-0", probe_p, probe_c))
    target = np.array(learner.logprobs(probe_p, probe_c))
    assert np.abs(before - target).max() > 1e-3  # the step changed the policy; the engine still serves v0
    engine.load_adapter(learner.export_adapter())
    assert engine.adapter_version("agent-0") == learner.version == 1
    np.testing.assert_allclose(engine.score("agent-0", probe_p, probe_c), target, atol=SYNC_ATOL, rtol=0)


def test_stale_adapter_detection(tiny_model_path: Path) -> None:
    cfg = PPOConfig(learning_rate=1e-3, batch_size=1, mini_batch_size=1, gradient_accumulation_steps=1, ppo_epochs=1)
    learner = PPOLearner(tiny_model_path, "agent-0", cfg)
    engine = HFEngine(tiny_model_path)
    v0 = learner.export_adapter()
    engine.load_adapter(v0)
    tok = engine.tokenizer
    q = _prompts(tok, 1)
    learner.step(q, [P.answer_ids(tok, "action1")], [1.0])
    stale = engine.generate([GenerationRequest(tuple(q[0]), "agent-0", 1)])
    check_fresh(stale, {"agent-0": 0})
    with pytest.raises(StaleAdapterError, match="version 0, expected >= 1"):
        check_fresh(stale, {"agent-0": learner.version})
    engine.load_adapter(learner.export_adapter())
    check_fresh(engine.generate([GenerationRequest(tuple(q[0]), "agent-0", 1)]), {"agent-0": learner.version})
    with pytest.raises(StaleAdapterError, match="newer than the served v1, got v0"):
        engine.load_adapter(v0)  # a replayed, older sync
    with pytest.raises(UnknownNameError, match="agent-0"):
        engine.generate([GenerationRequest(tuple(q[0]), "agent-9", 1)])
    with pytest.raises(UnknownNameError):
        engine.adapter_version("agent-9")


def test_action_probs(tiny_model_path: Path) -> None:
    engine = HFEngine(tiny_model_path)
    tok = engine.tokenizer
    prompts = _prompts(tok, 2)
    c, d = P.answer_ids(tok, "action1")[:1], P.answer_ids(tok, "action2")[:1]
    p = action_probs(engine, [None, None], prompts, c, d)
    assert p.shape == (2, 2) and (p > 0).all() and (p.sum(1) < 1).all()
    np.testing.assert_allclose(np.log(p[0, 0]), engine.score(None, prompts[0], c)[0], atol=1e-5)


def test_prefix_cache_scoring_equals_one_forward(tiny_model_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Scoring on cached prompt heads (per adapter and version) gives the numbers of one forward of each whole prompt:
    on the first call (heads computed), on a later call (heads reused: only the rests run), with heads of different
    lengths in one call (one adapter's prompts share more than another's), and after a weight sync (the adapter's
    heads are dropped, so the new weights' numbers come out, not the cached old ones)."""
    from actors.llm import hf_engine

    a, b = _trained_pair(tiny_model_path)
    engine = HFEngine(tiny_model_path, seed=3)
    engine.load_adapter(a.export_adapter())
    engine.load_adapter(b.export_adapter())
    tok = engine.tokenizer
    rng = np.random.default_rng(5)
    histories = [(None, None), (Action.C, Action.D), (Action.D, Action.D), (Action.C, Action.C)]
    compact = [P.game_prompt_ids(tok, GAMES["IPD"], A12, *h, rng, "compact") for h in histories]
    structured = [P.game_prompt_ids(tok, GAMES["IPD"], A12, *h, rng) for h in histories]
    c, d = P.answer_ids(tok, "action1"), P.answer_ids(tok, "action2")

    def plain(adapters, prompts, completions):  # type: ignore[no-untyped-def]
        with monkeypatch.context() as m:
            m.setattr(hf_engine, "PREFIX_MIN_TOKENS", 10**9)  # no heads: one left-padded forward per row
            return [engine.score_batch([ad], [p], [co])[0] for ad, p, co in zip(adapters, prompts, completions, strict=True)]

    def check(adapters, prompts, completions) -> None:  # type: ignore[no-untyped-def]
        got = engine.score_batch(adapters, prompts, completions)
        want = plain(adapters, prompts, completions)
        assert [len(g) for g in got] == [len(x) for x in completions]
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=2e-5, rtol=0)

    adapters = ["agent-a", "agent-b", None, "agent-a", "agent-b", "agent-a"]
    prompts = [compact[i % 4] for i in range(6)]
    answers = [c, d, c, d, c, d]
    check(adapters, prompts, answers)  # heads computed
    assert engine.prefixes.misses >= 3 and engine.prefixes.nbytes() > 0
    hits = engine.prefixes.hits
    check(adapters[::-1], [compact[(i + 1) % 4] for i in range(6)], answers)  # heads reused
    assert engine.prefixes.hits >= hits + 3
    mixed = ["agent-a", "agent-a", "agent-b", "agent-b"]
    check(mixed, [structured[0], structured[1], compact[2], compact[3]], [c, d, d, c])  # heads of two lengths
    # a masked answer's rows: one prompt, answers that share all but their last token (one completion forward for
    # both), beside answers with other stems, a one-token answer, and another adapter's row of the same prompt
    rows = [("agent-a", compact[1], c), ("agent-a", compact[1], d), ("agent-a", compact[1], c[:1]),
            ("agent-b", compact[1], c), ("agent-a", compact[1], d[::-1]), ("agent-b", compact[2], d),
            ("agent-b", compact[1], d)]
    check(*(list(x) for x in zip(*rows, strict=True)))
    a.step(structured[:2], [c, d], [0.0, 1.0])  # new weights for agent-a
    before = engine.score("agent-a", compact[1], c)
    engine.load_adapter(a.export_adapter())
    after = engine.score("agent-a", compact[1], c)
    assert abs(after[0] - before[0]) > 1e-4
    np.testing.assert_allclose(after, a.logprobs(compact[1], c), atol=SYNC_ATOL, rtol=0)
    check(adapters, prompts, answers)
