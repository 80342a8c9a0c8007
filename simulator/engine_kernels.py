"""The population protocol's bookkeeping between the group calls, compiled (numba): PopulationEngine's fast path.

Why: with the DQN's step compiled (actors/dqn_fused.py), a 10-run stack of the AIES 16-agent population spent about
a fifth of its iteration in some 60 small numpy calls around the group calls (order, pairs, payoffs, rewards, the new
state, the record columns), each a few microseconds for a few hundred numbers. Each function below does one phase's
numpy in one loop.

Same arithmetic as the numpy methods of PopulationEngine, which stay as the plain reference (and the pair protocol's
path): table lookups, the same float operations in the same order (numba neither reassociates nor contracts them
without fastmath), the stable order of the order coins. tests/test_engine_kernels.py compares every record column and
every group input of the two paths bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from simulator.contracts import Reason
from simulator.engine import U_M_EXPLORE, U_ORDER

ILLEGAL = int(Reason.ILLEGAL)


@njit(cache=True, nogil=True)
def pair_up(u, partner, snap, member_of):  # type: ignore[no-untyped-def]
    """Phase 2: u (R, N, 7) the iteration's uniforms, partner (R, N) each selector's partner slot, snap (R, N) int8.

    Returns m, o (R, N) the selector and selected of game k (games in the stable order of the order coins); per
    decision d = (r * N + k) * 2 + role: player, opponent, state (the opponent's snapshot move), member (the player's
    index in its group), coins (D, 2) [explore, action] and own_prev (the player's own snapshot move)."""
    R, N = partner.shape
    D = 2 * R * N
    m, o = np.empty((R, N), np.int64), np.empty((R, N), np.int64)
    player, opponent, member = np.empty(D, np.int64), np.empty(D, np.int64), np.empty(D, np.int64)
    state, own_prev = np.empty(D, np.int8), np.empty(D, np.int8)
    coins = np.empty((D, 2))
    key = np.empty(N)
    for r in range(R):
        for i in range(N):
            key[i] = u[r, i, U_ORDER]
        order = np.argsort(key, kind="mergesort")  # stable, as numpy's kind="stable"
        for k in range(N):
            sm = order[k]
            so = partner[r, sm]
            m[r, k], o[r, k] = sm, so
            d = (r * N + k) * 2
            player[d], player[d + 1] = sm, so
            opponent[d], opponent[d + 1] = so, sm
            member[d], member[d + 1] = member_of[sm], member_of[so]
            state[d], state[d + 1] = snap[r, so], snap[r, sm]
            own_prev[d], own_prev[d + 1] = snap[r, sm], snap[r, so]
            for c in range(2):  # the coins of pair k sit in its selector's row: [M explore, M action, O explore, ...]
                coins[d, c] = u[r, sm, U_M_EXPLORE + c]
                coins[d + 1, c] = u[r, sm, U_M_EXPLORE + 2 + c]
    return m, o, player, opponent, state, member, coins, own_prev


@njit(cache=True, nogil=True)
def rewards(action, reason, term, snap, m, o, payoffs, table, type_idx, compat_selected,  # type: ignore[no-untyped-def]
            r_illegal, sel_reason):
    """Phase 3's rewards and phase 5's selection rewards, for decisions laid out as pair_up's.

    Returns pay, moral, learning (R, N, 2) as [selector, selected] (PopulationEngine._rewards) and sel_reward (R, N):
    each selector's learning reward of its own game, -r_illegal for an illegal selection."""
    R, N = m.shape
    pay, moral, learning = np.empty((R, N, 2)), np.empty((R, N, 2)), np.empty((R, N, 2))
    sel_reward = np.empty((R, N))
    for r in range(R):
        for i in range(N):  # NaN: no own game (every agent has one in this protocol)
            sel_reward[r, i] = -r_illegal if sel_reason[r, i] == ILLEGAL else np.nan
        for k in range(N):
            d = (r * N + k) * 2
            sm, so = m[r, k], o[r, k]
            a_m, a_o = action[d], action[d + 1]
            s_m, s_o = snap[r, so], snap[r, sm]  # the move each one's reward judges: the other's snapshot move
            judged_o = s_m if compat_selected[so] else s_o  # compat reproduces the anchor's DE/mDE bug
            pay[r, k, 0], pay[r, k, 1] = payoffs[a_m, a_o, 0], payoffs[a_m, a_o, 1]
            moral[r, k, 0] = table[type_idx[sm], 0, a_m, a_o, s_m] + term[d]
            moral[r, k, 1] = table[type_idx[so], 1, a_o, a_m, judged_o] + term[d + 1]
            for role in range(2):
                learning[r, k, role] = -r_illegal if reason[d + role] == ILLEGAL else moral[r, k, role]
            if sel_reason[r, sm] != ILLEGAL:
                sel_reward[r, sm] = learning[r, k, 0]
    return pay, moral, learning, sel_reward


@njit(cache=True, nogil=True)
def latest_moves(player, action, R, N):  # type: ignore[no-untyped-def]
    """Phase 4: (R, N) int8, each player's move in the decision with the largest d (its last game)."""
    state = np.empty((R, N), np.int8)
    for d in range(player.shape[0]):
        state[d // (2 * N), player[d]] = action[d]
    return state


@njit(cache=True, nogil=True)
def record_columns(snap, m, o, sel_reason, pay):  # type: ignore[no-untyped-def]
    """The derived record columns (R, N): selector_state, selected_state, selection_reason, selector_available_c,
    collective_payoff, equality (rewards.equality's arithmetic), min_payoff."""
    R, N = m.shape
    selector_state, selected_state = np.empty((R, N), np.int8), np.empty((R, N), np.int8)
    selection_reason = np.empty((R, N), np.int8)
    avail = np.empty((R, N), np.int64)
    collective, equality, low = np.empty((R, N)), np.empty((R, N)), np.empty((R, N))
    for r in range(R):
        cooperators = 0
        for i in range(N):
            cooperators += snap[r, i] == 0
        for k in range(N):
            sm, so = m[r, k], o[r, k]
            selector_state[r, k], selected_state[r, k] = snap[r, so], snap[r, sm]
            selection_reason[r, k] = sel_reason[r, sm]
            avail[r, k] = cooperators - (snap[r, sm] == 0)
            a, b = pay[r, k, 0], pay[r, k, 1]
            collective[r, k] = a + b
            denom = abs(a) + abs(b)
            equality[r, k] = 1.0 if denom == 0 else 1.0 - abs(a - b) / denom
            low[r, k] = a if a <= b or a != a else b  # np.minimum: the first on a tie, NaN wins
    return selector_state, selected_state, selection_reason, avail, collective, equality, low
