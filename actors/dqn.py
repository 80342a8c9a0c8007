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
from simulator.errors import ConfigError, check_positive, check_unit


@dataclass(frozen=True)
class DQNConfig:
    hidden: int = 256  # hidden units of the selection and dilemma nets (the anchor's)
    lr: float = 1e-3  # Adam learning rate
    gamma: float = 0.99  # discount of the one-step Q target
    eps_dilemma: float = 0.05  # epsilon-greedy exploration of the move
    eps_selection: float = 0.1  # epsilon-greedy exploration of the partner choice
    learn_selection: bool = True  # False under --random_matching
    learn_dilemma: bool = True  # False when the group is only a partner-selection head (LLM agents)
    dtype: str = "float32"  # "float64" for equivalence tests
    threads: int = 1  # torch intra-op threads; tiny matmuls gain nothing from more, and lose a lot when cores are shared

    def __post_init__(self) -> None:
        check_positive("dqn", self, ("hidden", "lr", "threads"))
        check_unit("dqn", self, ("gamma", "eps_dilemma", "eps_selection"))
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"unknown dqn.dtype {self.dtype!r}; valid: float32, float64")


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


class FlatAdam:
    """Adam over a few flat parameter buffers, one fused kernel call per step.

    Elementwise, so one call over the stacked weights of B agents equals B separate torch.optim.Adam steps.
    Calls the fused kernel directly: torch.optim.Adam.step's own bookkeeping costs more than the maths for
    buffers this small (about 300 us against 120 us for a 16-agent population).
    """

    def __init__(self, buffers: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.buffers, self.lr, self.betas, self.eps = buffers, lr, betas, eps
        self.exp_avg = [torch.zeros_like(b) for b in buffers]
        self.exp_avg_sq = [torch.zeros_like(b) for b in buffers]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in buffers]
        self._fused = hasattr(torch, "_fused_adam_")

    def step(self, grads: list[torch.Tensor]) -> None:
        b1, b2 = self.betas
        torch._foreach_add_(self.steps, 1)
        if self._fused:
            torch._fused_adam_(self.buffers, grads, self.exp_avg, self.exp_avg_sq, [], self.steps, amsgrad=False,
                               lr=self.lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps, maximize=False)
            return
        for p, g, m, v, t in zip(self.buffers, grads, self.exp_avg, self.exp_avg_sq, self.steps, strict=True):
            n = float(t)  # same formula as torch.optim.Adam's single-tensor path
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2**n) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**n))


