"""A plain, sequential reference implementation of the population protocol (DESIGN section 1).

One run, one agent object per slot, one game at a time, per-agent torch.nn modules with autograd and
torch.optim.Adam. It reads the same per-iteration uniforms as the engine, so tests can demand identical
records. Nothing here is shared with the fast path except the registries (games, moral rewards), the
seeding entry point and the weight initialiser (so both start from the same weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from actors.dqn import init_params
from simulator.games import Game
from simulator.population import Population
from simulator.rewards import R_ILLEGAL, moral_reward
from simulator.seeding import initial_state, run_streams

C, D = 0, 1
GREEDY, EXPLORE, FIRST, STATIC = 0, 1, 2, 3


def partner_from_coin(coin: float, n_others: int) -> int:
    return min(int(coin * n_others), n_others - 1)


def action_from_coin(coin: float) -> int:
    return C if coin < 0.5 else D


def argmax_first(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


@dataclass
class RefStatic:
    code: str
    defected: bool = False
    defected_this_iteration: bool = False
    learns: bool = False

    def select(self, t: int, state: np.ndarray, u_explore: float, u_partner: float) -> tuple[int, int]:
        return partner_from_coin(u_partner, len(state)), STATIC

    def act(self, t: int, s: int, own_prev: int, u_explore: float, coin: float) -> tuple[int, int]:
        code = self.code
        if code == "AC":
            a = C
        elif code == "AD":
            a = D
        elif code == "TFT":
            a = C if t == 0 else s
        elif code == "Random":
            a = C if coin < 0.5 else D
        elif code == "CD":
            a = C if t % 2 == 0 else D
        elif code == "GEa":
            a = C if coin < 0.99 else D
        elif code == "GEb":
            a = D if self.defected else (C if coin < 0.8 else D)
        elif code == "GEc":
            a = 1 - own_prev if coin < 0.8 else own_prev
        elif code == "GEd":
            a = D if coin < 0.8 else C
        elif code == "GEe":
            a = C if coin < 0.8 else D
        else:
            raise KeyError(code)
        if a == D:
            self.defected_this_iteration = True
        return a, STATIC

    def end_iteration(self) -> None:
        self.defected = self.defected or self.defected_this_iteration
        self.defected_this_iteration = False


def _linear(w: np.ndarray, b: np.ndarray) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[0], w.shape[1]).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.T.copy()))
        lin.bias.copy_(torch.from_numpy(b.ravel().copy()))
    return lin


@dataclass
class RefDQN:
    rng: np.random.Generator
    n_others: int
    hidden: int = 256
    lr: float = 1e-3
    gamma: float = 0.99
    eps_dilemma: float = 0.05
    eps_selection: float = 0.1
    learn_selection: bool = True
    learns: bool = True
    sel_net: torch.nn.Module = field(init=False)
    dil_net: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        p = init_params(self.rng, self.n_others, self.hidden)
        self.sel_net = torch.nn.Sequential(_linear(p["sel_w1"], p["sel_b1"]), torch.nn.ReLU(), _linear(p["sel_w2"], p["sel_b2"]))
        self.dil_net = torch.nn.Sequential(_linear(p["dil_w1"], p["dil_b1"]), torch.nn.ReLU(), _linear(p["dil_w2"], p["dil_b2"]))
        params = list(self.dil_net.parameters())
        if self.learn_selection:
            params += list(self.sel_net.parameters())
        self.opt = torch.optim.Adam(params, lr=self.lr)

    def _q_sel(self, state: np.ndarray) -> torch.Tensor:
        return self.sel_net(torch.tensor(state, dtype=torch.float64))

    def _q_dil(self, s: int) -> torch.Tensor:
        return self.dil_net(torch.tensor([float(s)], dtype=torch.float64))

    def select(self, t: int, state: np.ndarray, u_explore: float, u_partner: float) -> tuple[int, int]:
        if t == 0:
            return partner_from_coin(u_partner, self.n_others), FIRST
        if u_explore < self.eps_selection:
            return partner_from_coin(u_partner, self.n_others), EXPLORE
        with torch.no_grad():
            return argmax_first(self._q_sel(state).tolist()), GREEDY

    def act(self, t: int, s: int, own_prev: int, u_explore: float, coin: float) -> tuple[int, int]:
        if t == 0:
            return action_from_coin(coin), FIRST
        if u_explore < self.eps_dilemma:
            return action_from_coin(coin), EXPLORE
        with torch.no_grad():
            return argmax_first(self._q_dil(s).tolist()), GREEDY

    def learn(self, sel: tuple[np.ndarray, int, float, np.ndarray] | None, dil: list[tuple[int, int, float, int]]) -> None:
        self.opt.zero_grad()
        losses = []
        for s, a, r, s2 in dil:
            with torch.no_grad():
                y = r + self.gamma * self._q_dil(s2).max()
            losses.append((self._q_dil(s)[a] - y) ** 2)
        loss = torch.stack(losses).mean()
        if self.learn_selection and sel is not None:
            state, c, r, nxt = sel
            with torch.no_grad():
                y = r + self.gamma * self._q_sel(nxt).max()
            loss = loss + (self._q_sel(state)[c] - y) ** 2
        loss.backward()
        self.opt.step()

    def end_iteration(self) -> None:
        pass


@dataclass
class RefTabular:
    n_others: int
    alpha: float = 0.5
    gamma: float = 0.99
    eps_dilemma: float = 0.05
    eps_selection: float = 0.1
    learn_selection: bool = True
    learns: bool = True
    q_dil: dict[tuple[int, int], float] = field(default_factory=dict)
    q_sel: dict[tuple[tuple[int, ...], int], float] = field(default_factory=dict)

    def _qd(self, s: int, a: int) -> float:
        return self.q_dil.get((s, a), 0.0)

    def _qs_row(self, state: np.ndarray) -> list[float]:
        key = tuple(int(x) for x in state)
        return [self.q_sel.get((key, c), 0.0) for c in range(self.n_others)]

    def select(self, t: int, state: np.ndarray, u_explore: float, u_partner: float) -> tuple[int, int]:
        if t == 0:
            return partner_from_coin(u_partner, self.n_others), FIRST
        if u_explore < self.eps_selection:
            return partner_from_coin(u_partner, self.n_others), EXPLORE
        return argmax_first(self._qs_row(state)), GREEDY

    def act(self, t: int, s: int, own_prev: int, u_explore: float, coin: float) -> tuple[int, int]:
        if t == 0:
            return action_from_coin(coin), FIRST
        if u_explore < self.eps_dilemma:
            return action_from_coin(coin), EXPLORE
        return argmax_first([self._qd(s, 0), self._qd(s, 1)]), GREEDY

    def learn(self, sel: tuple[np.ndarray, int, float, np.ndarray] | None, dil: list[tuple[int, int, float, int]]) -> None:
        tds: dict[tuple[int, int], list[float]] = {}
        for s, a, r, s2 in dil:
            tds.setdefault((s, a), []).append(r + self.gamma * max(self._qd(s2, 0), self._qd(s2, 1)) - self._qd(s, a))
        for cell, errs in tds.items():
            self.q_dil[cell] = self._qd(*cell) + self.alpha * (sum(errs) / len(errs))
        if self.learn_selection and sel is not None:
            state, c, r, nxt = sel
            key = tuple(int(x) for x in state)
            target = r + self.gamma * max(self._qs_row(nxt))
            old = self.q_sel.get((key, c), 0.0)
            self.q_sel[(key, c)] = old + self.alpha * (target - old)

    def end_iteration(self) -> None:
        pass


def reference_run(
    pop: Population,
    game: Game,
    seed: int,
    run: int,
    iterations: int,
    *,
    compat: str = "none",
    random_matching: bool = False,
) -> list[dict]:
    """Records of one run as a list of row dicts, computed one game at a time."""
    n = pop.size
    streams = run_streams(seed, run, n)
    env = initial_state(streams.protocol, n)
    agents: list = []
    for i, spec in enumerate(pop.agents):
        if spec.is_static:
            agents.append(RefStatic(spec.code))
        elif spec.learner == "dqn":
            agents.append(RefDQN(streams.agents[i], n - 1, learn_selection=not random_matching))
        else:
            agents.append(RefTabular(n - 1, learn_selection=not random_matching))
    rows = []
    for t in range(iterations):
        u = streams.protocol.random((n, 7))
        snap = env.copy()
        partner, sel_reason, sel_state, sel_choice = {}, {}, {}, {}
        for i in range(n):
            others = [j for j in range(n) if j != i]
            state = snap[others]
            if random_matching:
                c, why = partner_from_coin(u[i, 1], n - 1), STATIC
            else:
                c, why = agents[i].select(t, state, u[i, 0], u[i, 1])
            partner[i], sel_reason[i], sel_state[i], sel_choice[i] = others[c], why, state, c
        order = sorted(range(n), key=lambda i: (u[i, 6], i))
        latest = snap.copy()
        dil: dict[int, list] = {i: [] for i in range(n)}
        sel_reward = {}
        for k, i in enumerate(order):
            j = partner[i]
            a_i, why_i = agents[i].act(t, int(snap[j]), int(snap[i]), u[i, 2], u[i, 3])
            a_j, why_j = agents[j].act(t, int(snap[i]), int(snap[j]), u[i, 4], u[i, 5])
            r_i, r_j = (float(x) for x in game.payoffs[a_i, a_j])
            spec_i, spec_j = pop.agents[i], pop.agents[j]
            m_i = np.nan if spec_i.is_static else float(moral_reward(spec_i.code, a_i, a_j, r_i, r_j, int(snap[j]), compat))
            judged_j = int(snap[j]) if (compat == "aies2024" and spec_j.code in ("DE", "mDE")) else int(snap[i])
            m_j = np.nan if spec_j.is_static else float(moral_reward(spec_j.code, a_j, a_i, r_j, r_i, judged_j, compat))
            l_i = R_ILLEGAL if why_i == 5 else m_i
            l_j = R_ILLEGAL if why_j == 5 else m_j
            sel_reward[i] = l_i
            dil[i].append((int(snap[j]), a_i, l_i, a_j))
            dil[j].append((int(snap[i]), a_j, l_j, a_i))
            latest[i], latest[j] = a_i, a_j
            denom = abs(r_i) + abs(r_j)
            rows.append(
                dict(
                    run=run,
                    iteration=t,
                    order=k,
                    selector=i,
                    selected=j,
                    selector_type=spec_i.code,
                    selected_type=spec_j.code,
                    selector_state=int(snap[j]),
                    selected_state=int(snap[i]),
                    selector_action=a_i,
                    selected_action=a_j,
                    selector_payoff=r_i,
                    selected_payoff=r_j,
                    selector_moral_reward=m_i,
                    selected_moral_reward=m_j,
                    selector_learning_reward=l_i,
                    selected_learning_reward=l_j,
                    selector_reason=why_i,
                    selected_reason=why_j,
                    selection_reason=sel_reason[i],
                    selector_available_c=sum(1 for x in sel_state[i] if x == 0),
                    collective_payoff=r_i + r_j,
                    equality=1.0 if denom == 0 else 1.0 - abs(r_i - r_j) / denom,
                    min_payoff=min(r_i, r_j),
                )
            )
        env = latest
        for i, agent in enumerate(agents):
            if agent.learns:
                nxt = env[[j for j in range(n) if j != i]]
                agent.learn((sel_state[i], sel_choice[i], sel_reward[i], nxt), dil[i])
        for agent in agents:
            agent.end_iteration()
    return rows
