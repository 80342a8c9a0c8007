"""Epsilon-greedy decisions of the DQN and tabular learners (DESIGN section 4), in one place.

Every decision carries its reason: FIRST at iteration 0 (nothing learned yet: uniformly random), else EXPLORE when
the decision's explore coin falls under epsilon (uniformly random), else GREEDY (the argmax of the learner's values,
ties to the lowest index). The random choice reads a second coin (actors/static.py: uniform_action, uniform_partner).

The DQN group makes its choices with the compiled partner_choices and move_choices: the functions above in one loop
each (a dozen numpy calls an iteration cost more than the choices), proven equal to them in tests/test_egreedy.py.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from simulator.contracts import Reason

# as numpy scalars once: converting the IntEnum members on every call costs more than the comparisons
_FIRST, _EXPLORE, _GREEDY = np.int8(Reason.FIRST), np.int8(Reason.EXPLORE), np.int8(Reason.GREEDY)


def greedy(q: np.ndarray) -> np.ndarray:
    """argmax over the last axis; ties go to the lowest index."""
    return np.argmax(q, axis=-1)


def epsilon_reasons(iteration: int, explore_coin: np.ndarray, eps: float) -> np.ndarray:
    """int8 Reason per decision: FIRST at iteration 0, EXPLORE where explore_coin < eps, GREEDY elsewhere."""
    if iteration == 0:
        return np.full(explore_coin.shape, _FIRST, dtype=np.int8)
    return np.where(explore_coin < eps, _EXPLORE, _GREEDY)


def epsilon_choice(reason: np.ndarray, greedy_choice: np.ndarray, random_choice: np.ndarray) -> np.ndarray:
    """The greedy choice where the reason is GREEDY, the random one elsewhere."""
    return np.where(reason == _GREEDY, greedy_choice, random_choice)


@njit(cache=True, nogil=True)
def _argmax(q, i):  # type: ignore[no-untyped-def]
    """np.argmax(q[i]): the first maximum, or the first NaN."""
    best = 0
    if math.isnan(q[i, 0]):
        return 0
    for j in range(1, q.shape[1]):
        if math.isnan(q[i, j]):
            return j
        if q[i, j] > q[i, best]:
            best = j
    return best


@njit(cache=True, nogil=True)
def _reason(first, explore_coin, eps):  # type: ignore[no-untyped-def]
    if first:
        return _FIRST
    return _EXPLORE if explore_coin < eps else _GREEDY


@njit(cache=True, nogil=True)
def partner_choices(q, explore_coin, partner_coin, eps, first):  # type: ignore[no-untyped-def]
    """Rows of q (M, n): epsilon_choice(epsilon_reasons(...), greedy(q), uniform_partner(partner_coin, n)) and the
    reasons; coins (M,), first: iteration 0."""
    M, n = q.shape
    choice, reason = np.empty(M, np.int64), np.empty(M, np.int8)
    for i in range(M):
        reason[i] = _reason(first, explore_coin[i], eps)
        if reason[i] == _GREEDY:
            choice[i] = _argmax(q, i)
        else:
            choice[i] = min(np.int64(partner_coin[i] * n), n - 1)
    return choice, reason


@njit(cache=True, nogil=True)
def move_choices(q, agent, state, explore_coin, action_coin, eps, first):  # type: ignore[no-untyped-def]
    """Decision k of agent[k] in dilemma state[k], q (B, 2, 2) as [state, action]: epsilon_choice(epsilon_reasons(...),
    greedy(q[agent, state]), uniform_action(action_coin)) and the reasons."""
    K = agent.shape[0]
    choice, reason = np.empty(K, np.int64), np.empty(K, np.int8)
    for k in range(K):
        reason[k] = _reason(first, explore_coin[k], eps)
        if reason[k] == _GREEDY:
            choice[k] = _argmax(q[agent[k]], state[k])
        else:
            choice[k] = 0 if action_coin[k] < 0.5 else 1  # actors.static.uniform_action: C below 0.5
    return choice, reason
