from __future__ import annotations

import pytest

from scenarios.cli import load_game
from simulator.errors import GameSpecError, UnknownNameError
from simulator.games import GAMES, Game, get_game


def test_registry_matches_design_table():
    assert GAMES["IPD"].cells == ((3, 3), (0, 4), (4, 0), (1, 1))
    assert GAMES["BOS"].cells == ((3, 2), (0, 0), (0, 0), (2, 3))
    assert not GAMES["BOS"].symmetric
    assert all(GAMES[g].symmetric for g in GAMES if g != "BOS")
    assert GAMES["IPD"].outcome(1, 0) == (4.0, 0.0)


def test_scaled_game():
    g = GAMES["IPD"].scaled(25)
    assert g.cells[0] == (75, 75) and g.id == "IPDx25"


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (((3, 3), (0, 4), (4, 0)), "expected 4 cells"),
        (((3, 3), (0, 4), (4, 0), (1,)), "cell DD must be a pair"),
        (((3, 3), (0, "x"), (4, 0), (1, 1)), "non-number"),
        (((3, 3), (0, float("nan")), (4, 0), (1, 1)), "non-finite"),
        (((3, 3), (0, True), (4, 0), (1, 1)), "non-number"),
    ],
)
def test_broken_matrices_are_rejected_clearly(cells, message):
    with pytest.raises(GameSpecError, match=message):
        Game("bad", cells)


def test_custom_game_from_mapping_and_file(tmp_path):
    g = Game.from_mapping({"id": "mine", "CC": [2, 2], "CD": [0, 3], "DC": [3, 0], "DD": [1, 1]})
    assert g.outcome(0, 1) == (0.0, 3.0)
    with pytest.raises(GameSpecError, match="missing \\['DD'\\]"):
        Game.from_mapping({"id": "mine", "CC": [2, 2], "CD": [0, 3], "DC": [3, 0]})
    f = tmp_path / "g.toml"
    f.write_text('[game]\nid = "file"\nCC = [2, 2]\nCD = [0, 3]\nDC = [3, 0]\nDD = [1, 1]\n')
    assert load_game(str(f)).id == "file"
    f.write_text("[game\nbroken")
    with pytest.raises(GameSpecError, match="cannot parse"):
        load_game(str(f))


def test_unknown_game_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'IPD'"):
        get_game("IDP")
