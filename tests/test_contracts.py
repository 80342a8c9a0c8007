"""The agent-group contract (simulator/contracts.py): the optional state protocols and the call order kept by the
engine and the driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.contracts import AgentGroup, RestoresState, SavesState, StatefulGroup
from simulator.driver import run_batch, run_dir


class Recorder:
    """Delegates to a real group and logs every call."""

    def __init__(self, inner: AgentGroup, log: list[tuple]) -> None:
        self.inner, self.log = inner, log
        self.slots, self.learns = inner.slots, inner.learns

    def select(self, batch):  # type: ignore[no-untyped-def]
        self.log.append(("select", batch.iteration))
        return self.inner.select(batch)

    def act(self, batch):  # type: ignore[no-untyped-def]
        self.log.append(("act", batch.iteration))
        return self.inner.act(batch)

    def learn(self, transitions):  # type: ignore[no-untyped-def]
        self.log.append(("learn", transitions.iteration))
        return self.inner.learn(transitions)

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        self.log.append(("end_iteration", iteration))
        self.inner.end_iteration(iteration, new_state)


class SavingRecorder(Recorder):
    def save(self, run_dirs: list[Path]) -> None:
        self.log.append(("save", tuple(run_dirs)))
        for d in run_dirs:
            (d / "group-state.txt").write_text("saved")


def test_state_protocols_are_structural() -> None:
    from actors.llm.agent import LLMGroup

    assert issubclass(LLMGroup, SavesState)  # LLMGroup.save(run_dirs) writes its adapters
    assert issubclass(SavingRecorder, SavesState)
    assert not issubclass(Recorder, SavesState)
    assert not issubclass(SavingRecorder, StatefulGroup)  # a resumable group also needs restore()

    class Resumable(SavingRecorder):
        def restore(self, run_dirs: list[Path]) -> None: ...

    assert issubclass(Resumable, RestoresState) and issubclass(Resumable, StatefulGroup)


def test_call_order_and_save_after_the_last_iteration(tmp_path: Path) -> None:
    cfg = RunConfig("1xUT_1xDE_1xTFT", num_iterations=3, num_runs=2, seed=3, output=tmp_path)
    learner_log: list[tuple] = []
    static_log: list[tuple] = []

    def factory(cfg, streams):  # type: ignore[no-untyped-def]
        groups = build_groups(cfg, streams)
        assert [g.learns for g in groups] == [True, False]
        return [SavingRecorder(groups[0], learner_log), Recorder(groups[1], static_log)]

    run_batch(cfg, [0, 1], factory)
    phases = ["select", "act", "learn", "end_iteration"]
    assert learner_log[:-1] == [(phase, t) for t in range(3) for phase in phases]
    assert static_log == [(phase, t) for t in range(3) for phase in phases if phase != "learn"]  # learns=False
    name, run_dirs = learner_log[-1]
    assert name == "save" and len(run_dirs) == 2
    for r in (0, 1):  # saved into the staging directories, which then became the runs' directories
        assert (Path(run_dir(cfg, r)) / "group-state.txt").read_text() == "saved"
