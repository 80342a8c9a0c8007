"""Trivial-cue baselines on the labelled pairs: can a surface cue tell the good reply from the bad one?

`python -m scenarios.virtue_rlaif.cue_baseline [FILE ...]` (default: the shipped hand-written pairs) prints, for the
check split, the accuracy with a 95% bootstrap interval over pairs of

    longer          the reply with more words is good (a tie counts half); `shorter` is its complement
    keywords-k      a pairwise logistic regression on the counts of k words, fitted on the TRAIN split: the k words
                    whose good/bad log-odds in the train split are largest (the cue a lazy classifier would find)
    keywords-k@check   the same, with the words chosen and fitted on the check split itself (optimistic: it sees
                    the labels it is scored on)
    all-words       the same regression on every word of the train split (a reference, not a trivial cue: moral
                    content words such as "lie" or "fair" are real signal)

A judge's check figure means something only when these cues stay near chance: bad replies that were all shorter,
all rude or all containing one word would let a classifier pass without judging anything. Pure numpy.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.llm.virtue.scoring import bootstrap_mean

WORD = re.compile(r"[a-z']+")
HANDWRITTEN = Path(__file__).with_name("labelled") / "handwritten_pairs.jsonl"


@dataclass(frozen=True)
class LabelledPair:
    good: str
    bad: str


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def length_cue(pairs: Sequence[LabelledPair]) -> np.ndarray:
    """(N,) per pair: 1 when the good reply has more words, 0.5 on a tie, 0 otherwise."""
    d = np.array([len(words(p.good)) - len(words(p.bad)) for p in pairs], dtype=np.float64)
    return (d > 0) + 0.5 * (d == 0)


def top_words(pairs: Sequence[LabelledPair], k: int, min_count: int = 3) -> list[str]:
    """The k words whose smoothed log-odds of appearing in a good rather than a bad reply is largest in size."""
    good: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    for p in pairs:
        good.update(words(p.good))
        bad.update(words(p.bad))
    ng, nb = sum(good.values()) or 1, sum(bad.values()) or 1
    vocab = sorted(w for w in good.keys() | bad.keys() if good[w] + bad[w] >= min_count)
    odds = {w: abs(np.log((good[w] + 1) / ng) - np.log((bad[w] + 1) / nb)) for w in vocab}
    return sorted(vocab, key=lambda w: (-odds[w], w))[:k]


def differences(pairs: Sequence[LabelledPair], vocab: Sequence[str]) -> np.ndarray:
    """(N, len(vocab)) word counts of the good reply minus those of the bad reply."""
    index = {w: j for j, w in enumerate(vocab)}
    x = np.zeros((len(pairs), len(vocab)))
    for i, p in enumerate(pairs):
        for w in words(p.good):
            if w in index:
                x[i, index[w]] += 1
        for w in words(p.bad):
            if w in index:
                x[i, index[w]] -= 1
    return x


def fit_pairwise(x: np.ndarray, l2: float = 1.0, steps: int = 50) -> np.ndarray:
    """Weights w of P(first is good) = sigmoid(w . (x_first - x_second)), both orders of every pair (Newton, L2)."""
    xx = np.concatenate([x, -x])
    y = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xx @ w)))
        grad = xx.T @ (p - y) + l2 * w
        hess = (xx * (p * (1 - p))[:, None]).T @ xx + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def pairwise_correct(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(N,) 1 when the good reply scores higher, 0.5 on a tie (e.g. none of the words occurs), 0 otherwise."""
    s = x @ w
    return (s > 1e-12) + 0.5 * (np.abs(s) <= 1e-12)


def keyword_cue(train: Sequence[LabelledPair], check: Sequence[LabelledPair], k: int | None) -> np.ndarray:
    """(N_check,) correctness of the pairwise bag-of-words regression on k words (None: every train word)."""
    vocab = top_words(train, k) if k is not None else top_words(train, 10**9, min_count=1)
    return pairwise_correct(fit_pairwise(differences(train, vocab)), differences(check, vocab))


def load(paths: Sequence[Path]) -> dict[str, list[LabelledPair]]:
    out: dict[str, list[LabelledPair]] = {"check": [], "train": []}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["split"]].append(LabelledPair(r["good"], r["bad"]))
    return out


def baselines(train: Sequence[LabelledPair], check: Sequence[LabelledPair], resamples: int = 2000, seed: int = 0
              ) -> dict[str, dict[str, float]]:
    """Every cue of the module docstring on the check pairs: accuracy with a 95% bootstrap interval."""
    cues = {"longer": length_cue(check), "shorter": 1.0 - length_cue(check)}
    for k in (5, 10, 20):
        cues[f"keywords-{k}"] = keyword_cue(train, check, k)
    cues["keywords-10@check"] = keyword_cue(check, check, 10)
    cues["all-words"] = keyword_cue(train, check, None)
    out = {}
    for name, correct in cues.items():
        ci = bootstrap_mean(correct, resamples, seed, 0.95)
        out[name] = {"accuracy": ci.estimate, "low": ci.low, "high": ci.high, "pairs": len(correct)}
    return out


def main(argv: Sequence[str]) -> None:
    paths = [Path(a) for a in argv] or [HANDWRITTEN]
    data = load(paths)
    print(f"{len(data['check'])} check pairs, {len(data['train'])} train pairs ({', '.join(map(str, paths))})")
    print("| cue | accuracy on the check pairs [95% CI] |\n|---|---|")
    for name, m in baselines(data["train"], data["check"]).items():
        print(f"| {name} | {m['accuracy']:.3f} [{m['low']:.3f}, {m['high']:.3f}] |")
    print("top 10 train words:", ", ".join(top_words(data["train"], 10)))


if __name__ == "__main__":
    main(sys.argv[1:])
