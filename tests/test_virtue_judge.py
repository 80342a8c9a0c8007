"""Curation dialogues and the AI judge on a tiny random model: the three turns through the engine, truncation flags,
seeds independent of batching, the judge's label probabilities in both orders, and the engine's shared-prompt
scoring path against one row at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.llm.virtue.data import judgement_rows
from actors.llm.virtue.dialogue import FOLLOW_UPS, run_dialogues, template_ids
from actors.llm.virtue.judge import JUDGE_SYSTEM, LABELS, Pair, judge_pairs, judge_text, verdict_completion
from actors.llm.virtue.scoring import TURNS, VIRTUES
from tests.helpers import need
from tests.llm_fixtures import lora_weights, random_lora_model


@pytest.fixture(scope="module")
def engine(tiny_model_path: Path):
    need("transformers")
    from actors.llm.hf_engine import HFEngine

    return HFEngine(tiny_model_path, seed=0)


@pytest.mark.parametrize("kv_budget", [8192, 16])  # one group; a group per prompt
def test_shared_prompt_scoring_equals_row_by_row(engine, tiny_model_path: Path, monkeypatch, kv_budget: int):
    from actors.llm import hf_engine

    monkeypatch.setattr(hf_engine, "SHARED_KV_TOKENS", kv_budget)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in (5, 11, 8)]
    completions = [rng.integers(3, 300, size=n).tolist() for n in (1, 3, 2, 4, 1, 2, 3)]
    rows = [prompts[k % 3] for k in range(7)]
    name = f"judge-a-{kv_budget}"  # the module's engine serves each parametrisation's adapter at version 1
    engine.load_adapter(lora_weights(random_lora_model(tiny_model_path, seed=1), name, 1))
    for adapters in ([None] * 7, [name, None, name, None, None, name, name]):
        shared = engine.score_batch(adapters, rows, completions)  # prompts repeat: the shared path
        alone = [engine.score_batch([a], [p], [c])[0] for a, p, c in zip(adapters, rows, completions, strict=True)]
        assert [len(s) for s in shared] == [len(c) for c in completions]
        np.testing.assert_allclose(np.concatenate(shared), np.concatenate(alone), atol=2e-5)


def test_dialogues_three_turns(engine):
    prompts = ["Should I return a lost wallet?", "Is it fine to lie to a friend?"]
    limit = (3, 200, 4)
    ds = run_dialogues(engine, prompts, [11, 12], limit, temperature=1.0, system="Be brief.")
    eos = set(engine.eos_ids)
    for d, p in zip(ds, prompts, strict=True):
        assert d.prompt == p and len(d.turns) == 3
        for turn, n in zip(d.turns, limit, strict=True):
            assert 1 <= len(turn.token_ids) <= n
            ended = turn.token_ids[-1] in eos
            assert turn.truncated == (len(turn.token_ids) == n and not ended)
        assert d.turns[0].truncated  # 3 tokens of a random model: cut off unless it drew EOS at once
        # turn 2 continues the chat: the prompt, the first answer, the follow-up question
        context = [*d.messages(0, "Be brief."), {"role": "user", "content": FOLLOW_UPS["motivation"]}]
        expected = template_ids(engine.tokenizer, context, add_generation_prompt=True)
        assert list(d.turns[1].query_ids) == expected
    # a dialogue depends on its seed only, not on the batch around it
    alone = run_dialogues(engine, prompts[1:], [12], limit, temperature=1.0, system="Be brief.")
    assert alone[0] == ds[1]
    other = run_dialogues(engine, prompts[1:], [13], limit, temperature=1.0, system="Be brief.")
    assert other[0].turns != ds[1].turns


def test_judge_prompt_and_labels(engine):
    text = judge_text("Q?", "motivation", "first answer", "second answer")
    assert "Answer 1: first answer" in text and "Answer 2: second answer" in text
    assert FOLLOW_UPS["motivation"] in text and all(v in text for v in VIRTUES)
    assert verdict_completion("honesty", "2") == "Honesty: 2"
    ids = [engine.tokenizer(verdict_completion("humility", lab), add_special_tokens=False)["input_ids"] for lab in LABELS]
    assert ids[0][:-1] == ids[1][:-1] and ids[0][-1] != ids[1][-1]  # the two completions differ in the label only


def test_judge_scores_both_orders(engine):
    pairs = [Pair("Q1?", "action", "yes, and here is why", "no"), Pair("Q2?", "consequences", "it builds trust", "")]
    probs = judge_pairs(engine, pairs)
    assert probs.shape == (2, len(VIRTUES), 2, 2)
    assert ((probs > 0) & (probs < 1)).all()
    # the numbers are exp(sum log pi) of each (prompt, completion), row by row
    tok = engine.tokenizer
    prompt_ba = template_ids(tok, [{"role": "system", "content": JUDGE_SYSTEM},
                                   {"role": "user", "content": judge_text("Q2?", "consequences", "", "it builds trust")}],
                             add_generation_prompt=True)
    comp = tok(verdict_completion("compassion", "1"), add_special_tokens=False)["input_ids"]
    assert probs[1, VIRTUES.index("compassion"), 1, 0] == pytest.approx(np.exp(sum(engine.score(None, prompt_ba, comp))),
                                                                       rel=1e-4)
    # swapping A and B swaps the orders exactly, so P(A better) becomes 1 - P(A better)
    swapped = judge_pairs(engine, [Pair(p.question, p.turn, p.second, p.first) for p in pairs])
    np.testing.assert_allclose(swapped, probs[:, :, ::-1, :], rtol=1e-4)
    keys = [{"prompt_id": f"p{k}", "split": "train", "turn": p.turn} for k, p in enumerate(pairs)]
    p_a = np.array([[r[f"{v}_p_a"] for v in VIRTUES] for r in judgement_rows(keys, probs, 0.0)])
    p_a_swapped = np.array([[r[f"{v}_p_a"] for v in VIRTUES] for r in judgement_rows(keys, swapped, 0.0)])
    np.testing.assert_allclose(p_a + p_a_swapped, 1.0, atol=1e-4)
    assert set(TURNS) >= {p.turn for p in pairs}
