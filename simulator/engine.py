"""The batched population engine: DESIGN section 1 for R runs of one population at once.

One iteration, for every run r (all arrays carry a leading run axis):
    1. selection   every agent picks a partner from the snapshot, one call per agent group
    2. order       the N pairs are shuffled (argsort of a uniform key per selector)
    3. games       both players of every pair decide from the snapshot, one call per agent group;
                   payoffs and moral rewards are table lookups
    4. state       env_state = each agent's move in the last game it played (latest write wins)
    5. learning    each learning group gets its selection and dilemma transitions, in game order

Two protocols (`protocol=`):
    population  the AIES protocol above: every agent selects, N games per iteration.
    pair        the ICLR 2025 fine-tuning protocol (LLM_morality `fine_tune.py`, `fine_tune_2learners.py`): two
                agents, one game per iteration with slot 0 as the row player. Every `episode_length` iterations
                (the paper's batch_size games, then one PPO update) env_state is drawn afresh: random, except that
                AC starts from C and AD from D (the paper's `generate_initial_state`); the draw reads the
                order column of the uniform block, which one game per iteration leaves unused.
                With two LLM learners, a legal player whose partner answered illegally learns what
                fine_tune_2learners.py pays it: Ut r_other = 0, Game+De R_illegal (simulator/rewards.py
                PARTNER_ILLEGAL); other types their table reward against the partner's carried-over move.

An illegal answer (reason ILLEGAL, an LLM's) learns -r_illegal, for a move and for a partner selection alike.

Compiled bookkeeping (`compiled=True`, the default; population protocol only): the numpy between the group calls
(order, pairs, rewards, the new state, the record columns) runs as a few numba loops (simulator/engine_kernels.py)
with the same arithmetic; the numpy methods below stay as the plain reference, and as the pair protocol's path.

Randomness: each run has its own protocol generator. Per iteration it yields one (N, 7) block of uniforms,
column meaning below; the plain reference loop in tests/ reads the same block, so the two can be compared
record for record. Runs never share randomness, so a run's records do not depend on how runs are batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from simulator.contracts import (
    AgentGroup,
    Decisions,
    DilemmaBatch,
    Reason,
    SelectionBatch,
    Transitions,
)
from simulator.errors import ConfigError
from simulator.games import Game
from simulator.rewards import (
    DEFAULT_R_ILLEGAL,
    REASON_TYPES,
    STATE_DEPENDENT,
    check_compat,
    check_r_illegal,
    equality,
    partner_illegal_reward,
    reward_fn,
)

# columns of the per-iteration uniform block, indexed by the selector i of pair i
U_SEL_EXPLORE, U_SEL_PARTNER, U_M_EXPLORE, U_M_ACTION, U_O_EXPLORE, U_O_ACTION, U_ORDER = range(7)
U_COLUMNS = 7
RANDOMNESS_CHUNK = 256  # iterations of uniforms drawn per generator call (same stream as one call per iteration)
PROTOCOLS = ("population", "pair")


def others_index(n: int) -> np.ndarray:
    """(N, N-1): row i lists every slot but i, in slot order (the selection-state layout)."""
    idx = np.broadcast_to(np.arange(n - 1), (n, n - 1))
    return idx + (idx >= np.arange(n)[:, None])


def reward_table(codes: Sequence[str | None], game: Game, compat: str) -> np.ndarray:
    """(T, 2, 2, 2, 2) moral reward of type t as [role, a_self, a_other, s_other]; NaN where code is None.

    role 0 is the row player (the selector), role 1 the column player (the selected); they differ in
    asymmetric games such as BOS, where the selected player's payoff is the second entry of the cell.
    """
    a_self, a_other, s_o = (x.ravel() for x in np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"))
    row = game.payoffs[a_self, a_other]  # self is M
    col = game.payoffs[a_other, a_self][:, ::-1]  # self is O: its own payoff first
    table = np.full((len(codes), 2, 2, 2, 2), np.nan)
    for t, code in enumerate(codes):
        if code is not None:
            fn = reward_fn(code, compat)
            for role, pay in enumerate((row, col)):
                table[t, role] = fn(a_self, a_other, pay[:, 0], pay[:, 1], s_o).reshape(2, 2, 2)
    return table


@dataclass
class IterationRecords:
    """The S games of one iteration for each of R runs, in game order: every array is (R, S), S = N or 1 (pair)."""

    iteration: int
    selector: np.ndarray
    selected: np.ndarray
    selector_state: np.ndarray
    selected_state: np.ndarray
    selector_action: np.ndarray
    selected_action: np.ndarray
    selector_payoff: np.ndarray
    selected_payoff: np.ndarray
    selector_moral_reward: np.ndarray
    selected_moral_reward: np.ndarray
    selector_learning_reward: np.ndarray
    selected_learning_reward: np.ndarray
    selector_reason: np.ndarray
    selected_reason: np.ndarray
    selection_reason: np.ndarray
    selector_available_c: np.ndarray
    collective_payoff: np.ndarray
    equality: np.ndarray
    min_payoff: np.ndarray
    extra: dict[str, np.ndarray]  # group-provided columns (LLM), (R, N) per name and role
    learn_stats: dict[str, float] = field(default_factory=dict)  # what the groups' learn() reported (PPO: kl, losses)


class PopulationEngine:
    def __init__(
        self,
        codes: Sequence[str],
        learner_codes: Sequence[str | None],
        groups: Sequence[AgentGroup],
        game: Game,
        protocol_rngs: Sequence[np.random.Generator],
        initial_state: np.ndarray,
        *,
        compat: str = "none",
        random_matching: bool = False,
        reward_phases: Sequence[tuple[int, Sequence[str | None]]] = (),
        protocol: str = "population",
        episode_length: int = 0,
        episode_moves: Sequence[int] | None = None,
        r_illegal: float = DEFAULT_R_ILLEGAL,
        compiled: bool = True,
    ) -> None:
        """codes[i]: slot i's type code. learner_codes[i]: its moral type, None for static strategies.

        reward_phases: (first iteration, moral type per slot) pairs that switch the rewards mid-run, for
        phased schedules such as Game for the first half, then De.
        protocol, episode_length: see the module docstring. episode_moves[i]: slot i's move in a fresh episode
        state (0 = C, 1 = D), or -1 for a random one. r_illegal: an illegal answer learns -r_illegal.
        compiled: the population protocol's bookkeeping in simulator/engine_kernels.py (module docstring).
        """
        self.N, self.R = len(codes), len(protocol_rngs)
        if self.N < 2:
            raise ConfigError(f"a population needs at least 2 agents, got {self.N}")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if protocol == "pair" and self.N != 2:
            raise ConfigError(f"the pair protocol plays two agents, got a population of {self.N}")
        if episode_length < 0 or (episode_length and protocol != "pair"):
            raise ConfigError(f"episode_length must be >= 0 and is used by the pair protocol only, got {episode_length}")
        self.protocol, self.episode_length = protocol, int(episode_length)
        self.r_illegal = check_r_illegal(r_illegal)
        self.episode_moves = np.asarray(episode_moves if episode_moves is not None else [-1] * self.N, dtype=np.int64)
        self.S = self.N if protocol == "population" else 1  # games per iteration: every agent selects, or slot 0

        self.codes = list(codes)
        self.groups = list(groups)
        self.group_of = np.full(self.N, -1, dtype=np.int64)
        self.member_of = np.zeros(self.N, dtype=np.int64)
        for k, g in enumerate(self.groups):
            self.group_of[g.slots] = k
            self.member_of[g.slots] = np.arange(len(g.slots))
        if (self.group_of < 0).any():
            missing = np.flatnonzero(self.group_of < 0).tolist()
            raise ConfigError(f"population slots {missing} are played by no agent group")
        self.game = game
        self.compat = check_compat(compat)
        self.random_matching = random_matching
        self.rngs = list(protocol_rngs)
        self.state = np.array(initial_state, dtype=np.int8).reshape(self.R, self.N)
        if protocol == "pair":  # the first episode starts like every other
            self.state = np.where(self.episode_moves >= 0, self.episode_moves, self.state).astype(np.int8)
        self.others = others_index(self.N)
        self._phases = {int(start): list(c) for start, c in reward_phases}
        self._set_rewards(list(learner_codes))
        self.iteration = 0
        # constant index arrays of the iteration: run of each decision d, d itself, the other decision of d's game,
        # each group's selection-state columns
        self._run_d = np.repeat(np.arange(self.R), 2 * self.S)
        self._d = np.arange(2 * self.R * self.S)
        self._partner_d = self._d ^ 1
        self._runs = np.arange(self.R)[:, None]
        self._slots = np.arange(self.N)
        self._pair_m = np.zeros((self.R, 1), dtype=np.int64)  # the pair protocol's one game: slot 0 selects
        self._group_others = [self.others[g.slots] for g in self.groups]
        for a in (self._run_d, self._d, self._partner_d, self._runs, self._slots, self._pair_m, *self._group_others):
            a.setflags(write=False)  # groups get views of them: a write would change every later iteration
        self._u = np.empty((self.R, 0, self.N, U_COLUMNS))
        self._u_pos = 0
        self._kernels: ModuleType | None = None
        if compiled and protocol == "population":
            from simulator import engine_kernels  # numba: loaded (or compiled) only by an engine that uses it

            self._kernels = engine_kernels

    # -- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """The protocol's own state between iterations (the groups are checkpointed by the driver)."""
        return {
            "iteration": self.iteration,
            "state": self.state.copy(),
            "rngs": [rng.bit_generator.state for rng in self.rngs],
            "u": self._u.copy(),
            "u_pos": self._u_pos,
            "learner_codes": list(self._learner_codes),
        }

    def load_state_dict(self, st: dict[str, object]) -> None:
        state = np.asarray(st["state"], dtype=np.int8)
        if state.shape != self.state.shape:
            raise ConfigError(f"checkpoint state has shape {state.shape}, this engine plays {self.state.shape}")
        self.iteration = int(st["iteration"])  # type: ignore[call-overload]
        self.state = state.copy()
        for rng, bit_state in zip(self.rngs, st["rngs"], strict=True):  # type: ignore[call-overload]
            rng.bit_generator.state = bit_state
        self._u = np.asarray(st["u"]).copy()
        self._u_pos = int(st["u_pos"])  # type: ignore[call-overload]
        self._set_rewards(list(st["learner_codes"]))  # type: ignore[call-overload]

    def _set_rewards(self, learner_codes: list[str | None]) -> None:
        self._learner_codes = list(learner_codes)
        if len(learner_codes) != self.N:
            raise ConfigError(f"expected a moral type (or None) for each of {self.N} slots, got {len(learner_codes)}")
        moral = list(dict.fromkeys(c for c in learner_codes if c is not None))
        self.type_idx = np.array([moral.index(c) if c is not None else len(moral) for c in learner_codes])
        self.rewards = reward_table([*moral, None], self.game, self.compat)
        self.compat_selected = np.array([self.compat == "aies2024" and c in STATE_DEPENDENT for c in learner_codes])
        # types that score a stated reason (VR, Game+VR): their group adds its reward term to the table's payoff part
        self.reasoned = np.array([c in REASON_TYPES for c in learner_codes], dtype=bool)
        # pair protocol: each slot's learning reward when it answered legally and its partner did not (NaN: table)
        self.partner_illegal = np.array([partner_illegal_reward(c, self.r_illegal) if self.protocol == "pair"
                                         else np.nan for c in learner_codes])

    # -- randomness ---------------------------------------------------------------------------------------
    def _uniforms(self) -> np.ndarray:
        """(R, N, 7) uniforms for this iteration, drawn RANDOMNESS_CHUNK iterations at a time."""
        if self._u_pos >= self._u.shape[1]:
            self._u = np.stack([rng.random((RANDOMNESS_CHUNK, self.N, U_COLUMNS)) for rng in self.rngs])
            self._u_pos = 0
        u = self._u[:, self._u_pos]
        self._u_pos += 1
        return u

    # -- one iteration ------------------------------------------------------------------------------------
    def _episode_state(self, u: np.ndarray) -> np.ndarray:
        """(R, N) a fresh episode's state: the fixed moves of episode_moves, random (order column) elsewhere."""
        drawn = (u[:, :, U_ORDER] >= 0.5).astype(np.int8)
        return np.where(self.episode_moves >= 0, self.episode_moves, drawn).astype(np.int8)

    def step(self) -> IterationRecords:
        """One iteration for every run: the five phases of the module docstring, then its records."""
        t = self.iteration
        if t in self._phases:
            self._set_rewards(self._phases[t])
        u = self._uniforms()
        if self.episode_length and t > 0 and t % self.episode_length == 0:
            self.state = self._episode_state(u)
        snap = self.state
        sel = self._select(t, snap, u)
        games = self._pair_up(snap, u, sel.partner)
        play = self._play(t, snap, games, sel.reason)
        new_state = self._latest_moves(games, play.action)
        learn_stats = self._learn(t, sel, games, play, new_state)
        self.state = new_state
        for g in self.groups:
            g.end_iteration(t, new_state)
        self.iteration += 1
        return self._records(t, snap, sel, games, play, learn_stats)

    def _select(self, t: int, snap: np.ndarray, u: np.ndarray) -> _Selection:
        """1. selection: every group picks its members' partners from the snapshot (partner[r, i] != i)."""
        R, N = self.R, self.N
        choice = np.empty((R, N), dtype=np.int64)
        reason = np.empty((R, N), dtype=np.int8)
        states: list[np.ndarray] = []
        for g, others in zip(self.groups, self._group_others, strict=True):
            state = snap[:, others]  # (R, G, N-1)
            states.append(state)
            if self.protocol == "pair":  # two agents: the only partner is the other one
                dec = Decisions(np.zeros((R, len(g.slots)), dtype=np.int64),
                                np.full((R, len(g.slots)), Reason.STATIC, dtype=np.int8))
            elif self.random_matching:
                dec = Decisions(
                    np.minimum((u[:, g.slots, U_SEL_PARTNER] * (N - 1)).astype(np.int64), N - 2),
                    np.full((R, len(g.slots)), Reason.STATIC, dtype=np.int8),
                )
            else:
                dec = g.select(SelectionBatch(t, state, u[:, g.slots, U_SEL_EXPLORE : U_SEL_PARTNER + 1]))
            choice[:, g.slots] = dec.choice
            reason[:, g.slots] = dec.reason
        return _Selection(choice, reason, states, choice + (choice >= self._slots))

    def _pair_up(self, snap: np.ndarray, u: np.ndarray, partner: np.ndarray) -> _Games:
        """2. order: game k of run r is pair (m[r, k], o[r, k]); S = N games (population) or 1 (pair).

        Decisions are laid out as d = (r * S + k) * 2 + role, role 0 = M (the selector), 1 = O (the selected)."""
        if self._kernels is not None:
            m, o, player, opponent, state, member, coins, own_prev = self._kernels.pair_up(u, partner, snap,
                                                                                            self.member_of)
            return _Games(m, o, player, opponent, state, member, coins, own_prev, self._group_decisions(player))
        runs = self._runs
        m = self._pair_m if self.protocol == "pair" else np.argsort(u[:, :, U_ORDER], axis=1, kind="stable")
        o = partner[runs, m]
        player = np.stack([m, o], axis=2).reshape(-1)
        opponent = player.reshape(-1, 2)[:, ::-1].reshape(-1)
        # the coins of pair k sit in its selector's row: [M explore, M action, O explore, O action]
        coins = u[runs, m][:, :, U_M_EXPLORE : U_O_ACTION + 1].reshape(-1, 2)
        run_d = self._run_d
        return _Games(m, o, player, opponent, snap[run_d, opponent], self.member_of[player], coins,
                      snap[run_d, player], self._group_decisions(player))

    def _group_decisions(self, player: np.ndarray) -> list[np.ndarray | None]:
        """Per group, the decisions its members make (indices d), or None when one group makes them all."""
        if len(self.groups) == 1:
            return [None]
        group_d = self.group_of[player]
        return [np.flatnonzero(group_d == k) for k in range(len(self.groups))]

    def _play(self, t: int, snap: np.ndarray, games: _Games, sel_reason: np.ndarray) -> _Play:
        """3. games: every group decides its members' moves from the snapshot, then the rewards."""
        D = 2 * self.R * self.S
        player, run_d, own_prev = games.player, self._run_d, games.own_prev
        action = np.empty(D, dtype=np.int64)
        reason = np.empty(D, dtype=np.int8)
        term = np.zeros(D)  # the reason-scoring types' term (Decisions.reward_term), 0 elsewhere
        extra: dict[str, np.ndarray] = {}
        first = t == 0 and self.protocol != "pair"
        reasoned_d = self.reasoned[player]
        for g, sel in zip(self.groups, games.decisions, strict=True):
            d: np.ndarray | slice = slice(None) if sel is None else sel
            if sel is not None and sel.size == 0:
                continue
            why = reasoned_d[d]
            dec = g.act(DilemmaBatch(t, run_d[d], games.member[d], games.opponent[d], games.state[d], own_prev[d],
                                     games.coins[d], first, why if why.any() else None))
            action[d] = dec.choice
            reason[d] = dec.reason
            if why.any():
                if dec.reward_term is None:
                    raise ConfigError(f"{type(g).__name__} gave no reward term for its reason-scoring decisions")
                term[d] = np.where(why, dec.reward_term, 0.0)
            for name, col in (dec.extra or {}).items():
                if name not in extra:
                    extra[name] = np.full(D, None if col.dtype == object else np.nan, dtype=col.dtype)
                extra[name][d] = col
        return _Play(action, reason, *self._rewards(snap, games, action, reason, term, sel_reason), extra)

    def _rewards(self, snap: np.ndarray, games: _Games, action: np.ndarray, reason: np.ndarray, term: np.ndarray,
                 sel_reason: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(R, S, 2) payoffs, moral rewards (table lookups plus the reason-scoring types' term) and learning rewards
        (R_illegal for an illegal answer), each as [selector, selected]; (R, N) each selector's learning reward for
        its partner choice: its own game's, -R_illegal for an illegal choice, NaN without an own game (pair)."""
        if self._kernels is not None:
            return self._kernels.rewards(action, reason, term, snap, games.m, games.o, self.game.payoffs, self.rewards,
                                         self.type_idx, self.compat_selected, self.r_illegal, sel_reason)
        R, S = self.R, self.S
        a2 = action.reshape(R, S, 2)
        pay = self.game.payoffs[a2[..., 0], a2[..., 1]]  # (R, S, 2) [R_M, R_O]
        # the opponent's previous move each player's reward judges; compat reproduces the anchor's DE/mDE bug
        runs, m, o = self._runs, games.m, games.o
        s_m, s_o = snap[runs, o], snap[runs, m]
        judged = np.stack([s_m, np.where(self.compat_selected[o], s_m, s_o)], axis=2)
        tidx = self.type_idx[games.player].reshape(R, S, 2)
        moral = np.stack(
            [
                self.rewards[tidx[..., 0], 0, a2[..., 0], a2[..., 1], judged[..., 0]],
                self.rewards[tidx[..., 1], 1, a2[..., 1], a2[..., 0], judged[..., 1]],
            ],
            axis=2,
        ) + term.reshape(R, S, 2)
        illegal = reason.reshape(R, S, 2) == Reason.ILLEGAL
        learning = np.where(illegal, -self.r_illegal, moral)
        if self.protocol == "pair":  # the legal player of a game its partner answered illegally (module docstring)
            paid = self.partner_illegal[games.player].reshape(R, S, 2)
            learning = np.where(illegal[..., ::-1] & ~illegal & ~np.isnan(paid), paid, learning)
        sel_reward = np.full((R, self.N), np.nan)
        sel_reward[runs, m] = learning[..., 0]
        return pay, moral, learning, np.where(sel_reason == Reason.ILLEGAL, -self.r_illegal, sel_reward)

    def _latest_moves(self, games: _Games, action: np.ndarray) -> np.ndarray:
        """4. state: the decision with the largest d of each player sets its new state (every agent plays at least
        once an iteration: it selects, or in the pair protocol it is selected)."""
        if self._kernels is not None:
            return self._kernels.latest_moves(games.player, action, self.R, self.N)
        last = np.full(self.R * self.N, -1, dtype=np.int64)
        np.maximum.at(last, self._run_d * self.N + games.player, self._d)
        return action[last].astype(np.int8).reshape(self.R, self.N)

    def _learn(self, t: int, sel: _Selection, games: _Games, play: _Play, new_state: np.ndarray) -> dict[str, float]:
        """5. learning: each learning group gets its selection and dilemma transitions, in game order."""
        flat = play.learning.reshape(-1)
        stats: dict[str, float] = {}
        for g, others, sel_state, dec in zip(self.groups, self._group_others, sel.states, games.decisions,
                                             strict=True):
            if not g.learns:
                continue
            gs = g.slots
            d: np.ndarray | slice = slice(None) if dec is None else dec
            stats.update(g.learn(Transitions(
                iteration=t,
                sel_state=sel_state,
                sel_choice=sel.choice[:, gs],
                sel_reward=play.sel_reward[:, gs],
                sel_next_state=new_state[:, others],
                run=self._run_d[d],
                member=games.member[d],
                state=games.state[d],
                action=play.action[d],
                reward=flat[d],
                next_state=play.action[self._partner_d[d]],
            )) or {})
        return stats

    def _records(self, t: int, snap: np.ndarray, sel: _Selection, games: _Games, play: _Play,
                 learn_stats: dict[str, float]) -> IterationRecords:
        R, S, runs, m, o = self.R, self.S, self._runs, games.m, games.o
        a2, pay, moral, learning = play.action.reshape(R, S, 2), play.pay, play.moral, play.learning
        reason = play.reason.reshape(R, S, 2)
        if self._kernels is not None:
            selector_state, selected_state, selection_reason, avail, collective, equal, low = (
                self._kernels.record_columns(snap, m, o, sel.reason, pay))
        else:
            selector_state, selected_state = snap[runs, o], snap[runs, m]  # the selected's and the selector's own move
            selection_reason = sel.reason[runs, m]
            avail = (snap == 0).sum(axis=1, keepdims=True) - (selected_state == 0)
            collective, equal = pay[..., 0] + pay[..., 1], equality(pay[..., 0], pay[..., 1])
            low = np.minimum(pay[..., 0], pay[..., 1])
        return IterationRecords(
            iteration=t,
            selector=m,
            selected=o,
            selector_state=selector_state,
            selected_state=selected_state,
            selector_action=a2[..., 0],
            selected_action=a2[..., 1],
            selector_payoff=pay[..., 0],
            selected_payoff=pay[..., 1],
            selector_moral_reward=moral[..., 0],
            selected_moral_reward=moral[..., 1],
            selector_learning_reward=learning[..., 0],
            selected_learning_reward=learning[..., 1],
            selector_reason=reason[..., 0],
            selected_reason=reason[..., 1],
            selection_reason=selection_reason,
            selector_available_c=avail,
            collective_payoff=collective,
            equality=equal,
            min_payoff=low,
            extra={
                f"{role}_{name}": col.reshape(R, S, 2)[..., i]
                for name, col in play.extra.items()
                for i, role in enumerate(("selector", "selected"))
            },
            learn_stats=learn_stats,
        )


@dataclass
class _Selection:
    """Phase 1's result: (R, N) partner index among the others, its reason, the partner's slot; per group the
    (R, G, N-1) selection states."""

    choice: np.ndarray
    reason: np.ndarray
    states: list[np.ndarray]
    partner: np.ndarray


@dataclass
class _Games:
    """Phase 2's result: (R, S) selector m and selected o of each game; per decision d (2 R S,) the player, its
    opponent, its dilemma state (the opponent's snapshot move), its member index in its group, its two coins and its
    own snapshot move; per group the decisions it makes (None: all of them)."""

    m: np.ndarray
    o: np.ndarray
    player: np.ndarray
    opponent: np.ndarray
    state: np.ndarray
    member: np.ndarray
    coins: np.ndarray
    own_prev: np.ndarray
    decisions: list[np.ndarray | None]


@dataclass
class _Play:
    """Phase 3's result: per decision the action and reason; (R, S, 2) payoffs, moral and learning rewards as
    [selector, selected]; (R, N) each selector's learning reward for its partner choice; the groups' extra columns
    per decision."""

    action: np.ndarray
    reason: np.ndarray
    pay: np.ndarray
    moral: np.ndarray
    learning: np.ndarray
    sel_reward: np.ndarray
    extra: dict[str, np.ndarray]
