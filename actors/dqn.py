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
is a lookup. Adam is elementwise, so one fused Adam over the stacked tensors equals B separate optimisers; by
default the TD targets and gradients are computed inside that Adam pass, and the next iteration's forward passes
after it (actors/dqn_fused.py, numba; its own float order of the forward sums, the same bits as the torch path given
the same forward passes).
tests/test_equivalence.py checks all of this against per-agent torch.nn modules with autograd.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from actors.dqn_fused import adam_step, dilemma_forward, dilemma_step, selection_forward, selection_step
from actors.egreedy import epsilon_choice, epsilon_reasons, greedy, move_choices, partner_choices
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
    fused: bool = True  # gradients made inside the Adam step, one compiled pass (actors/dqn_fused.py); False: torch

    def __post_init__(self) -> None:
        check_positive("dqn", self, ("hidden", "lr", "threads"))
        check_unit("dqn", self, ("gamma", "eps_dilemma", "eps_selection"))
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"unknown dqn.dtype {self.dtype!r}; valid: float32, float64")


PARAM_NAMES = ("sel_w1", "sel_b1", "sel_w2", "sel_b2", "dil_w1", "dil_b1", "dil_w2", "dil_b2")
SEL_NAMES = PARAM_NAMES[:4]
# Above this size the selection gradients of all B agents are not held at once: agents are taken in chunks, each
# chunk's gradients written to one scratch buffer and its Adam step made, before the next (Adam is elementwise).
# A 1,024-agent population's selection gradients alone would be 2 GiB, a quarter of its memory.
GRAD_CHUNK_BYTES = 64 << 20
# chunks are a multiple of this many agents, so every chunk of every parameter is a whole number of SIMD vectors and
# the fused Adam kernel computes each element exactly as in one call over the whole buffer
CHUNK_AGENTS = 16
# The torch path (DQNConfig(fused=False)) makes its forward passes with torch (MKL), the plain reference. Tests set this
# to make them with the fused path's compiled forward passes instead: the two paths then differ only in how the
# gradients and Adam are computed, and must give the same bits (tests/test_equivalence.py).
TORCH_PATH_COMPILED_FORWARD = False


def mean_square(x: np.ndarray) -> float:
    """float(np.mean(x * x)) for float64 x, the same bits (np.mean's sum over its count) without np.mean's Python
    layers, which cost more than the sum after the fused step's pass through the weights."""
    return float(np.add.reduce(x * x)) / x.size if x.size else float("nan")


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


class FlatAdam:
    """Adam over a few flat parameter buffers, one fused kernel call per step.

    Elementwise, so one call over the stacked weights of B agents equals B separate torch.optim.Adam steps.
    Calls the fused kernel directly: torch.optim.Adam.step's own bookkeeping costs more than the maths for
    buffers this small (about 300 us against 120 us for a 16-agent population).

    Denormals are flushed to zero during the step. A weight that gets no gradient for a while (a partner never
    chosen, a dead ReLU unit, an input that stays 0) keeps a first moment decaying by beta1 = 0.9 a step, which
    after about 800 steps is a denormal float, and stays one: 0.9 times the smallest denormal rounds back to it. x86
    cores take a slow path for every operation on a denormal, and the step of 10 stacked runs of a 16-agent
    population grows from about 1 ms to 5 to 9 ms after 750 iterations. The update such a moment makes is some 1e-30
    of the weight, far below the weight's last bit, so the weights are the same bits either way (checked over 3,000
    iterations of the AIES population and in tests/test_equivalence.py); only the moment itself reads 0 instead.
    """

    def __init__(self, buffers: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.buffers, self.lr, self.betas, self.eps = buffers, lr, betas, eps
        self.exp_avg = [torch.zeros_like(b) for b in buffers]
        self.exp_avg_sq = [torch.zeros_like(b) for b in buffers]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in buffers]
        self._fused = hasattr(torch, "_fused_adam_")

    def step(self, grads: list[torch.Tensor]) -> None:
        """One step of every buffer with its gradient."""
        with self.stepping():
            self.update(self.buffers, grads, self.exp_avg, self.exp_avg_sq, self.steps)

    @contextmanager
    def stepping(self) -> Iterator[list[float]]:
        """Count one step for every buffer and yield the counts; the updates made inside run with denormals flushed
        (this thread only, the kernel runs on it with 1 torch thread)."""
        counts = []
        for step in self.steps:  # in numpy: a torch call costs more here, just after the step's 15 MB pass
            count = step.numpy()
            count += 1
            counts.append(float(count))
        flushed = torch.set_flush_denormal(True)
        try:
            yield counts
        finally:
            if flushed:
                torch.set_flush_denormal(False)

    def update(self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
               exp_avg_sq: list[torch.Tensor], steps: list[torch.Tensor]) -> None:
        """Adam on these tensors (the buffers, or views of them and of their moments), steps already counted."""
        b1, b2 = self.betas
        if self._fused:
            torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], steps, amsgrad=False, lr=self.lr, beta1=b1,
                               beta2=b2, weight_decay=0.0, eps=self.eps, maximize=False)
            return
        for p, g, m, v, t in zip(params, grads, exp_avg, exp_avg_sq, steps, strict=True):
            n = float(t)  # same formula as torch.optim.Adam's single-tensor path
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2**n) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**n))


