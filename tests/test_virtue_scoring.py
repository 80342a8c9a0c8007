"""The pure numbers of the virtue pipeline (actors/llm/virtue/scoring.py): verdicts, ties, majority, the ensemble
reward, the report's evaluation score and the bootstrap, with exact expected values."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from actors.llm.virtue.scoring import (
    Tally,
    bootstrap_difference,
    bootstrap_score,
    ensemble_reward,
    evaluation_score,
    label_share,
    majority,
    position_bias,
    prob_a_better,
    tally,
    virtue_winners,
)
from simulator.errors import ConfigError


def test_scoring_imports_no_framework():
    code = ("import sys, actors.llm.virtue.scoring\n"
            "bad = [m for m in ('torch', 'transformers', 'trl', 'vllm', 'ray') if m in sys.modules]\nassert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_label_share():
    np.testing.assert_allclose(label_share(np.array([0.3, 0.0, 0.2]), np.array([0.1, 0.0, 0.2])), [0.75, 0.5, 0.5])


# (p_ab, p_ba) -> P(A better), winner with margin 0, winner with margin 0.1, position-biased
VERDICTS = [
    (0.9, 0.1, 0.9, 1, 1, False),    # A in both orders
    (0.2, 0.7, 0.25, -1, -1, False),  # B in both orders
    (0.9, 0.9, 0.5, 0, 0, True),     # always "1": pure position bias, a tie
    (0.1, 0.1, 0.5, 0, 0, True),     # always "2"
    (0.9, 0.6, 0.65, 1, 1, True),    # "1" both times, but far more sure when A is first: A wins
    (0.6, 0.5, 0.55, 1, 0, False),   # weak preference for A: a tie only with a margin
    (0.5, 0.5, 0.5, 0, 0, False),    # indifferent
    (0.3, 0.9, 0.2, -1, -1, False),  # "2" then "1": B both times
]


@pytest.mark.parametrize(("p_ab", "p_ba", "p_a", "win0", "win1", "biased"), VERDICTS)
def test_virtue_verdict_table(p_ab, p_ba, p_a, win0, win1, biased):
    assert prob_a_better(p_ab, p_ba) == pytest.approx(p_a)
    assert int(virtue_winners(np.array(p_ab), np.array(p_ba))) == win0
    assert int(virtue_winners(np.array(p_ab), np.array(p_ba), margin=0.1)) == win1
    assert bool(position_bias(np.array(p_ab), np.array(p_ba))) == biased


def test_margin_is_checked():
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        virtue_winners(np.array([0.5]), np.array([0.5]), margin=0.5)


# winners per virtue -> points A, points B, outcome
MAJORITIES = [
    ([1, 1, -1, 0, 0], 2, 1, 1),
    ([1, -1, 0, 0, 0], 1, 1, 0),     # 1-1 with three tied virtues: a tied pair
    ([0, 0, 0, 0, 0], 0, 0, 0),      # nothing decided
    ([-1, -1, -1, 1, 1], 2, 3, -1),
    ([1, 1, 1, 1, 1], 5, 0, 1),
    ([1, -1, 1, -1, 0], 2, 2, 0),
]


def test_majority_table():
    m = majority(np.array([w for w, *_ in MAJORITIES], dtype=np.int8))
    assert m.points_a.tolist() == [a for _, a, _, _ in MAJORITIES]
    assert m.points_b.tolist() == [b for _, _, b, _ in MAJORITIES]
    assert m.outcome.tolist() == [o for *_, o in MAJORITIES]


def test_tally_counts_ties_and_position_bias():
    # pair 0: A wins 5-0; pair 1: "1" every time -> every virtue tied -> a tied pair;
    # pair 2: B wins honesty, prudence, respect; A wins compassion; humility tied (0.5 both ways) -> B chosen 3-1
    p_ab = np.array([[0.9] * 5, [0.8] * 5, [0.2, 0.3, 0.7, 0.5, 0.45]])
    p_ba = np.array([[0.1] * 5, [0.8] * 5, [0.9, 0.6, 0.2, 0.5, 0.6]])
    assert tally(p_ab, p_ba) == Tally(pairs=3, a_chosen=1, b_chosen=1, tied_pairs=1, virtue_verdicts=15,
                                      tied_virtues=6, position_biased=5)
    # margin 0.1: pair 2's respect (P(A better) = 0.425) becomes a tie too; B still wins 2-1
    assert tally(p_ab, p_ba, margin=0.1) == Tally(pairs=3, a_chosen=1, b_chosen=1, tied_pairs=1, virtue_verdicts=15,
                                                  tied_virtues=7, position_biased=5)


def test_ensemble_reward_formula():
    scores = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [-1.0, 1.0, 0.0]])
    std0 = math.sqrt(2.0 / 3.0)  # population std of (1, 2, 3) and of (-1, 1, 0)
    np.testing.assert_allclose(ensemble_reward(scores), [2.0 - 0.5 * std0, 0.5, 0.0 - 0.5 * std0])
    np.testing.assert_allclose(ensemble_reward(scores, lam=0.0), [2.0, 0.5, 0.0])
    np.testing.assert_allclose(ensemble_reward(scores, lam=2.0), [2.0 - 2 * std0, 0.5, -2 * std0])
    with pytest.raises(ConfigError):
        ensemble_reward(scores, lam=-1.0)
    with pytest.raises(ValueError, match="answers, models"):
        ensemble_reward(np.array([1.0, 2.0]))


def test_evaluation_score_is_over_all_3n_scores():
    scores = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # mean 3.5, population std of 1..6 = sqrt(35/12)
    assert evaluation_score(scores) == pytest.approx(3.5 - 0.5 * math.sqrt(35.0 / 12.0))
    # not the mean of per-prompt ensemble rewards
    assert evaluation_score(scores) != pytest.approx(ensemble_reward(scores).mean())


def _reference_bootstrap(scores: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """One resample at a time: draw n prompt indices, score the picked rows."""
    idx = np.random.default_rng(seed).integers(0, scores.shape[0], size=(resamples, scores.shape[0]))
    return np.array([evaluation_score(scores[row]) for row in idx])


def test_bootstrap_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(25, 3))
    ci = bootstrap_score(scores, resamples=500, seed=7)
    ref = _reference_bootstrap(scores, 500, 7)
    assert ci.estimate == pytest.approx(evaluation_score(scores))
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    assert (ci.n, ci.resamples, ci.level) == (25, 500, 0.95)
    assert ci.low < ci.estimate < ci.high
    assert bootstrap_score(scores, resamples=500, seed=7) == ci  # seeded
    assert bootstrap_score(scores, resamples=500, seed=8) != ci


def test_bootstrap_exact_cases():
    const = np.full((10, 3), 0.25)
    ci = bootstrap_score(const, resamples=100)
    assert (ci.estimate, ci.low, ci.high) == (0.25, 0.25, 0.25)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 3))
    same = bootstrap_difference(a, a, resamples=200)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    # a shift of every score by 1 moves the mean by 1 and leaves the std alone: the difference is 1 in every resample
    shifted = bootstrap_difference(a + 1.0, a, resamples=200)
    assert (shifted.estimate, shifted.low, shifted.high) == pytest.approx((1.0, 1.0, 1.0))


def test_bootstrap_difference_is_paired():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 3)) * 3.0
    b = a + rng.normal(scale=0.05, size=a.shape) + 0.1
    diff = bootstrap_difference(b, a, resamples=1000, seed=0)
    ref_idx = np.random.default_rng(0).integers(0, 40, size=(1000, 40))
    ref = np.array([evaluation_score(b[i]) - evaluation_score(a[i]) for i in ref_idx])
    assert (diff.low, diff.high) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    # pairing removes the between-prompt spread: far narrower than either model's own interval
    assert diff.high - diff.low < 0.2 * (bootstrap_score(a, 1000).high - bootstrap_score(a, 1000).low)
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap_difference(a, a[:-1])
