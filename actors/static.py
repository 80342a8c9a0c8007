"""Static strategies (DESIGN section 4): fixed rules, uniform partner choice, no learning.

Each strategy is one vectorised rule over a batch of decisions. Inputs per decision:
    iteration, first (no move played yet), state (opponent's snapshot move), own_prev (own snapshot move),
    coin (uniform in [0, 1) from the run's protocol stream), defected (GEb's memory).
Conventions, all per iteration because every decision of an iteration reads the same snapshot:
- "first move" means iteration 0 of the population protocol (TFT cooperates in all its games of iteration 0);
  in the pair protocol (ICLR) each episode's drawn state stands for last round's moves, so TFT copies it, as the
  paper's opponent copies the learner's random initial move;
- CD alternates by iteration: C on even iterations, D on odd ones;
- GEb's "first defection" is remembered from the end of the iteration in which it defected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simulator.contracts import Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions

C, D = 0, 1
Rule = Callable[[int, bool, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _bernoulli_c(p_c: float) -> Rule:
    return lambda it, first, state, own_prev, coin, defected: np.where(coin < p_c, C, D)


def _tft(it: int, first: bool, state, own_prev, coin, defected):  # type: ignore[no-untyped-def]
    return np.full(state.shape, C) if first else state.astype(np.int64)


def _geb(it: int, first: bool, state, own_prev, coin, defected):  # type: ignore[no-untyped-def]
    return np.where(defected | (coin >= 0.8), D, C)


def _gec(it: int, first: bool, state, own_prev, coin, defected):  # type: ignore[no-untyped-def]
    return np.where(coin < 0.8, 1 - own_prev, own_prev).astype(np.int64)


@dataclass(frozen=True)
class Strategy:
    code: str
    name: str
    source: str
    rule: Rule
    stochastic: bool


STRATEGIES: dict[str, Strategy] = {
    s.code: s
    for s in (
        Strategy("AC", "Always Cooperate", "Axelrod (1980)", lambda it, f, st, op, c, d: np.full(st.shape, C), False),
        Strategy("AD", "Always Defect", "Axelrod (1980)", lambda it, f, st, op, c, d: np.full(st.shape, D), False),
        Strategy("TFT", "Tit for Tat: C first, then the opponent's last move", "Axelrod (1980)", _tft, False),
        Strategy("Random", "Uniformly random move", "AIES 2024 baseline", _bernoulli_c(0.5), True),
        Strategy("CD", "Alternate C, D, C, ... by iteration", "AIES 2024 baseline",
                 lambda it, f, st, op, c, d: np.full(st.shape, it % 2), False),
        Strategy("GEa", "Gilbert-Elliot a: cooperates 99%", "AIES 2024", _bernoulli_c(0.99), True),
        Strategy("GEb", "Gilbert-Elliot b: cooperates 80% until its first defection, then defects forever",
                 "AIES 2024", _geb, True),
        Strategy("GEc", "Gilbert-Elliot c: switches its own last move with p = 0.8", "AIES 2024", _gec, True),
        Strategy("GEd", "Gilbert-Elliot d: defects 80%", "AIES 2024",
                 lambda it, f, st, op, c, d: np.where(c < 0.8, D, C), True),
        Strategy("GEe", "Gilbert-Elliot e: cooperates 80%", "AIES 2024", _bernoulli_c(0.8), True),
    )
}


def uniform_partner(coin: np.ndarray, n_others: int) -> np.ndarray:
    """Map a uniform coin to a partner index among the n_others candidates."""
    return np.minimum((coin * n_others).astype(np.int64), n_others - 1)


def uniform_action(coin: np.ndarray) -> np.ndarray:
    return np.where(coin < 0.5, C, D)


class StaticGroup:
    """All static-strategy slots of a population, for R runs at once."""

    learns = False

    def __init__(self, slots: np.ndarray, codes: list[str], num_runs: int) -> None:
        self.slots = np.asarray(slots, dtype=np.int64)
        self.codes = list(codes)
        self._strategies = list(dict.fromkeys(codes))  # distinct codes, in order of first slot
        self._code_of = np.array([self._strategies.index(c) for c in codes], dtype=np.int64)  # member -> strategy
        self.defected = np.zeros((num_runs, len(codes)), dtype=bool)  # GEb memory
        self._pending = np.zeros_like(self.defected)

    def select(self, batch: SelectionBatch) -> Decisions:
        choice = uniform_partner(batch.u[..., 1], batch.state.shape[-1])
        return Decisions(choice, np.full(choice.shape, Reason.STATIC, dtype=np.int8))

    def act(self, batch: DilemmaBatch) -> Decisions:
        action = np.empty(batch.member.shape, dtype=np.int64)
        code_of = self._code_of[batch.member]
        for k, code in enumerate(self._strategies):
            m = code_of == k
            if m.any():
                action[m] = STRATEGIES[code].rule(
                    batch.iteration, batch.first, batch.state[m], batch.own_prev[m], batch.u[m, 1],
                    self.defected[batch.run[m], batch.member[m]],
                )
        self._pending[batch.run[action == D], batch.member[action == D]] = True
        return Decisions(action, np.full(action.shape, Reason.STATIC, dtype=np.int8))

    def learn(self, transitions: Transitions) -> None:
        return None

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        self.defected |= self._pending
        self._pending[:] = False
