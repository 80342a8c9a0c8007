"""Epsilon-greedy decisions of the DQN and tabular learners (DESIGN section 4), in one place.

Every decision carries its reason: FIRST at iteration 0 (nothing learned yet: uniformly random), else EXPLORE when
the decision's explore coin falls under epsilon (uniformly random), else GREEDY (the argmax of the learner's values,
ties to the lowest index). The random choice reads a second coin (actors/static.py: uniform_action, uniform_partner).
"""

from __future__ import annotations

import numpy as np

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
