"""The shipped hand-written labelled pairs: size, split by prompt, and no trivial surface cue that gives the label."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from scenarios.virtue_rlaif.cue_baseline import (
    HANDWRITTEN,
    LabelledPair,
    baselines,
    keyword_cue,
    length_cue,
    load,
)
from scenarios.virtue_rlaif.pipeline import SHIPPED_PROMPTS

ROWS = [json.loads(line) for line in HANDWRITTEN.read_text().splitlines() if line.strip()]
PROMPTS = {json.loads(line)["id"]: json.loads(line) for line in SHIPPED_PROMPTS.read_text().splitlines()}


def _split(name: str) -> list[dict]:
    return [r for r in ROWS if r["split"] == name]


def test_check_part_is_large_enough_and_covers_both_categories_and_turns():
    check = _split("check")
    assert len(check) >= 150  # a 95% interval of about +-0.07 at accuracy 0.7
    kinds = Counter((r["subset"], r["turn"]) for r in check)
    for kind in [("everyday", "action"), ("everyday", "motivation"), ("dilemma_game", "action"),
                 ("dilemma_game", "motivation")]:
        assert kinds[kind] >= 10, kinds
    train = Counter((r["subset"], r["turn"]) for r in _split("train"))
    assert set(train) == set(kinds), train  # the supervised judge trains on every kind it is checked on


def test_pairs_answer_the_shipped_prompts():
    for r in ROWS:
        p = PROMPTS[r["prompt_id"]]
        assert r["question"] == p["prompt"] and r["subset"] == p["category"], r["id"]
        assert r["good"].strip() != r["bad"].strip(), r["id"]
    assert len({r["id"] for r in ROWS}) == len(ROWS)


def test_train_and_check_share_no_prompt_and_no_reply():
    check, train = _split("check"), _split("train")
    assert {r["prompt_id"] for r in check}.isdisjoint({r["prompt_id"] for r in train})
    assert {r["question"] for r in check}.isdisjoint({r["question"] for r in train})
    replies = lambda rows: {r[k].strip().lower() for r in rows for k in ("good", "bad")}
    assert replies(check).isdisjoint(replies(train))
    # the rule the README states: odd prompt numbers are checked, even ones trained on
    assert all(int(r["prompt_id"].split("-")[1]) % 2 == (r["split"] == "check") for r in ROWS)


def test_a_trivial_cue_does_not_solve_the_check_part():
    data = load([HANDWRITTEN])
    result = baselines(data["train"], data["check"], resamples=500)
    for cue in ("longer", "shorter"):  # the bad reply is not simply the shorter (or the longer) one
        assert 0.35 < result[cue]["accuracy"] < 0.6, (cue, result[cue])
    for cue in ("keywords-5", "keywords-10"):  # a few words picked on the train part carry no label
        assert result[cue]["accuracy"] < 0.6, (cue, result[cue])
    assert result["keywords-10@check"]["accuracy"] < 0.7  # even words picked on the check labels themselves


def test_the_cues_detect_a_planted_cue():
    """The baselines can fail: a set where the good reply is the longer, or the bad one says one word, is solved."""
    rng = np.random.default_rng(0)
    vocab = [f"w{k}" for k in range(40)]
    text = lambda n: " ".join(rng.choice(vocab, n))
    longer = [LabelledPair(text(12), text(6)) for _ in range(60)]
    assert length_cue(longer).mean() == 1.0
    planted = [LabelledPair(text(8), text(4) + " obviously " + text(4)) for _ in range(80)]
    assert keyword_cue(planted[:40], planted[40:], 5).mean() >= 0.95
    assert keyword_cue(planted[:40], planted[40:], None).mean() >= 0.95


@pytest.mark.parametrize("k", [5, None])
def test_keyword_cue_is_symmetric_in_order(k):
    """Swapping good and bad in the check pairs turns every correct verdict into a wrong one (ties stay 0.5)."""
    data = load([HANDWRITTEN])
    check = data["check"][:40]
    swapped = [LabelledPair(p.bad, p.good) for p in check]
    np.testing.assert_allclose(keyword_cue(data["train"], check, k) + keyword_cue(data["train"], swapped, k), 1.0)
