"""The compiled epsilon-greedy choices of the DQN group against the numpy functions they stand for, value for value."""

from __future__ import annotations

import numpy as np
import pytest

from actors.egreedy import epsilon_choice, epsilon_reasons, greedy, move_choices, partner_choices
from actors.static import uniform_action, uniform_partner
from simulator.contracts import Reason


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values with ties (a few levels) and an occasional NaN, where argmax conventions show."""
    q = rng.integers(0, 3, shape).astype(np.float32)
    q[rng.random(shape) < 0.05] = np.nan
    return q


@pytest.mark.parametrize("iteration", [0, 1, 7])
@pytest.mark.parametrize("n", [1, 2, 15])
def test_partner_choices_equal_the_numpy_functions(iteration, n):
    rng = np.random.default_rng(n + iteration)
    q = _values(rng, (400, n))
    u = rng.random((400, 2))
    u[:5, 1] = [0.0, 0.5, 1 - 1e-16, 0.9999999, 1e-300]  # the ends of the partner coin
    choice, reason = partner_choices(q, u[:, 0], u[:, 1], 0.3, iteration == 0)
    want_reason = epsilon_reasons(iteration, u[:, 0], 0.3)
    want = epsilon_choice(want_reason, greedy(q), uniform_partner(u[:, 1], n))
    assert choice.dtype == want.dtype and reason.dtype == want_reason.dtype
    np.testing.assert_array_equal(reason, want_reason)
    np.testing.assert_array_equal(choice, want)
    if iteration:
        assert {Reason.GREEDY, Reason.EXPLORE} <= set(reason.tolist())


@pytest.mark.parametrize("iteration", [0, 3])
def test_move_choices_equal_the_numpy_functions(iteration):
    rng = np.random.default_rng(iteration)
    q = _values(rng, (40, 2, 2))
    agent, state = rng.integers(0, 40, 1000), rng.integers(0, 2, 1000).astype(np.int8)
    u = rng.random((1000, 2))
    u[:3, 1] = [0.5, np.nextafter(0.5, 0), 0.0]
    choice, reason = move_choices(q, agent, state, u[:, 0], u[:, 1], 0.2, iteration == 0)
    want_reason = epsilon_reasons(iteration, u[:, 0], 0.2)
    want = epsilon_choice(want_reason, greedy(q[agent, state]), uniform_action(u[:, 1]))
    assert choice.dtype == want.dtype and reason.dtype == want_reason.dtype
    np.testing.assert_array_equal(reason, want_reason)
    np.testing.assert_array_equal(choice, want)
