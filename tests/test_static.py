"""Static strategies as expected action sequences (Axelrod style), played through the real engine.

With two agents each iteration has two games (each agent selects the other) read from one snapshot, so a
deterministic strategy makes the same move in both; `versus` returns one (move_a, move_b) per iteration.
"""

from __future__ import annotations

import numpy as np
import pytest

from actors.static import STRATEGIES, StaticGroup
from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.contracts import DilemmaBatch
from simulator.engine import PopulationEngine
from simulator.games import GAMES
from simulator.population import parse_population
from simulator.seeding import initial_state, run_streams

C, D = 0, 1


def moves_per_iteration(a: str, b: str, iterations: int, seed: int = 0) -> list[dict[int, set[int]]]:
    pop = parse_population(f"1x{a}_1x{b}").resolved("dqn")
    streams = [run_streams(seed, 0, 2)]
    eng = PopulationEngine(
        pop.codes,
        pop.moral_codes,
        build_groups(RunConfig(pop.text), streams),
        GAMES["IPD"],
        [s.protocol for s in streams],
        np.stack([initial_state(s.protocol, 2) for s in streams]),
    )
    out = []
    for _ in range(iterations):
        rec = eng.step()
        moves: dict[int, set[int]] = {0: set(), 1: set()}
        for m, o, am, ao in zip(rec.selector[0], rec.selected[0], rec.selector_action[0], rec.selected_action[0], strict=True):
            moves[int(m)].add(int(am))
            moves[int(o)].add(int(ao))
        out.append(moves)
    return out


def versus(a: str, b: str, iterations: int, seed: int = 0) -> list[tuple[int, int]]:
    out = []
    for moves in moves_per_iteration(a, b, iterations, seed):
        assert len(moves[0]) == 1 and len(moves[1]) == 1, "a deterministic strategy moved differently in one iteration"
        out.append((moves[0].pop(), moves[1].pop()))
    return out


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("TFT", "AD", [(C, D), (D, D), (D, D), (D, D)]),
        ("TFT", "AC", [(C, C), (C, C), (C, C)]),
        ("TFT", "CD", [(C, C), (C, D), (D, C), (C, D), (D, C)]),
        ("TFT", "TFT", [(C, C), (C, C), (C, C)]),
        ("AC", "AD", [(C, D), (C, D), (C, D)]),
        ("CD", "CD", [(C, C), (D, D), (C, C), (D, D)]),
    ],
)
def test_versus(a, b, expected):
    assert versus(a, b, len(expected)) == expected


def test_geb_never_forgives():
    moves = [m[0] for m in moves_per_iteration("GEb", "AC", 60, seed=4)]
    first_d = next(t for t, m in enumerate(moves) if D in m)
    assert all(m == {C} for m in moves[:first_d])
    assert all(m == {D} for m in moves[first_d + 1 :])


def _rates(code: str, n: int = 20000, own_prev: int = C) -> float:
    group = StaticGroup(np.array([0]), [code], 1)
    rng = np.random.default_rng(0)
    batch = DilemmaBatch(
        5,
        np.zeros(n, int),
        np.zeros(n, int),
        np.ones(n, int),
        np.zeros(n, np.int8),
        np.full(n, own_prev, np.int8),
        rng.random((n, 2)),
    )
    return float(np.mean(group.act(batch).choice == C))


@pytest.mark.parametrize(("code", "p_c"), [("GEa", 0.99), ("GEd", 0.2), ("GEe", 0.8), ("Random", 0.5)])
def test_stochastic_cooperation_rates(code, p_c):
    assert _rates(code) == pytest.approx(p_c, abs=0.015)


def test_gec_switches_own_move_with_p_08():
    assert _rates("GEc", own_prev=C) == pytest.approx(0.2, abs=0.015)
    assert _rates("GEc", own_prev=D) == pytest.approx(0.8, abs=0.015)


def test_every_strategy_has_a_name_and_source():
    for s in STRATEGIES.values():
        assert s.name and s.source
