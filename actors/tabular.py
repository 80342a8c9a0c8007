"""Tabular Q-learning agents (AIES 2024 `--method tabularQ`), for all R runs of a batch.

Tables: dilemma Q[s, a] for s in {0, 1}; selection Q[state, partner] over the other N-1 agents' last moves,
stored sparsely (a dict from the packed state to a row, created at zero on first visit), so large
populations only pay for the states they visit. alpha = 0.5, gamma = 0.99, eps-greedy as the DQN.

"One update per iteration on this iteration's transitions" (DESIGN section 1) for a table means: all TD
targets are computed from the tables as they were before the update, and each visited cell moves by
alpha times the mean TD error of the transitions that hit it. With one transition per cell this is plain
Q-learning, Q += alpha * (r + gamma * max Q(s') - Q).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.egreedy import epsilon_choice, epsilon_reasons, greedy
from actors.static import uniform_action, uniform_partner
from simulator.contracts import Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions
from simulator.errors import check_positive, check_unit


@dataclass(frozen=True)
class TabularConfig:
    alpha: float = 0.5  # Q-learning step size
    gamma: float = 0.99  # discount of the one-step Q target
    eps_dilemma: float = 0.05  # epsilon-greedy exploration of the move
    eps_selection: float = 0.1  # epsilon-greedy exploration of the partner choice
    learn_selection: bool = True

    def __post_init__(self) -> None:
        check_positive("tabular", self, ("alpha",))
        check_unit("tabular", self, ("alpha", "gamma", "eps_dilemma", "eps_selection"))


class TabularGroup:
    learns = True

    def __init__(self, slots: np.ndarray, num_agents: int, num_runs: int, config: TabularConfig) -> None:
        self.slots = np.asarray(slots, dtype=np.int64)
        self.cfg = config
        self.R, self.G, self.n_others = num_runs, len(self.slots), num_agents - 1
        self.q_dilemma = np.zeros((self.R * self.G, 2, 2))  # [b, s, a]
        self.q_selection: list[dict[bytes, np.ndarray]] = [{} for _ in range(self.R * self.G)]

    def _row(self, b: int, state: np.ndarray, create: bool) -> np.ndarray:
        key = np.packbits(state).tobytes()
        row = self.q_selection[b].get(key)
        if row is None:
            row = np.zeros(self.n_others)
            if create:
                self.q_selection[b][key] = row
        return row

    def select(self, batch: SelectionBatch) -> Decisions:
        reason = epsilon_reasons(batch.iteration, batch.u[..., 0], self.cfg.eps_selection)
        choice = uniform_partner(batch.u[..., 1], self.n_others)  # replaced below where the reason is greedy
        for r, g in zip(*np.nonzero(reason == Reason.GREEDY), strict=True):
            choice[r, g] = greedy(self._row(r * self.G + g, batch.state[r, g], create=False))
        return Decisions(choice, reason)

    def act(self, batch: DilemmaBatch) -> Decisions:
        b = batch.run * self.G + batch.member
        reason = epsilon_reasons(batch.iteration, batch.u[:, 0], self.cfg.eps_dilemma)
        action = epsilon_choice(reason, greedy(self.q_dilemma[b, batch.state]), uniform_action(batch.u[:, 1]))
        return Decisions(action, reason)

    def learn(self, tr: Transitions) -> dict[str, float]:
        q, cfg = self.q_dilemma, self.cfg
        b = tr.run * self.G + tr.member
        s, a = tr.state.astype(np.int64), tr.action.astype(np.int64)
        td = tr.reward + cfg.gamma * q[b, tr.next_state].max(axis=-1) - q[b, s, a]
        cell = (b * 2 + s) * 2 + a
        total = np.bincount(cell, weights=td, minlength=q.size)
        hits = np.bincount(cell, minlength=q.size)
        q += (cfg.alpha * np.divide(total, hits, out=np.zeros_like(total), where=hits > 0)).reshape(q.shape)
        if cfg.learn_selection:
            for r in range(self.R):
                for g in range(self.G):
                    bb = r * self.G + g
                    row = self._row(bb, tr.sel_state[r, g], create=True)
                    nxt = self._row(bb, tr.sel_next_state[r, g], create=False)
                    c = tr.sel_choice[r, g]
                    row[c] += cfg.alpha * (tr.sel_reward[r, g] + cfg.gamma * nxt.max() - row[c])
        return {"dilemma_td2": float(np.mean(td * td))}

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None
