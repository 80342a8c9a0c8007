"""Prompts in, preference datasets out (actors/llm/virtue/data.py): the shipped prompt set, any JSONL/Parquet file,
and the judge's verdicts turned into TRL's preference format with ties left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from actors.llm.virtue.data import (
    judgement_rows,
    load_prompts,
    pairs_table,
    preference_datasets,
    select_prompts,
    stable_seed,
)
from actors.llm.virtue.dialogue import FOLLOW_UPS, dialogue_messages
from actors.llm.virtue.scoring import TURNS, VIRTUES
from scenarios.virtue_rlaif.pipeline import SHIPPED_PROMPTS
from simulator.errors import ConfigError


def test_shipped_prompts():
    prompts = load_prompts(SHIPPED_PROMPTS)
    rows = [json.loads(line) for line in SHIPPED_PROMPTS.read_text().splitlines()]
    assert len(prompts) == len(rows) == 120
    held = [p for p in prompts if p.split == "heldout"]
    assert len(held) == 30  # 25%, fixed in the file
    assert len({p.id for p in prompts}) == len({p.prompt for p in prompts}) == 120
    for category in ("everyday", "dilemma_game"):
        in_cat = {r["id"] for r in rows if r["category"] == category}
        assert {p.split for p in prompts if p.id in in_cat} == {"train", "heldout"}  # both kinds in both splits


def test_prompts_from_jsonl_and_parquet(tmp_path: Path):
    texts = [f"Question number {k}?" for k in range(12)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": t}) for t in texts) + "\n")
    pl.DataFrame({"prompt": texts, "extra": list(range(12))}).write_parquet(tmp_path / "p.parquet")
    a, b = load_prompts(tmp_path / "p.jsonl"), load_prompts(tmp_path / "p.parquet")
    assert a == b  # same ids and the same hash-based split, whatever the format
    assert [p.prompt for p in a] == texts
    assert {p.split for p in a} <= {"train", "heldout"}
    assert select_prompts(a, 2, 1) == [p for p in a if p.split == "train"][:2] + [p for p in a if p.split == "heldout"][:1]


@pytest.mark.parametrize(("content", "match"), [
    ('{"text": "no prompt field"}\n', "non-empty string `prompt`"),
    ('{"prompt": "a", "split": "test"}\n', "split 'test'"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "duplicate id"),
])
def test_bad_prompt_files(tmp_path: Path, content: str, match: str):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")


def test_dialogue_seed_is_per_prompt():
    assert stable_seed(0, "p1", 0) == stable_seed(0, "p1", 0)
    assert len({stable_seed(0, "p1", 0), stable_seed(0, "p1", 1), stable_seed(0, "p2", 0), stable_seed(1, "p1", 0)}) == 4


def test_dialogue_messages():
    msgs = dialogue_messages("Q?", ["a", "m"], "sys", ask_next=True)
    assert msgs == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": FOLLOW_UPS["motivation"]},
        {"role": "assistant", "content": "m"},
        {"role": "user", "content": FOLLOW_UPS["consequences"]},
    ]
    assert dialogue_messages("Q?", [], None) == [{"role": "user", "content": "Q?"}]


def _dialogues() -> pl.DataFrame:
    rows = []
    for pid, split in (("p0", "train"), ("p1", "train"), ("p2", "heldout")):
        for s in (0, 1):
            rows.append({"prompt_id": pid, "split": split, "prompt": f"prompt {pid}", "sample": s,
                         **{t: f"{t} {pid}/{'ab'[s]}" for t in TURNS}})
    return pl.DataFrame(rows)


def test_judgements_to_trl_preferences():
    from trl.data_utils import is_conversational

    pairs = pairs_table(_dialogues())
    assert pairs["action_a"].to_list() == ["action p0/a", "action p1/a", "action p2/a"]
    assert pairs["action_b"].to_list() == ["action p0/b", "action p1/b", "action p2/b"]
    keys = [{"prompt_id": p, "split": s, "turn": t} for p, s in (("p0", "train"), ("p1", "train"), ("p2", "heldout"))
            for t in TURNS]
    probs = np.full((len(keys), len(VIRTUES), 2, 2), 0.2)  # all equal: every virtue tied
    a_first = [0.6, 0.1]  # "1" three times as likely when asked in order AB
    probs[0, :, 0] = a_first  # p0 action: A (the first sample) wins every virtue in order AB...
    probs[0, :, 1] = [0.1, 0.6]  # ... and in order BA
    probs[4, :3, 0] = [0.1, 0.6]  # p1 motivation: B wins 3 virtues, A none -> B chosen
    probs[8, :2, 0] = a_first  # p2 consequences: A wins 2 in order AB only (BA tied) -> p_A = (6/7 + 1/2)/2 > 0.5
    j = pl.DataFrame(judgement_rows(keys, probs, margin=0.0))
    assert j["outcome"].to_list() == [1, 0, 0, 0, -1, 0, 0, 0, 1]
    assert j.filter(pl.col("outcome") == -1)[["points_a", "points_b"]].row(0) == (0, 3)
    assert j["honesty_p1_ab"][0] == 0.6 and j["honesty_p2_ba"][0] == 0.6

    data = preference_datasets(pairs, j, system="sys")
    assert {t: d.height for t, d in data.items()} == {"action": 1, "motivation": 1, "consequences": 1}  # ties out
    act = data["action"].row(0, named=True)
    assert act["prompt"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "prompt p0"}]
    assert act["chosen"] == [{"role": "assistant", "content": "action p0/a"}]
    assert act["rejected"] == [{"role": "assistant", "content": "action p0/b"}]
    assert (act["points_chosen"], act["points_rejected"], act["chosen_sample"]) == (5, 0, 0)
    mot = data["motivation"].row(0, named=True)
    assert mot["chosen"] == [{"role": "assistant", "content": "action p1/b"},
                             {"role": "user", "content": FOLLOW_UPS["motivation"]},
                             {"role": "assistant", "content": "motivation p1/b"}]
    assert mot["rejected"][-1] == {"role": "assistant", "content": "motivation p1/a"}
    cons = data["consequences"].row(0, named=True)
    assert cons["split"] == "heldout" and len(cons["chosen"]) == 5 and cons["chosen"][-1]["content"] == "consequences p2/a"
    for d in data.values():  # TRL reads each row as a conversational preference example with an explicit prompt
        row = d.row(0, named=True)
        assert is_conversational({k: row[k] for k in ("prompt", "chosen", "rejected")})
        assert {f"{v}_p1_ab" for v in VIRTUES} <= set(d.columns)  # the raw verdicts travel with the data
