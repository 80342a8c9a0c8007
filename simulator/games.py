"""Two-player one-shot social dilemmas as frozen, validated value objects (DESIGN section 2).

`payoffs[a_m, a_o]` is `(R_M, R_O)` for the row player M choosing a_m against O choosing a_o (C=0, D=1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from simulator.errors import GameSpecError, UnknownNameError

_CELLS = ("CC", "CD", "DC", "DD")


@dataclass(frozen=True)
class Game:
    id: str
    cells: tuple[tuple[float, float], ...]  # (R_M, R_O) for CC, CD, DC, DD
    source: str = ""
    payoffs: np.ndarray = field(init=False, repr=False, compare=False)  # (2, 2, 2) [a_m, a_o, player]

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise GameSpecError(f"a game needs a non-empty string id, got {self.id!r}")
        cells = self.cells
        if not isinstance(cells, Sequence) or len(cells) != 4:
            raise GameSpecError(
                f"game {self.id!r}: expected 4 cells (CC, CD, DC, DD) of (R_M, R_O) pairs, got {cells!r}"
            )
        clean = []
        for name, cell in zip(_CELLS, cells, strict=True):
            if not isinstance(cell, Sequence) or isinstance(cell, str) or len(cell) != 2:
                raise GameSpecError(f"game {self.id!r}: cell {name} must be a pair (R_M, R_O), got {cell!r}")
            pair = []
            for v in cell:
                if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                    raise GameSpecError(f"game {self.id!r}: cell {name} holds a non-number {v!r}")
                if not math.isfinite(float(v)):
                    raise GameSpecError(f"game {self.id!r}: cell {name} holds a non-finite payoff {v!r}")
                pair.append(float(v))
            clean.append((pair[0], pair[1]))
        object.__setattr__(self, "cells", tuple(clean))
        arr = np.array(clean, dtype=np.float64).reshape(2, 2, 2)
        arr.setflags(write=False)
        object.__setattr__(self, "payoffs", arr)

    @property
    def symmetric(self) -> bool:
        p = self.payoffs
        return bool(np.array_equal(p[:, :, 0], p[:, :, 1].T))

    def scaled(self, factor: float) -> Game:
        """The same game with every payoff multiplied (the ICLR work also used a 0-100 range)."""
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise GameSpecError(f"payoff scale must be a positive finite number, got {factor!r}")
        return Game(f"{self.id}x{factor:g}", tuple((a * factor, b * factor) for a, b in self.cells), self.source)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, object]) -> Game:
        """Build from a scenario-file table: {"id": "X", "CC": [3, 3], "CD": [0, 4], "DC": [4, 0], "DD": [1, 1]}."""
        if not isinstance(spec, Mapping):
            raise GameSpecError(f"a custom game must be a table, got {type(spec).__name__}")
        missing = [c for c in ("id", *_CELLS) if c not in spec]
        extra = sorted(set(spec) - {"id", "source", *_CELLS})
        if missing or extra:
            raise GameSpecError(
                f"custom game needs keys id, CC, CD, DC, DD (optional source); missing {missing}, unexpected {extra}"
            )
        return cls(str(spec["id"]), tuple(spec[c] for c in _CELLS), str(spec.get("source", "custom")))  # type: ignore[misc]

    def outcome(self, a_m: int, a_o: int) -> tuple[float, float]:
        r = self.payoffs[a_m, a_o]
        return float(r[0]), float(r[1])


def _g(id_: str, cc, cd, dc, dd, source: str) -> Game:  # type: ignore[no-untyped-def]
    return Game(id_, (cc, cd, dc, dd), source)


GAMES: dict[str, Game] = {
    g.id: g
    for g in (
        _g("IPD", (3, 3), (0, 4), (4, 0), (1, 1), "both papers (payoff range 0-4)"),
        _g("ISH", (4, 4), (0, 3), (3, 0), (1, 1), "ICLR eval (stag hunt)"),
        _g("ISH_aies", (5, 5), (1, 4), (4, 1), (2, 2), "AIES config STAGHUNT"),
        _g("IVD", (3, 3), (1, 4), (4, 1), (0, 0), "ICLR eval (volunteer)"),
        _g("IVD_aies", (4, 4), (2, 5), (5, 2), (1, 1), "AIES config VOLUNTEER"),
        _g("ICN", (2, 2), (1, 4), (4, 1), (0, 0), "ICLR eval (chicken)"),
        _g("BOS", (3, 2), (0, 0), (0, 0), (2, 3), "ICLR eval (Bach or Stravinsky, asymmetric)"),
        _g("ICD", (1, 1), (0, 0), (0, 0), (4, 4), "ICLR eval (defective coordination)"),
    )
}


def get_game(game_id: str) -> Game:
    try:
        return GAMES[game_id]
    except KeyError:
        raise UnknownNameError("game", game_id, GAMES) from None