class DQNGroup:
    """G DQN agents of a population, in R runs: B = R * G stacked networks, index b = run * G + member.

    Weights live in two flat buffers (selection, dilemma), laid out parameter by parameter so every
    parameter is a contiguous (B, fan_in, fan_out) view; gradients are written into a twin buffer.
    """

    learns = True

    def __init__(
        self, slots: np.ndarray, num_agents: int, rngs: list[list[np.random.Generator]], config: DQNConfig
    ) -> None:
        """rngs[r][g]: the generator of member g in run r (used for the initial weights only)."""
        self.slots = np.asarray(slots, dtype=np.int64)
        self.cfg = config
        self.R, self.G = len(rngs), len(self.slots)
        self.n_others = num_agents - 1
        torch.set_num_threads(config.threads)
        self.dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.np_dtype = np.float64 if config.dtype == "float64" else np.float32
        B, n, hid = self.R * self.G, self.n_others, config.hidden
        shapes = {"sel_w1": (n, hid), "sel_b1": (1, hid), "sel_w2": (hid, n), "sel_b2": (1, n),
                  "dil_w1": (1, hid), "dil_b1": (1, hid), "dil_w2": (hid, 2), "dil_b2": (1, 2)}
        self.params: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._flat: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for net in ("sel", "dil"):
            names = [k for k in PARAM_NAMES if k.startswith(net)]
            total = sum(B * int(np.prod(shapes[k])) for k in names)
            flat, gflat = torch.empty(total, dtype=self.dtype), torch.zeros(total, dtype=self.dtype)
            offset = 0
            for k in names:
                size = B * int(np.prod(shapes[k]))
                self.params[k] = flat[offset : offset + size].view(B, *shapes[k])
                self.grads[k] = gflat[offset : offset + size].view(B, *shapes[k])
                offset += size
            self._flat[net] = (flat, gflat)
        # one agent at a time, so a 1,024-agent population never holds a float64 copy of all weights
        for b, rng in enumerate(rng for run in rngs for rng in run):
            for k, v in init_params(rng, n, hid).items():
                self.params[k][b] = torch.from_numpy(v)
        trained = [net for net, on in (("dil", config.learn_dilemma), ("sel", config.learn_selection)) if on]
        self._trained = trained
        self.opt = FlatAdam([self._flat[n][0] for n in trained], lr=config.lr)
        self._sel_cache: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None
        self._qd: tuple[torch.Tensor, np.ndarray] | None = None

    # -- forward passes ---------------------------------------------------------------------------------
    def _sel_forward(self, state: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """x (B, 1, N-1), h (B, 1, H), q (B, N-1) as numpy."""
        p = self.params
        x = torch.from_numpy(state.reshape(self.R * self.G, 1, self.n_others).astype(self.np_dtype))
        h = torch.relu(torch.baddbmm(p["sel_b1"], x, p["sel_w1"]))
        q = torch.baddbmm(p["sel_b2"], h, p["sel_w2"])
        return x, h, q.numpy().reshape(self.R * self.G, self.n_others)

    def _dilemma_q(self) -> tuple[torch.Tensor, np.ndarray]:
        """Q_d on both states at once: h (B, 2, H), q (B, 2, 2) = [state, action] as numpy."""
        p = self.params
        pre = p["dil_b1"] + torch.cat([0.0 * p["dil_w1"], p["dil_w1"]], dim=1)  # s * w1 + b1 for s = 0, 1
        h = torch.relu(pre)
        return h, torch.baddbmm(p["dil_b2"], h, p["dil_w2"]).numpy()

    # -- decisions ----------------------------------------------------------------------------------------
    def select(self, batch: SelectionBatch) -> Decisions:
        explore_coin, partner_coin = batch.u[..., 0], batch.u[..., 1]
        random_choice = uniform_partner(partner_coin, self.n_others)
        if not self.cfg.learn_selection:
            return Decisions(random_choice, np.full(random_choice.shape, Reason.STATIC, dtype=np.int8))
        with torch.no_grad():
            self._sel_cache = self._sel_forward(batch.state)
        q = self._sel_cache[2].reshape(self.R, self.G, self.n_others)
        if batch.iteration == 0:
            reason = np.full(random_choice.shape, Reason.FIRST, dtype=np.int8)
        else:
            reason = np.where(explore_coin < self.cfg.eps_selection, Reason.EXPLORE, Reason.GREEDY).astype(np.int8)
        choice = np.where(reason == Reason.GREEDY, greedy(q), random_choice)
        return Decisions(choice, reason)

    def act(self, batch: DilemmaBatch) -> Decisions:
        with torch.no_grad():
            self._qd = self._dilemma_q()
        qtab = self._qd[1]  # (B, 2, 2)
        b = batch.run * self.G + batch.member
        random_action = uniform_action(batch.u[:, 1])
        if batch.iteration == 0:
            reason = np.full(b.shape, Reason.FIRST, dtype=np.int8)
        else:
            reason = np.where(batch.u[:, 0] < self.cfg.eps_dilemma, Reason.EXPLORE, Reason.GREEDY).astype(np.int8)
        action = np.where(reason == Reason.GREEDY, greedy(qtab[b, batch.state]), random_action)
        return Decisions(action, reason)

    # -- learning -----------------------------------------------------------------------------------------
    def _dilemma_grads(self, tr: Transitions) -> dict[str, float]:
        assert self._qd is not None, "learn() before act() in this iteration"
        p, g, gamma, B = self.params, self.grads, self.cfg.gamma, self.R * self.G
        """Dilemma net: mean squared TD error over each agent's k_b transitions of this iteration.

        The TD errors are tiny (B, 2, 2) lookups, cheaper in numpy than as torch ops.
        """
        h, q = self._qd
        b = tr.run * self.G + tr.member
        s, a = tr.state.astype(np.int64), tr.action.astype(np.int64)
        td = q[b, s, a] - (tr.reward + gamma * q[b, tr.next_state].max(axis=-1))
        k = np.bincount(b, minlength=B)
        dq_np = np.zeros(q.shape, dtype=self.np_dtype)
        np.add.at(dq_np, (b, s, a), 2.0 * td / k[b])  # dL/dQ
        dq = torch.from_numpy(dq_np)
        torch.bmm(h.transpose(1, 2), dq, out=g["dil_w2"])
        torch.sum(dq, dim=1, keepdim=True, out=g["dil_b2"])
        dpre = torch.bmm(dq, p["dil_w2"].transpose(1, 2)).mul_(h > 0)  # (B, 2, H)
        g["dil_w1"].copy_(dpre[:, 1:2, :])  # the input is s: 0 for row 0, 1 for row 1
        torch.sum(dpre, dim=1, keepdim=True, out=g["dil_b1"])
        return {"dilemma_td2": float(np.mean(td * td))}

    def learn(self, tr: Transitions) -> dict[str, float]:
        p, g, gamma, B = self.params, self.grads, self.cfg.gamma, self.R * self.G
        stats: dict[str, float] = {}
        with torch.no_grad():
            if self.cfg.learn_dilemma:
                stats.update(self._dilemma_grads(tr))
            if self.cfg.learn_selection:  # one transition per agent: the partner it chose
                assert self._sel_cache is not None
                x, h_s, q_s = self._sel_cache
                q_next = self._sel_forward(tr.sel_next_state)[2]
                rows = np.arange(B)
                choice = tr.sel_choice.reshape(B)
                td_s = q_s[rows, choice] - (tr.sel_reward.reshape(B) + gamma * q_next.max(axis=-1))
                # one transition per agent, so dL/dQ is one-hot: 2 * td at the chosen partner. The products with
                # it are gathers and outer products, cheaper than batched matmuls over (B, H, N-1)
                dq = torch.from_numpy((2.0 * td_s).astype(self.np_dtype))  # (B,)
                t_rows, t_choice = torch.from_numpy(rows), torch.from_numpy(choice.astype(np.int64))
                h_row = h_s[:, 0, :]  # (B, H)
                g["sel_w2"].zero_()
                g["sel_w2"][t_rows, :, t_choice] = h_row * dq[:, None]
                g["sel_b2"].zero_()
                g["sel_b2"][t_rows, 0, t_choice] = dq
                dpre_s = p["sel_w2"][t_rows, :, t_choice].mul_(dq[:, None]).mul_(h_row > 0)  # (B, H)
                torch.mul(x.transpose(1, 2), dpre_s[:, None, :], out=g["sel_w1"])
                g["sel_b1"].copy_(dpre_s[:, None, :])
                stats["selection_td2"] = float(np.mean(td_s * td_s))
        self.opt.step([self._flat[n][1] for n in self._trained])
        self._qd = None
        self._sel_cache = None
        return stats

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None

    def agent_params(self, run: int, member: int) -> dict[str, np.ndarray]:
        """One agent's current weights, as numpy (for checkpoints and the equivalence tests)."""
        b = run * self.G + member
        return {n: t[b].detach().numpy().copy() for n, t in self.params.items()}
