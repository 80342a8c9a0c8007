"""Deep Q-learning agents of the AIES 2024 population study, stacked: one group holds every DQN agent of R runs.

Per agent two networks, each one hidden layer of 256 ReLU units (DESIGN section 4):
    dilemma   Q_d: s in {0, 1} (opponent's last move)      -> 2 action values      1 -> 256 -> 2
    selection Q_s: the other N-1 agents' last moves (0/1)  -> N-1 partner values   (N-1) -> 256 -> (N-1)
Adam (lr 1e-3), gamma 0.99, no target network: the TD target r + gamma * max_a' Q(s', a') uses the same
network, detached (semi-gradient, as standard DQN). One Adam step per iteration on the mean squared TD error
of that iteration's transitions; the buffers are then cleared.

Why hand-written gradients: the nets are tiny, so per-operation overhead decides the speed. All B = R x G
networks are stacked along a leading axis and every step is a handful of batched matmuls. Because the
dilemma state is binary, Q_d is evaluated once per iteration on both states and every decision and TD target
is a lookup. Adam is elementwise, so one fused Adam over the stacked tensors equals B separate optimisers.
tests/test_equivalence.py checks all of this against per-agent torch.nn modules with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.static import uniform_action, uniform_partner
from simulator.contracts import Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions


@dataclass(frozen=True)
class DQNConfig:
    hidden: int = 256
    lr: float = 1e-3
    gamma: float = 0.99
    eps_dilemma: float = 0.05
    eps_selection: float = 0.1
    learn_selection: bool = True  # False under --random_matching
    dtype: str = "float32"  # "float64" for equivalence tests


PARAM_NAMES = ("sel_w1", "sel_b1", "sel_w2", "sel_b2", "dil_w1", "dil_b1", "dil_w2", "dil_b2")


def init_params(rng: np.random.Generator, n_others: int, hidden: int) -> dict[str, np.ndarray]:
    """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from the agent's own stream.

    Weights are stored input-major, (fan_in, fan_out), so a forward pass is x @ W + b.
    """

    def lin(fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, (fan_in, fan_out)), rng.uniform(-bound, bound, (1, fan_out))

    sw1, sb1 = lin(n_others, hidden)
    sw2, sb2 = lin(hidden, n_others)
    dw1, db1 = lin(1, hidden)
    dw2, db2 = lin(hidden, 2)
    return dict(zip(PARAM_NAMES, (sw1, sb1, sw2, sb2, dw1, db1, dw2, db2), strict=True))


def greedy(q: np.ndarray) -> np.ndarray:
    """argmax over the last axis; ties go to the lowest index."""
    return np.argmax(q, axis=-1)


class DQNGroup:
    """G DQN agents of a population, in R runs: B = R * G stacked networks, index b = run * G + member."""

    learns = True

    def __init__(
        self, slots: np.ndarray, num_agents: int, rngs: list[list[np.random.Generator]], config: DQNConfig
    ) -> None:
        """rngs[r][g]: the generator of member g in run r (used for the initial weights only)."""
        self.slots = np.asarray(slots, dtype=np.int64)
        self.cfg = config
        self.R, self.G = len(rngs), len(self.slots)
        self.n_others = num_agents - 1
        dtype = torch.float64 if config.dtype == "float64" else torch.float32
        per_agent = [init_params(rng, self.n_others, config.hidden) for run in rngs for rng in run]
        self.params = {
            name: torch.tensor(np.stack([p[name] for p in per_agent]), dtype=dtype) for name in PARAM_NAMES
        }
        trained = [n for n in PARAM_NAMES if config.learn_selection or n.startswith("dil")]
        self._trained = [self.params[n] for n in trained]
        self.opt = torch.optim.Adam(self._trained, lr=config.lr, fused=True)
        self._sel_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._qd: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dtype = dtype

    # -- forward passes ---------------------------------------------------------------------------------
    def _sel_forward(self, state: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.params
        x = torch.from_numpy(state.reshape(self.R * self.G, 1, self.n_others)).to(self.dtype)
        pre = torch.baddbmm(p["sel_b1"], x, p["sel_w1"])  # (B, 1, H)
        h = torch.relu(pre)
        q = torch.baddbmm(p["sel_b2"], h, p["sel_w2"])  # (B, 1, N-1)
        return x, h, q

    def _dilemma_q(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q_d on both states at once: h (B, 2, H), q (B, 2, 2) = [state, action]."""
        p = self.params
        pre = p["dil_b1"] + torch.cat([0.0 * p["dil_w1"], p["dil_w1"]], dim=1)  # s * w1 + b1 for s = 0, 1
        h = torch.relu(pre)
        return h, torch.baddbmm(p["dil_b2"], h, p["dil_w2"])

    # -- decisions ----------------------------------------------------------------------------------------
    def select(self, batch: SelectionBatch) -> Decisions:
        explore_coin, partner_coin = batch.u[..., 0], batch.u[..., 1]
        random_choice = uniform_partner(partner_coin, self.n_others)
        if not self.cfg.learn_selection:
            return Decisions(random_choice, np.full(random_choice.shape, Reason.STATIC, dtype=np.int8))
        with torch.no_grad():
            self._sel_cache = self._sel_forward(batch.state)
        q = self._sel_cache[2].numpy().reshape(self.R, self.G, self.n_others)
        if batch.iteration == 0:
            reason = np.full(random_choice.shape, Reason.FIRST, dtype=np.int8)
        else:
            reason = np.where(explore_coin < self.cfg.eps_selection, Reason.EXPLORE, Reason.GREEDY).astype(np.int8)
        choice = np.where(reason == Reason.GREEDY, greedy(q), random_choice)
        return Decisions(choice, reason)

    def act(self, batch: DilemmaBatch) -> Decisions:
        with torch.no_grad():
            self._qd = self._dilemma_q()
        qtab = self._qd[1].numpy()  # (B, 2, 2)
        b = batch.run * self.G + batch.member
        random_action = uniform_action(batch.u[:, 1])
        if batch.iteration == 0:
            reason = np.full(b.shape, Reason.FIRST, dtype=np.int8)
        else:
            reason = np.where(batch.u[:, 0] < self.cfg.eps_dilemma, Reason.EXPLORE, Reason.GREEDY).astype(np.int8)
        action = np.where(reason == Reason.GREEDY, greedy(qtab[b, batch.state]), random_action)
        return Decisions(action, reason)

    # -- learning -----------------------------------------------------------------------------------------
    def learn(self, tr: Transitions) -> dict[str, float]:
        assert self._qd is not None, "learn() before act() in this iteration"
        p, gamma, B = self.params, self.cfg.gamma, self.R * self.G
        grads: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        with torch.no_grad():
            # dilemma: mean squared TD error over each agent's k_b transitions of this iteration
            h, q = self._qd
            b = torch.from_numpy(tr.run * self.G + tr.member)
            s = torch.from_numpy(tr.state.astype(np.int64))
            a = torch.from_numpy(tr.action.astype(np.int64))
            s2 = torch.from_numpy(tr.next_state.astype(np.int64))
            r = torch.from_numpy(tr.reward).to(self.dtype)
            td = q[b, s, a] - (r + gamma * q[b, s2].amax(dim=-1))
            k = torch.bincount(b, minlength=B).to(self.dtype)
            dq = torch.zeros_like(q)
            dq.index_put_((b, s, a), 2.0 * td / k[b], accumulate=True)  # (B, 2, 2) dL/dQ
            grads["dil_w2"] = torch.bmm(h.transpose(1, 2), dq)
            grads["dil_b2"] = dq.sum(dim=1, keepdim=True)
            dpre = torch.bmm(dq, p["dil_w2"].transpose(1, 2)) * (h > 0)  # (B, 2, H)
            grads["dil_w1"] = dpre[:, 1:2, :].contiguous()  # input s = 1 for row 1, 0 for row 0 (fused Adam needs contiguous)
            grads["dil_b1"] = dpre.sum(dim=1, keepdim=True)
            stats["dilemma_td2"] = float((td * td).mean())

            if self.cfg.learn_selection:
                assert self._sel_cache is not None
                x, h_s, q_s = self._sel_cache
                _, _, q_next = self._sel_forward(tr.sel_next_state)
                choice = torch.from_numpy(tr.sel_choice.reshape(B).astype(np.int64))
                r_s = torch.from_numpy(tr.sel_reward.reshape(B)).to(self.dtype)
                rows = torch.arange(B)
                td_s = q_s[rows, 0, choice] - (r_s + gamma * q_next[:, 0, :].amax(dim=-1))
                dq_s = torch.zeros_like(q_s)
                dq_s[rows, 0, choice] = 2.0 * td_s  # (B, 1, N-1); one transition per agent
                grads["sel_w2"] = torch.bmm(h_s.transpose(1, 2), dq_s)
                grads["sel_b2"] = dq_s
                dpre_s = torch.bmm(dq_s, p["sel_w2"].transpose(1, 2)) * (h_s > 0)
                grads["sel_w1"] = torch.bmm(x.transpose(1, 2), dpre_s)
                grads["sel_b1"] = dpre_s
                stats["selection_td2"] = float((td_s * td_s).mean())

            for name, g in grads.items():
                p[name].grad = g
        self.opt.step()
        self._qd = None
        self._sel_cache = None
        return stats

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None

    def agent_params(self, run: int, member: int) -> dict[str, np.ndarray]:
        """One agent's current weights, as numpy (for checkpoints and the equivalence tests)."""
        b = run * self.G + member
        return {n: t[b].detach().numpy().copy() for n, t in self.params.items()}
