"""Every moral reward cell: type x game x outcome x opponent's previous move."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from simulator.engine import reward_table
from simulator.errors import ConfigError, UnknownNameError
from simulator.games import GAMES
from simulator.rewards import MORAL_TYPES, XI, equality, moral_reward

C, D = 0, 1
# IPD, written out by hand from DESIGN section 3. Order of the 8 values:
# (CC, s_O=C), (CC, s_O=D), (CD, C), (CD, D), (DC, C), (DC, D), (DD, C), (DD, D)
IPD_TABLE = {
    "S": [3, 3, 0, 0, 4, 4, 1, 1],
    "UT": [6, 6, 4, 4, 4, 4, 2, 2],
    "DE": [0, 0, 0, 0, -5, 0, -5, 0],
    "VEe": [1, 1, 0, 0, 0, 0, 1, 1],
    "VEk": [5, 5, 5, 5, 0, 0, 0, 0],
    "VM": [1, 1, 0.5, 0.5, 0, 0, 0.5, 0.5],
    "AL": [3, 3, 4, 4, 0, 0, 1, 1],
    "aUT": [-6, -6, -4, -4, -4, -4, -2, -2],
    "mDE": [0, 0, 0, 0, 5, 0, 5, 0],
    "Vie": [0, 0, 1, 1, 1, 1, 0, 0],
    "Vagg": [0, 0, 0, 0, 5, 5, 5, 5],
    "aAL": [-3, -3, -4, -4, 0, 0, -1, -1],
    "Game": [3, 3, 0, 0, 4, 4, 1, 1],
    "De": [0, 0, 0, 0, -3, 0, -3, 0],
    "Ut": [6, 6, 4, 4, 4, 4, 2, 2],
    "Game+De": [3, 3, 0, 0, 1, 4, -2, 1],
    # the registry's part of the reason-scoring types; the LLM group adds weight * ensemble (test_virtue_dilemma.py)
    "VR": [0, 0, 0, 0, 0, 0, 0, 0],
    "Game+VR": [3, 3, 0, 0, 4, 4, 1, 1],
}
CELLS = [(a_m, a_o, s) for a_m in (C, D) for a_o in (C, D) for s in (C, D)]


def test_table_covers_every_type():
    assert set(IPD_TABLE) == set(MORAL_TYPES)


@pytest.mark.parametrize("code", sorted(IPD_TABLE))
def test_ipd_reward_table(code):
    ipd = GAMES["IPD"]
    got = [float(moral_reward(code, a_m, a_o, *ipd.outcome(a_m, a_o), s)) for a_m, a_o, s in CELLS]
    assert got == pytest.approx(IPD_TABLE[code])


def _expected(code: str, a_m: int, a_o: int, r_m: float, r_o: float, s: int) -> float:
    """DESIGN section 3, one scalar formula per code (independent of the vectorised registry)."""
    tot = abs(r_m) + abs(r_o)
    eq = 1.0 if tot == 0 else 1 - abs(r_m - r_o) / tot
    exploit = a_m == D and s == C
    return {
        "S": r_m,
        "UT": r_m + r_o,
        "DE": -XI if exploit else 0.0,
        "VEe": eq,
        "VEk": XI if a_m == C else 0.0,
        "VM": 0.5 * eq + 0.5 * (a_m == C),
        "AL": r_o,
        "aUT": -(r_m + r_o),
        "mDE": XI if exploit else 0.0,
        "Vie": 1 - eq,
        "Vagg": XI if a_m == D else 0.0,
        "aAL": -r_o,
        "Game": r_m,
        "De": -3.0 if exploit else 0.0,
        "Ut": r_m + r_o,
        "Game+De": r_m + (-3.0 if exploit else 0.0),
        "VR": 0.0,
        "Game+VR": r_m,
    }[code]


@pytest.mark.parametrize(("code", "game_id"), list(itertools.product(sorted(MORAL_TYPES), sorted(GAMES))))
def test_every_cell_of_every_game(code, game_id):
    game = GAMES[game_id]
    for a_m, a_o, s in CELLS:
        r_m, r_o = game.outcome(a_m, a_o)
        assert float(moral_reward(code, a_m, a_o, r_m, r_o, s)) == pytest.approx(_expected(code, a_m, a_o, r_m, r_o, s))
    # the engine's lookup table, both roles: the selected player's payoff is the cell's second entry
    table = reward_table([code], game, "none")[0]
    for a_self, a_other, s in CELLS:
        r_row = game.outcome(a_self, a_other)
        r_col = game.outcome(a_other, a_self)[::-1]
        assert table[0, a_self, a_other, s] == pytest.approx(_expected(code, a_self, a_other, *r_row, s))
        assert table[1, a_self, a_other, s] == pytest.approx(_expected(code, a_self, a_other, *r_col, s))


@pytest.mark.parametrize(("game_id", "cell"), [("IVD", (D, D)), ("ICN", (D, D)), ("BOS", (C, D)), ("BOS", (D, C))])
def test_equality_defined_when_both_payoffs_are_zero(game_id, cell):
    r_m, r_o = GAMES[game_id].outcome(*cell)
    assert r_m + r_o == 0
    assert float(moral_reward("VEe", *cell, r_m, r_o, C)) == 1.0
    assert float(moral_reward("Vie", *cell, r_m, r_o, C)) == 0.0


def test_equality_is_bounded_for_negative_payoffs():
    r = np.array([-1.0, -2.0, 3.0])
    o = np.array([1.0, 2.0, -3.0])
    assert np.all((equality(r, o) >= 0) & (equality(r, o) <= 1))


def test_compat_vm_reduces_to_cooperation_indicator():
    ipd = GAMES["IPD"]
    got = [float(moral_reward("VM", a_m, a_o, *ipd.outcome(a_m, a_o), s, compat="aies2024")) for a_m, a_o, s in CELLS]
    assert got == [1, 1, 1, 1, 0, 0, 0, 0]


def test_unknown_code_and_compat_are_named():
    with pytest.raises(UnknownNameError, match="Did you mean 'VEe'"):
        moral_reward("VEE", 0, 0, 3, 3, 0)
    with pytest.raises(ConfigError, match="aies2024"):
        moral_reward("S", 0, 0, 3, 3, 0, compat="aies2023")
