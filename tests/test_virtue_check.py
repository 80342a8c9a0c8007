"""The judge's check on labelled pairs: the metrics on scripted verdicts (an always-first judge scores 0.5 with
consistency 0; an oracle 1.0; an inverted one 0.0), the judge-check stage through the judge's own code with scripted
engines in every mode (position handling included), pointwise scores mirrored by construction, the shipped labelled
sets, and prompt selection by category."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from actors.llm.virtue.data import load_labelled, load_prompts, select_prompts
from actors.llm.virtue.judge import JUDGE_MODES, Pair, judge_pairs
from actors.llm.virtue.scoring import VIRTUES, check_metrics, label_share
from scenarios.virtue_rlaif import pipeline
from scenarios.virtue_rlaif.pipeline import LABELLED_DIR, SHIPPED_LABELLED, SHIPPED_PROMPTS, Layout, PipelineConfig
from simulator.errors import ConfigError
from tests.helpers import need

N, V = 40, len(VIRTUES)


def _full(value: float) -> np.ndarray:
    return np.full((N, V), value)


def test_always_first_judge_scores_one_half_with_no_consistency():
    # P(first shown is better) = 0.9 in both orders: every averaged verdict is a tie
    for rule in ("average", "agree"):
        m = check_metrics(_full(0.9), _full(0.9), rule=rule, resamples=500)
        assert m.accuracy.estimate == 0.5 and m.ties == N
        assert m.consistency == 0.0 and m.consistent_pairs == 0 and np.isnan(m.consistent_accuracy)
        assert m.virtue_consistency == 0.0
    second = check_metrics(_full(0.2), _full(0.2))
    assert second.accuracy.estimate == 0.5 and second.consistency == 0.0


def test_oracle_and_inverted_judges():
    right = check_metrics(_full(0.8), _full(0.3), resamples=500)  # good shown first: 0.8; good shown second: 0.3
    assert right.accuracy.estimate == 1.0 and (right.accuracy.low, right.accuracy.high) == (1.0, 1.0)
    assert right.consistency == 1.0 and right.consistent_accuracy == 1.0 and right.ties == 0
    wrong = check_metrics(_full(0.3), _full(0.8))
    assert wrong.accuracy.estimate == 0.0 and wrong.consistency == 1.0 and wrong.consistent_accuracy == 0.0


def test_mixed_judge_counts_each_kind_of_pair():
    # 10 right in both orders, 10 wrong in both, 20 position-biased but leaning to the good answer on average
    p_ab = np.concatenate([_full(0.8)[:10], _full(0.3)[:10], _full(0.95)[:20]])
    p_ba = np.concatenate([_full(0.3)[:10], _full(0.8)[:10], _full(0.6)[:20]])
    avg = check_metrics(p_ab, p_ba, resamples=2000, seed=1)
    assert avg.accuracy.estimate == pytest.approx(30 / 40)  # the averaged verdict credits the biased 20
    assert avg.consistency == 0.5 and avg.consistent_pairs == 20 and avg.consistent_accuracy == 0.5
    assert avg.accuracy.low < 0.75 < avg.accuracy.high and avg.accuracy.high - avg.accuracy.low < 0.4
    agree = check_metrics(p_ab, p_ba, rule="agree")
    assert agree.accuracy.estimate == pytest.approx((10 + 0.5 * 20) / 40) and agree.ties == 20


class ScriptedEngine:
    """Answers every label query by rule: "first" always prefers position 1 (and says yes to everything);
    "oracle" knows which answer is the labelled good one, wherever it is shown."""

    def __init__(self, tokenizer, picks: str, good: set[tuple[str, str]]) -> None:
        self.tokenizer, self.picks, self.good = tokenizer, picks, good

    def _prefers(self, prompt: str, label: str) -> bool:
        if self.picks == "first":
            return label in ("1", "yes")
        question = prompt.split("Question: ", 1)[1].split("\n\n", 1)[0]
        if "Answer 1: " in prompt:
            first = prompt.split("Answer 1: ", 1)[1].split("\n\nAnswer 2: ", 1)[0]
            return ((question, first) in self.good) == (label == "1")
        answer = prompt.split("Answer: ", 1)[1].split("\n\n", 1)[0]
        return ((question, answer) in self.good) == (label == "yes")

    def score_batch(self, adapters, prompts, completions):
        out, texts = [], {}
        for p, c in zip(prompts, completions, strict=True):
            label = self.tokenizer.decode(c).strip().split()[-1]
            text = texts.setdefault(tuple(p), self.tokenizer.decode(p))  # rows repeat their prompt
            out.append([0.0] * (len(c) - 1) + [-0.1 if self._prefers(text, label) else -3.0])
        return out

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path):
    need("transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.mark.parametrize("mode", ["compare", "per-virtue", "pointwise"])
@pytest.mark.parametrize("picks", ["first", "oracle"])
def test_judge_check_stage_with_scripted_judges(mode, picks, tokenizer, tiny_model_path, tmp_path, monkeypatch):
    labelled = load_labelled(SHIPPED_LABELLED)
    good = set(zip(labelled["question"], labelled["good"], strict=True))
    monkeypatch.setattr(pipeline, "_engine", lambda cfg, model_dir, seed: ScriptedEngine(tokenizer, picks, good))
    cfg = PipelineConfig(output=tmp_path, model=str(tiny_model_path), judge_mode=mode, check_max_pairs=6,
                         bootstrap=300, chunk=5)
    result = pipeline.judge_check(cfg, Layout.of(cfg))
    assert set(result["sets"]) == {"ethics", "handwritten"} and result["pairs"] == 24  # 6 of each of 4 subsets
    assert result["other_rule"]["rule"] == "agree"
    for m in result["sets"].values():
        assert m["pairs"] == 12 and set(m["subsets"]) in ({"commonsense", "virtue"}, {"everyday", "dilemma_game"})
        if picks == "oracle":
            assert (m["accuracy"], m["consistency"], m["consistent_accuracy"]) == (1.0, 1.0, 1.0)
        elif mode == "pointwise":  # says yes to both answers: a tie, but never a position bias
            assert m["accuracy"] == 0.5 and m["ties"] == 12 and m["consistency"] == 0.0
        else:
            assert m["accuracy"] == 0.5 and m["consistency"] == 0.0 and m["virtue_consistency"] == 0.0
    assert result["passes"] == (picks == "oracle")
    on_disk = json.loads(Layout.of(cfg).judge_check.read_text())
    assert on_disk["sets"] == result["sets"]
    assert "NaN" not in Layout.of(cfg).judge_check.read_text()  # strict JSON: no consistent pair gives null
    assert pl.read_parquet(Layout.of(cfg).judge_check_rows).height == 24
    from scenarios.virtue_rlaif.judge_table import rescored, rows

    again = rescored(Layout.of(cfg).judge_check_rows, "average", 0.0)  # from the saved shares
    assert {k: v["accuracy"] for k, v in again.items()} == {k: v["accuracy"] for k, v in result["sets"].items()}
    table = rows(Layout.of(cfg).judge_check.parent)
    assert len(table) == 2 and table[0].endswith("| yes |" if picks == "oracle" else "| no |")


def test_pointwise_judge_has_no_position_by_construction(tiny_model_path: Path):
    need("transformers")
    from actors.llm.hf_engine import HFEngine

    engine = HFEngine(tiny_model_path, seed=0)
    pairs = [Pair("Should I return a lost wallet?", "action", "Yes, return it.", "Keep the money."),
             Pair("Why?", "motivation", "Honesty matters.", "Nobody will know.")]
    probs = judge_pairs(engine, pairs, mode="pointwise")
    p_ab = label_share(probs[:, :, 0, 0], probs[:, :, 0, 1])
    p_ba = label_share(probs[:, :, 1, 0], probs[:, :, 1, 1])
    np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-12)
    swapped = judge_pairs(engine, [Pair(p.question, p.turn, p.second, p.first) for p in pairs], mode="pointwise")
    np.testing.assert_allclose(swapped[:, :, 0], probs[:, :, 1], rtol=1e-5)
    per_virtue = judge_pairs(engine, pairs, mode="per-virtue")
    assert per_virtue.shape == (2, V, 2, 2) and (per_virtue > 0).all()
    with pytest.raises(ValueError, match="supervised"):
        judge_pairs(engine, pairs, mode="supervised")
    assert JUDGE_MODES[-1] == "supervised"


def test_shipped_labelled_sets():
    df = load_labelled(SHIPPED_LABELLED)
    ethics, hand = df.filter(pl.col("set") == "ethics"), df.filter(pl.col("set") == "handwritten")
    check = ethics.filter(pl.col("split") == "check")
    assert check.height >= 200 and set(check["subset"]) == {"commonsense", "virtue"}
    train = ethics.filter(pl.col("split") == "train")
    assert train.height >= 200
    def items(d: pl.DataFrame) -> set[tuple[str, str]]:
        return {(q, a) for col in ("good", "bad") for q, a in zip(d["question"], d[col], strict=True)}

    assert not items(check) & items(train)  # the supervised judge never sees a check item
    assert (df["good"] != df["bad"]).all()
    hand_check = hand.filter(pl.col("split") == "check")
    assert hand_check.height >= 150 and hand_check.filter(pl.col("subset") == "dilemma_game").height >= 50
    hand_train = hand.filter(pl.col("split") == "train")
    assert hand_train.height >= 100
    assert not set(hand_check["question"]) & set(hand_train["question"])  # split by prompt (test_virtue_labelled)
    prompts = {p.prompt for p in load_prompts(SHIPPED_PROMPTS)}
    assert set(hand["question"]) <= prompts  # replies to the shipped prompts, dilemma-game ones included
    readme = (LABELLED_DIR / "README.md").read_text()
    assert "MIT" in readme and "Hendrycks" in readme and "oughtinc/ice" in readme


def test_labelled_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_labelled([tmp_path / "none.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "set": "s", "subset": "s", "split": "test", "turn": "action",
                               "question": "q", "good": "g", "bad": "b"}) + "\n")
    with pytest.raises(ConfigError, match="split must be one of check, train"):
        load_labelled([bad])
    with pytest.raises(ConfigError, match="unknown judge mode 'x'; valid: compare"):
        PipelineConfig(output=tmp_path, judge_mode="x")
    with pytest.raises(ConfigError, match="unknown judge rule"):
        PipelineConfig(output=tmp_path, judge_rule="x")


def test_selection_draws_from_every_category():
    prompts = load_prompts(SHIPPED_PROMPTS)
    picked = select_prompts(prompts, 24, 12)
    counts = pl.DataFrame([{"split": p.split, "category": p.category} for p in picked]).group_by(
        "split", "category").len().sort("split", "category").rows()
    assert counts == [("heldout", "dilemma_game", 6), ("heldout", "everyday", 6),
                      ("train", "dilemma_game", 12), ("train", "everyday", 12)]
    assert picked == [p for p in prompts if p in picked]  # file order kept
    assert select_prompts(prompts, None, None) == prompts