@functools.cache
def compiled_matches_torch(dtype: str) -> bool:
    """Whether actors/dqn_fused.py's Adam gives torch._fused_adam_'s bits on this CPU (torch compiles its kernel per CPU
    kind, and its compiler chose where to fuse multiply-adds). Checked once a process on random numbers, the scalar
    tail included; where it differs, DQNGroup keeps the torch path."""
    rng = np.random.default_rng(0)
    f = np.float64 if dtype == "float64" else np.float32
    p, g = rng.standard_normal(8 * 5 + 3).astype(f), (rng.standard_normal((4, 8 * 5 + 3)) * 1e-2).astype(f)
    ours, opt = [p.copy(), np.zeros_like(p), np.zeros_like(p)], FlatAdam([torch.from_numpy(p.copy())], lr=1e-3)
    for k, grad in enumerate(g, start=1):
        opt.step([torch.from_numpy(grad)])
        adam_step(ours[0], grad, ours[1], ours[2], float(k), opt.lr, opt.betas, opt.eps)
    theirs = (opt.buffers[0], opt.exp_avg[0], opt.exp_avg_sq[0])
    # compile (or load from numba's cache) the step kernels now, with the types DQNGroup passes, so no run's first
    # iteration pays for it
    sel, x = np.zeros((3, 2 * 2 + 2 + 1), f), np.zeros((1, 1), np.int8)  # one agent, one partner, two hidden units
    selection_step(sel[0], sel[1], sel[2], x, np.zeros((1, 2), f), np.zeros((1, 1), f), np.zeros(1, np.int64),
                   np.zeros(1), x, 0.99, 1.0, 1e-3, (0.9, 0.999), 1e-8)
    selection_forward(sel[0], x, np.zeros((1, 2), f), np.zeros((1, 1), f))
    dil = np.zeros((3, 4 * 2 + 2), f)
    one = np.zeros(1, np.int64)
    dilemma_step(dil[0], dil[1], dil[2], np.zeros((1, 2, 2), f), np.zeros((1, 2, 2), f), one, np.zeros(1, np.int8), one,
                 one, np.zeros(1), 0.99, 1.0, 1e-3, (0.9, 0.999), 1e-8)
    dilemma_forward(dil[0], np.zeros((1, 2, 2), f), np.zeros((1, 2, 2), f))
    return all(np.array_equal(a, b.numpy()) for a, b in zip(ours, theirs, strict=True))


