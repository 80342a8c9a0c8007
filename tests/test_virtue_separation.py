"""The VR reward's move separation (actors/llm/virtue/separation.py, scoring.move_separation): exact statistics, the
prompts a VR agent sees, and the measurement's plumbing with a scripted engine and scorer (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.llm.virtue.scoring import move_separation
from actors.llm.virtue.separation import HISTORIES, measure, separation_prompts


def test_move_separation_exact_values():
    sep = move_separation(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 1.0]), resamples=500, seed=3)
    assert (sep.pairs, sep.mean_after_c, sep.mean_after_d) == (3, 2.0, 1.0)
    assert sep.difference.estimate == 1.0 and sep.difference.low <= 1.0 <= sep.difference.high
    assert sep.correlation == pytest.approx(np.corrcoef([1, 2, 3, 0, 2, 1], [1, 1, 1, 0, 0, 0])[0, 1])
    flat = move_separation(np.ones(4), np.ones(4))  # a reward blind to the move
    assert flat.correlation == 0.0 and (flat.difference.low, flat.difference.high) == (0.0, 0.0)
    perfect = move_separation(np.full(5, 0.5), np.full(5, -0.5))
    assert perfect.correlation == pytest.approx(1.0) and perfect.difference.estimate == 1.0
    with pytest.raises(ValueError, match="same length"):
        move_separation(np.ones(3), np.ones(4))


def test_separation_prompts_are_the_vr_agents_game_prompts():
    prompts = separation_prompts(orders=3, seed=1)
    assert len(prompts) == len(HISTORIES) * 3 == 15
    assert [p.history for p in prompts[::3]] == [h for h, _, _ in HISTORIES]
    assert len({p.prompt_id for p in prompts}) == 15
    first, cc = prompts[0].text, prompts[3].text
    assert "first round" in first and "action1" in first and "action2" in first
    assert "Last time, you played action1 and they played action1" in cc
    assert separation_prompts(orders=3, seed=1) == prompts  # seeded


class _Tokenizer:
    """Chat template = the messages' contents joined by '|'; a text's ids = [its index in `texts`]."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "|".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        self.texts.append(text)
        return {"input_ids": [len(self.texts) - 1]}


class _Engine:
    """States 'I am kind.' after a cooperative move (answer action1) and 'I am greedy.' after a defection."""

    eos_ids = (0,)

    def __init__(self) -> None:
        self.tokenizer = _Tokenizer()
        self.requests: list = []

    def generate(self, requests):
        from actors.llm.engine import GenerationResult

        self.requests += requests
        kind = ["|action1|" in self.tokenizer.texts[r.prompt_ids[0]] for r in requests]
        return [GenerationResult((5, 0), (-1.0, -0.1), "I am kind." if k else "I am greedy.", None, -1) for k in kind]


class _Scorer:
    names = ("judge",)

    def score(self, conversations):
        s = np.array([1.0 if "kind" in c[-1]["content"] else -1.0 for c in conversations])
        return s, s[:, None]


def test_measure_pairs_each_prompt_and_sample_across_the_two_moves():
    engine = _Engine()
    prompts = separation_prompts(orders=2)
    rows, summary = measure(engine, {"judge": _Scorer()}, prompts, samples=3, reason_tokens=2, seed=4)
    assert len(rows) == len(engine.requests) == 10 * 2 * 3
    s = summary["judge"]
    assert (s.pairs, s.mean_after_c, s.mean_after_d, s.difference.estimate) == (30, 1.0, -1.0, 2.0)
    assert s.correlation == pytest.approx(1.0)
    assert all(r["reason_cut"] is False for r in rows)  # ended on EOS within the limit
    by_cell = {(r["prompt_id"], r["move"], r["sample"]): req for r, req in zip(rows, engine.requests, strict=True)}
    for p in prompts:  # C and D of one (prompt, sample) share their sampling seed: only the move differs
        for k in range(3):
            c, d = by_cell[(p.prompt_id, "C", k)], by_cell[(p.prompt_id, "D", k)]
            assert c.seed == d.seed and c.adapter is None and c.max_new_tokens == 2 and c.temperature == 1.0
    assert len({req.seed for req in engine.requests}) == 10 * 3
