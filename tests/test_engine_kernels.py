"""The engine's compiled bookkeeping (simulator/engine_kernels.py) against its numpy reference methods, bit for bit.

Two engines of the same seeded runs, one with compiled=True and one with compiled=False, play side by side; every
record column (values and dtypes) and every batch a group is given (selection, dilemma and learning inputs) must be
equal in every iteration. The groups learn from those inputs, so equal inputs keep the two runs equal throughout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from actors.dqn import DQNConfig
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.contracts import Decisions, Reason
from simulator.driver import build_engine
from simulator.engine import IterationRecords, PopulationEngine
from simulator.games import GAMES


class Illegal:
    """Wraps a group: a decision whose first coin falls under `rate` becomes ILLEGAL (as an LLM's unreadable answer),
    so the illegal-answer rewards of both paths are compared too."""

    def __init__(self, group: Any, rate: float) -> None:
        self.group, self.rate = group, rate
        self.slots, self.learns = group.slots, group.learns

    def _mark(self, dec: Decisions, coin: np.ndarray) -> Decisions:
        return Decisions(dec.choice, np.where(coin < self.rate, np.int8(Reason.ILLEGAL), dec.reason), dec.extra,
                         dec.reward_term)

    def select(self, batch: Any) -> Decisions:
        return self._mark(self.group.select(batch), batch.u[..., 1])

    def act(self, batch: Any) -> Decisions:
        return self._mark(self.group.act(batch), batch.u[:, 1])

    def learn(self, tr: Any) -> Any:
        return self.group.learn(tr)

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        self.group.end_iteration(iteration, new_state)


class Recorder:
    """Wraps a group and keeps a copy of every batch it is given."""

    def __init__(self, group: Any, log: list[tuple[str, dict[str, Any]]]) -> None:
        self.group, self.log = group, log
        self.slots, self.learns = group.slots, group.learns

    def _keep(self, name: str, batch: Any) -> None:
        self.log.append((name, {k: np.copy(v) if isinstance(v, np.ndarray) else v
                                for k, v in dataclasses.asdict(batch).items()}))

    def select(self, batch: Any) -> Decisions:
        self._keep("select", batch)
        return self.group.select(batch)  # type: ignore[no-any-return]

    def act(self, batch: Any) -> Decisions:
        self._keep("act", batch)
        return self.group.act(batch)  # type: ignore[no-any-return]

    def learn(self, tr: Any) -> Any:
        self._keep("learn", tr)
        return self.group.learn(tr)

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        self.group.end_iteration(iteration, new_state)


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {b.dtype}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
        if a.dtype.kind == "f":  # the same bits: -0.0 and 0.0 compare equal
            assert np.array_equal(np.signbit(a), np.signbit(b)), where
    else:
        assert a == b, where


CASES = [
    # population, method, game, compat, random_matching, illegal rate, iterations
    ("8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg", "dqn", "IPD", "none", False, 0.0, 300),
    ("3xS_1xUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg_1xVM_1xAL_1xaAL_1xTFT_1xGEc", "dqn", "BOS", "aies2024", False, 0.0,
     60),
    ("2xS_1xUT@tabularQ_1xDE_1xAD_1xRandom", "dqn", "ICN", "none", False, 0.1, 80),
    ("2xDE_1xmDE_1xVM_1xUT_1xTFT", "tabularQ", "ISH_aies", "aies2024", False, 0.2, 80),
    ("2xUT_1xDE_1xTFT", "dqn", "IPD", "none", True, 0.0, 60),
]


@pytest.mark.parametrize(("pop", "method", "game", "compat", "random_matching", "illegal", "iterations"), CASES)
def test_compiled_bookkeeping_equals_the_numpy_reference(tmp_path, pop, method, game, compat, random_matching,
                                                         illegal, iterations):
    cfg = with_agents(RunConfig(pop, num_iterations=iterations, num_runs=3, seed=5, game=GAMES[game], method=method,
                                compat=compat, random_matching=random_matching, output=tmp_path),
                      dqn=DQNConfig())
    engines: list[PopulationEngine] = []
    logs: list[list[tuple[str, dict[str, Any]]]] = []
    for compiled in (True, False):
        engine, _ = build_engine(cfg, [0, 1, 2], build_groups, compiled=compiled)
        log: list[tuple[str, dict[str, Any]]] = []
        engine.groups = [Recorder(Illegal(g, illegal) if illegal else g, log) for g in engine.groups]
        engines.append(engine)
        logs.append(log)
    fast, plain = engines
    assert fast._kernels is not None and plain._kernels is None
    illegal_seen = 0
    for t in range(iterations):
        a, b = fast.step(), plain.step()
        for f in dataclasses.fields(IterationRecords):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if isinstance(va, dict):
                assert va.keys() == vb.keys(), f"iteration {t}, {f.name}"
                for k in va:
                    _assert_same(va[k], vb[k], f"iteration {t}, {f.name}[{k}]")
            else:
                _assert_same(va, vb, f"iteration {t}, {f.name}")
        illegal_seen += int((a.selector_reason == Reason.ILLEGAL).sum() + (a.selection_reason == Reason.ILLEGAL).sum())
        _assert_same(fast.state, plain.state, f"iteration {t}, state")
    assert len(logs[0]) == len(logs[1]) > iterations
    for (name_a, batch_a), (name_b, batch_b) in zip(*logs, strict=True):
        assert name_a == name_b and batch_a.keys() == batch_b.keys()
        for k in batch_a:
            _assert_same(batch_a[k], batch_b[k], f"{name_a} {k} of iteration {batch_a['iteration']}")
    assert (illegal_seen > 0) == (illegal > 0)


def test_the_pair_protocol_keeps_the_numpy_path(tmp_path):
    cfg = RunConfig("1xUT_1xTFT", num_iterations=4, num_runs=1, protocol="pair", episode_length=2, output=tmp_path)
    engine, _ = build_engine(cfg, [0], build_groups)
    assert engine._kernels is None
    engine.step()