class DQNGroup:
    """G DQN agents of a population, in R runs: B = R * G stacked networks, index b = run * G + member.

    Weights live in two flat buffers (selection, dilemma), laid out parameter by parameter so every
    parameter is a contiguous (B, fan_in, fan_out) view. By default (DQNConfig.fused) each net's gradients are made
    inside its Adam step (actors/dqn_fused.py) and never stored. The torch path writes them into a twin buffer; in
    large populations the selection gradients' twin holds one chunk of agents (GRAD_CHUNK_BYTES).
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
        per_agent = sum(int(np.prod(shapes[k])) for k in SEL_NAMES) * torch.finfo(self.dtype).bits // 8
        self.chunk = B  # agents whose selection gradients are held at once
        if B * per_agent > GRAD_CHUNK_BYTES and B % CHUNK_AGENTS == 0:
            self.chunk = max(CHUNK_AGENTS, GRAD_CHUNK_BYTES // per_agent // CHUNK_AGENTS * CHUNK_AGENTS)
        self.params: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}  # (B, ...), or (chunk, ...) for the selection net
        self._flat: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._views: dict[str, tuple[int, int, tuple[int, ...]]] = {}  # offset, size, shape in the net's buffer
        self._fused = config.fused and config.learn_selection and compiled_matches_torch(config.dtype)
        for net in ("sel", "dil"):
            names = [k for k in PARAM_NAMES if k.startswith(net)]
            rows = 0 if self._fused else self.chunk if net == "sel" else B  # fused: no gradients held
            flat = torch.empty(sum(B * int(np.prod(shapes[k])) for k in names), dtype=self.dtype)
            gflat = torch.zeros(sum(rows * int(np.prod(shapes[k])) for k in names), dtype=self.dtype)
            offset = goffset = 0
            for k in names:
                size, gsize = B * int(np.prod(shapes[k])), rows * int(np.prod(shapes[k]))
                self._views[k] = (offset, size, (B, *shapes[k]))
                self.params[k] = flat[offset : offset + size].view(B, *shapes[k])
                self.grads[k] = gflat[goffset : goffset + gsize].view(rows, *shapes[k])
                offset, goffset = offset + size, goffset + gsize
            self._flat[net] = (flat, gflat)
        # one agent at a time, so a 1,024-agent population never holds a float64 copy of all weights
        for b, rng in enumerate(rng for run in rngs for rng in run):
            for k, v in init_params(rng, n, hid).items():
                self.params[k][b] = torch.from_numpy(v)
        trained = [net for net, on in (("dil", config.learn_dilemma), ("sel", config.learn_selection)) if on]
        self._trained = trained
        self._grad_buffers = [self._flat[n][1] for n in trained]
        self.opt = FlatAdam([self._flat[n][0] for n in trained], lr=config.lr)
        self._rows = np.arange(B)
        self._t_rows = torch.from_numpy(self._rows)
        self._sel_dq = np.zeros((self.chunk, n), dtype=self.np_dtype)  # dL/dQ_s: one nonzero a row, reset after use
        self._sel_cache: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None
        self._qd: tuple[torch.Tensor, np.ndarray] | None = None
        # the fused path's forward passes (compiled, actors/dqn_fused.py), as numpy: this iteration's selection (x, h, q)
        # and dilemma (h, q); and what the last step left, the nets with the updated weights on the next selection state
        # (x, h, q) and on both dilemma states (h, q), which the next iteration uses
        self._compiled_forward = self._fused or TORCH_PATH_COMPILED_FORWARD
        self._sel_made: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._qd_made: tuple[np.ndarray, np.ndarray] | None = None
        self._sel_next: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._qd_next: tuple[np.ndarray, np.ndarray] | None = None

    # -- forward passes ---------------------------------------------------------------------------------
    def _sel_forward(self, state: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """x (B, 1, N-1), h (B, 1, H), q (B, N-1) as numpy."""
        if self._compiled_forward:  # the torch path with the compiled forward passes (tests)
            xs, hs, qs = self._sel_compiled(state)
            B = self.R * self.G
            return (torch.from_numpy(xs.reshape(B, 1, self.n_others).astype(self.np_dtype)),
                    torch.from_numpy(hs).view(B, 1, self.cfg.hidden), qs)
        p = self.params
        x = torch.from_numpy(state.reshape(self.R * self.G, 1, self.n_others).astype(self.np_dtype))
        h = torch.baddbmm(p["sel_b1"], x, p["sel_w1"]).relu_()
        q = torch.baddbmm(p["sel_b2"], h, p["sel_w2"])
        return x, h, q.numpy().reshape(self.R * self.G, self.n_others)

    def _sel_compiled(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The compiled forward pass: x (B, N-1) int8, h (B, H), q (B, N-1); the last fused step's when it was made on
        this state."""
        B, n = self.R * self.G, self.n_others
        x = np.ascontiguousarray(state.reshape(B, n), dtype=np.int8)
        made, self._sel_next = self._sel_next, None
        if made is not None and np.array_equal(made[0], x):
            return made
        h, q = np.empty((B, self.cfg.hidden), self.np_dtype), np.empty((B, n), self.np_dtype)
        selection_forward(self._flat["sel"][0].numpy(), x, h, q)
        return x, h, q

    def _dil_compiled(self) -> tuple[np.ndarray, np.ndarray]:
        """The compiled forward pass: h (B, 2, H), q (B, 2, 2); the last fused step's when there was one."""
        made, self._qd_next = self._qd_next, None
        if made is None:
            B = self.R * self.G
            made = np.empty((B, 2, self.cfg.hidden), self.np_dtype), np.empty((B, 2, 2), self.np_dtype)
            dilemma_forward(self._flat["dil"][0].numpy(), *made)
        return made

    def _dilemma_q(self) -> tuple[torch.Tensor, np.ndarray]:
        """Q_d on both states at once: h (B, 2, H), q (B, 2, 2) = [state, action] as numpy."""
        if self._compiled_forward:  # the torch path with the compiled forward passes (tests)
            h_np, q_np = self._dil_compiled()
            return torch.from_numpy(h_np), q_np
        p = self.params
        b1 = p["dil_b1"]
        h = torch.cat([b1, b1 + p["dil_w1"]], dim=1).relu_()  # s * w1 + b1 for s = 0, 1
        return h, torch.baddbmm(p["dil_b2"], h, p["dil_w2"]).numpy()

    # -- decisions ----------------------------------------------------------------------------------------
    def select(self, batch: SelectionBatch) -> Decisions:
        if self._fused:  # the compiled forward pass and choices (the torch path below is the reference)
            self._sel_made = self._sel_compiled(batch.state)
            shape = batch.u.shape[:2]
            choice, reason = partner_choices(self._sel_made[2], batch.u[..., 0].reshape(-1),
                                             batch.u[..., 1].reshape(-1), self.cfg.eps_selection, batch.iteration == 0)
            return Decisions(choice.reshape(shape), reason.reshape(shape))
        random_choice = uniform_partner(batch.u[..., 1], self.n_others)
        if not self.cfg.learn_selection:
            return Decisions(random_choice, np.full(random_choice.shape, Reason.STATIC, dtype=np.int8))
        self._sel_cache = self._sel_forward(batch.state)
        q = self._sel_cache[2].reshape(self.R, self.G, self.n_others)
        reason = epsilon_reasons(batch.iteration, batch.u[..., 0], self.cfg.eps_selection)
        return Decisions(epsilon_choice(reason, greedy(q), random_choice), reason)

    def act(self, batch: DilemmaBatch) -> Decisions:
        b = batch.run * self.G + batch.member
        if self._fused:  # the compiled forward pass and choices (the torch path below is the reference)
            self._qd_made = self._dil_compiled()
            return Decisions(*move_choices(self._qd_made[1], b, batch.state, batch.u[:, 0], batch.u[:, 1],
                                           self.cfg.eps_dilemma, batch.iteration == 0))
        self._qd = self._dilemma_q()
        qtab = self._qd[1]
        reason = epsilon_reasons(batch.iteration, batch.u[:, 0], self.cfg.eps_dilemma)
        return Decisions(epsilon_choice(reason, greedy(qtab[b, batch.state]), uniform_action(batch.u[:, 1])), reason)

    # -- learning -----------------------------------------------------------------------------------------
    def _dilemma_targets(self, tr: Transitions) -> tuple[np.ndarray, dict[str, float]]:
        """Dilemma net: mean squared TD error over each agent's k_b transitions of this iteration; (B, 2, 2) dL/dQ as
        [state, action]. The TD errors are tiny (B, 2, 2) lookups, cheaper in numpy than as torch ops."""
        assert self._qd is not None, "learn() before act() in this iteration"
        gamma, B = self.cfg.gamma, self.R * self.G
        q = self._qd[1]
        b = tr.run * self.G + tr.member
        s, a = tr.state.astype(np.int64), tr.action.astype(np.int64)
        td = q[b, s, a] - (tr.reward + gamma * q[b, tr.next_state].max(axis=-1))
        k = np.bincount(b, minlength=B)
        dq = np.zeros(q.shape, dtype=self.np_dtype)
        np.add.at(dq, (b, s, a), 2.0 * td / k[b])  # dL/dQ
        return dq, {"dilemma_td2": float(np.mean(td * td))}

    def _dilemma_grads(self, dq_np: np.ndarray) -> None:
        """The torch path: the dilemma gradients into their buffer."""
        assert self._qd is not None
        p, g, h = self.params, self.grads, self._qd[0]
        dq = torch.from_numpy(dq_np)
        torch.bmm(h.transpose(1, 2), dq, out=g["dil_w2"])
        torch.sum(dq, dim=1, keepdim=True, out=g["dil_b2"])
        dpre = torch.bmm(dq, p["dil_w2"].transpose(1, 2)).mul_(h.sign())  # (B, 2, H); sign(h) = 1.0 where h > 0, else 0.0
        g["dil_w1"].copy_(dpre[:, 1:2, :])  # the input is s: 0 for row 0, 1 for row 1
        torch.sum(dpre, dim=1, keepdim=True, out=g["dil_b1"])

    def _selection_targets(self, tr: Transitions) -> tuple[np.ndarray, np.ndarray, float]:
        """Selection net: one transition per agent (the partner it chose), so dL/dQ is one-hot: (B,) 2 * td at the
        chosen partner, (B,) that partner, and the mean squared TD error."""
        assert self._sel_cache is not None, "learn() before select() in this iteration"
        q_s = self._sel_cache[2]
        q_next = self._sel_forward(tr.sel_next_state)[2]
        rows, choice = self._rows, tr.sel_choice.reshape(-1).astype(np.int64)
        td_s = q_s[rows, choice] - (tr.sel_reward.reshape(-1) + self.cfg.gamma * q_next.max(axis=-1))
        return (2.0 * td_s).astype(self.np_dtype), choice, float(np.mean(td_s * td_s))

    def _selection_grads(self, dq_row: np.ndarray, choice: np.ndarray, b0: int, b1: int) -> None:
        """The selection gradients of agents b0..b1 into self.grads[...][: b1 - b0]. The products with the one-hot
        dL/dQ are an outer product and a gather, cheaper than matmuls over (B, H, N-1)."""
        assert self._sel_cache is not None
        p, k, whole = self.params, b1 - b0, b1 - b0 == self.R * self.G  # whole: no slicing (torch calls cost)
        g = self.grads if whole else {name: self.grads[name][:k] for name in SEL_NAMES}
        x, h_s = self._sel_cache[:2] if whole else (self._sel_cache[0][b0:b1], self._sel_cache[1][b0:b1])
        dq_np = self._sel_dq[:k]
        rows = self._rows[:k]
        dq_np[rows, choice[b0:b1]] = dq_row[b0:b1]
        dq = torch.from_numpy(dq_np)  # (k, N-1)
        h_row = h_s[:, 0, :]  # (k, H)
        torch.bmm(h_row[:, :, None], dq[:, None, :], out=g["sel_w2"])  # outer product: h * dq at the chosen column
        g["sel_b2"].copy_(dq[:, None, :])
        t_choice = torch.from_numpy(choice[b0:b1])
        w2_chosen = (p["sel_w2"] if whole else p["sel_w2"][b0:b1])[self._t_rows[:k], :, t_choice]  # (k, H)
        dpre_s = w2_chosen.mul_(torch.from_numpy(dq_row[b0:b1])[:, None]).mul_(h_row.sign())  # the ReLU mask
        torch.mul(x.transpose(1, 2), dpre_s[:, None, :], out=g["sel_w1"])
        g["sel_b1"].copy_(dpre_s[:, None, :])
        dq_np[rows, choice[b0:b1]] = 0

    def _dilemma_update(self) -> None:
        """The dilemma net's Adam update on its gradient buffer, inside opt.stepping(), when the selection net's
        step is made apart."""
        if "dil" in self._trained:
            opt, d = self.opt, self._trained.index("dil")
            opt.update([opt.buffers[d]], [self._flat["dil"][1]], [opt.exp_avg[d]], [opt.exp_avg_sq[d]], [opt.steps[d]])

    def _fused_step(self, tr: Transitions) -> dict[str, float]:
        """Each net's TD targets, gradients, Adam update and next forward pass in one compiled pass
        (actors/dqn_fused.py); returns the mean squared TD errors."""
        opt, B, n, G = self.opt, self.R * self.G, self.n_others, self.G
        assert self._sel_made is not None, "learn() before select() in this iteration"
        x, h, q = self._sel_made
        stats: dict[str, float] = {}
        sel = self._trained.index("sel")
        with opt.stepping() as steps:
            if self.cfg.learn_dilemma:
                assert self._qd_made is not None, "learn() before act() in this iteration"
                d = self._trained.index("dil")
                td_d, *made = dilemma_step(
                    opt.buffers[d].numpy(), opt.exp_avg[d].numpy(), opt.exp_avg_sq[d].numpy(), *self._qd_made,
                    tr.run * G + tr.member, tr.state, tr.action, tr.next_state,
                    np.ascontiguousarray(tr.reward, np.float64), self.cfg.gamma, steps[d], opt.lr, opt.betas,
                    opt.eps)
                self._qd_next = made[0], made[1]
                stats["dilemma_td2"] = mean_square(td_d)
            x_next = np.ascontiguousarray(tr.sel_next_state.reshape(B, n), dtype=np.int8)
            td, _, h_next, q_next = selection_step(
                opt.buffers[sel].numpy(), opt.exp_avg[sel].numpy(), opt.exp_avg_sq[sel].numpy(), x, h, q,
                tr.sel_choice.reshape(-1).astype(np.int64), np.ascontiguousarray(tr.sel_reward.reshape(-1), np.float64),
                x_next, self.cfg.gamma, steps[sel], opt.lr, opt.betas, opt.eps)
        self._sel_next = x_next, h_next, q_next
        stats["selection_td2"] = mean_square(td)
        return stats

    def _chunked_step(self, dq_row: np.ndarray, choice: np.ndarray) -> None:
        """Adam for a population too large for all selection gradients at once: the dilemma net in one call, then
        chunk by chunk the selection gradients and their Adam step (before the next chunk overwrites them)."""
        opt, B = self.opt, self.R * self.G
        sel = self._trained.index("sel")
        m, v, step = opt.exp_avg[sel], opt.exp_avg_sq[sel], opt.steps[sel]
        with opt.stepping():
            self._dilemma_update()
            for b0 in range(0, B, self.chunk):
                b1 = min(B, b0 + self.chunk)
                self._selection_grads(dq_row, choice, b0, b1)
                views = [self._views[k] for k in SEL_NAMES]
                opt.update([self.params[k][b0:b1] for k in SEL_NAMES], [self.grads[k][: b1 - b0] for k in SEL_NAMES],
                           [m[o : o + n].view(shape)[b0:b1] for o, n, shape in views],
                           [v[o : o + n].view(shape)[b0:b1] for o, n, shape in views], [step] * len(SEL_NAMES))

    def learn(self, tr: Transitions) -> dict[str, float]:
        self._sel_next = self._qd_next = None  # made with the weights this step changes
        stats = self._fused_step(tr) if self._fused else self._torch_step(tr)
        self._qd = self._qd_made = None
        self._sel_cache = self._sel_made = None
        return stats

    def _torch_step(self, tr: Transitions) -> dict[str, float]:
        """The plain reference: TD targets in numpy, gradients with torch into their buffers, torch's fused Adam."""
        stats: dict[str, float] = {}
        if self.cfg.learn_dilemma:
            dq_dil, dil_stats = self._dilemma_targets(tr)
            stats.update(dil_stats)
            self._dilemma_grads(dq_dil)
        if not self.cfg.learn_selection:
            self.opt.step(self._grad_buffers)
        else:
            dq_row, choice, stats["selection_td2"] = self._selection_targets(tr)
            if self.chunk >= self.R * self.G:
                self._selection_grads(dq_row, choice, 0, self.R * self.G)
                self.opt.step(self._grad_buffers)
            else:
                self._chunked_step(dq_row, choice)
        return stats

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None

    def agent_params(self, run: int, member: int) -> dict[str, np.ndarray]:
        """One agent's current weights, as numpy (for checkpoints and the equivalence tests)."""
        b = run * self.G + member
        return {n: t[b].detach().numpy().copy() for n, t in self.params.items()}
