"""Contracts between the engine and the agents: actions, decision reasons, and the agent-group protocol.

The engine (simulator/engine.py) runs the protocol of DESIGN section 1 for R runs of one population at once.
Agents never see the engine; they come as *groups*: one object decides and learns for a set of population
slots across all R runs, so a group of 16 DQN agents x 20 runs is one stacked network call, and a group of
LLM agents is one batched generation call. A new agent kind is a new group; the engine does not change.

Shapes: R runs, N agents, G = len(group.slots). Randomness arrives as uniforms in [0, 1) drawn by the engine
from each run's protocol stream, so decisions are reproducible whatever the batching.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


class Action(IntEnum):
    C = 0  # cooperate
    D = 1  # defect


class Reason(IntEnum):
    """Why a move or a partner choice was made (the anchor's 'decision type', kept as a column)."""

    GREEDY = 0  # argmax of the learner's values
    EXPLORE = 1  # epsilon exploration
    FIRST = 2  # uniformly random: the learner has learned nothing yet (iteration 0)
    STATIC = 3  # a fixed strategy
    POLICY = 4  # sampled from a stochastic policy (LLM)
    ILLEGAL = 5  # LLM answer was not a legal action token; the move defaults to D

REASON_NAMES: tuple[str, ...] = tuple(r.name.lower() for r in Reason)


@dataclass(frozen=True)
class SelectionBatch:
    """All partner choices of a group in one iteration."""

    iteration: int
    state: np.ndarray  # (R, G, N-1) int8: the other agents' snapshot moves, slot order with self removed
    u: np.ndarray  # (R, G, 2) float: [explore coin, uniform partner coin]


@dataclass(frozen=True)
class DilemmaBatch:
    """All dilemma decisions of a group's members in one iteration (a member may play several games)."""

    iteration: int
    run: np.ndarray  # (K,) run index of each decision
    member: np.ndarray  # (K,) index into group.slots
    opponent: np.ndarray  # (K,) opponent's population slot
    state: np.ndarray  # (K,) int8: opponent's move in the snapshot (the dilemma state)
    own_prev: np.ndarray  # (K,) int8: this agent's own move in the snapshot
    u: np.ndarray  # (K, 2) float: [explore coin, action coin]
    first: bool = False  # no move has been played yet: the snapshot is the random initial state (population
    # protocol, iteration 0). In the pair protocol every episode's drawn state stands for last round's moves.
    reasoned: np.ndarray | None = None  # (K,) bool: the decision's moral type scores a stated reason (VR, Game+VR:
    # simulator.rewards.REASON_TYPES); such a decision's Decisions.reward_term must be given. None: no such decision.


@dataclass(frozen=True)
class Decisions:
    choice: np.ndarray  # (K,) or (R, G) int: action (0=C, 1=D) or partner index among the N-1 others
    reason: np.ndarray  # same shape, int8 Reason codes
    extra: dict[str, np.ndarray] | None = None  # optional per-decision columns (LLM: raw answer, ...)
    reward_term: np.ndarray | None = None  # (K,) float: added to the moral reward of the decisions whose batch.reasoned
    # is true (the LLM group's weighted virtue score of the stated reason); ignored elsewhere


@dataclass(frozen=True)
class Transitions:
    """One iteration's learning data for a group. Dilemma rows are in game order."""

    iteration: int
    # selection: one per member and run
    sel_state: np.ndarray  # (R, G, N-1) int8
    sel_choice: np.ndarray  # (R, G) partner index among the others
    sel_reward: np.ndarray  # (R, G) learning reward of the game the member selected
    sel_next_state: np.ndarray  # (R, G, N-1) int8: next iteration's selection state
    # dilemma: one per game played, as selector or selected
    run: np.ndarray  # (K,)
    member: np.ndarray  # (K,)
    state: np.ndarray  # (K,) int8 opponent's snapshot move
    action: np.ndarray  # (K,) int8
    reward: np.ndarray  # (K,) learning reward
    next_state: np.ndarray  # (K,) int8 opponent's action in that game


@runtime_checkable
class AgentGroup(Protocol):
    """A set of population slots played by one kind of agent, for all R runs of a batch.

    Call order (simulator/engine.py PopulationEngine.step, simulator/driver.py run_batch):
        construction by the factory; then restore(run_dirs) when resuming, if the group is a RestoresState
        per iteration t = 0 .. T-1:  select -> act -> learn -> end_iteration
            each phase runs for every group before the next; learn only for groups with learns=True
        save(run_dirs) once, after the last iteration, if the group is a SavesState
        close() always, last, also after a failure, if the group is a HoldsResources (Ray actors, engines)
        state_dict() / load_state_dict() at checkpoints, between iterations, if the group is Checkpointable
    """

    slots: np.ndarray  # (G,) population indices this group plays
    learns: bool  # whether learn() does anything (static strategies do not)
    # a group that plays REASON_TYPES returns Decisions.reward_term; the Population checks that only LLM agents do

    def select(self, batch: SelectionBatch) -> Decisions: ...

    def act(self, batch: DilemmaBatch) -> Decisions: ...

    def learn(self, transitions: Transitions) -> dict[str, float] | None: ...

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        """Called after env_state is updated; new_state is (R, N) int8."""
        ...


@runtime_checkable
class SavesState(Protocol):
    """Optional: a group with state worth keeping (LLM adapters) writes it beside each run's records.

    Called once, after the last iteration; run_dirs[i] is the (staging) directory of the batch's i-th run.
    """

    def save(self, run_dirs: list[Path]) -> None: ...


@runtime_checkable
class RestoresState(Protocol):
    """Optional: a group that can resume loads what save() wrote into run_dirs.

    Called once, after construction and before the first iteration, only when resuming.
    """

    def restore(self, run_dirs: list[Path]) -> None: ...


@runtime_checkable
class StatefulGroup(SavesState, RestoresState, Protocol):
    """A group whose runs can be saved and resumed: both save() and restore()."""


@runtime_checkable
class HoldsResources(Protocol):
    """Optional: a group that holds resources beyond its own memory (Ray actors and their placement group)
    releases them in close(). Called once at the end of the batch, also when it failed."""

    def close(self) -> None: ...


@runtime_checkable
class Checkpointable(Protocol):
    """Optional: a group whose state cannot simply be pickled (it holds engines or Ray actors) gives its learning
    state as picklable data, and continues from it. The driver checkpoints every other group by pickling it whole.
    Called between iterations only (after end_iteration)."""

    def state_dict(self) -> object: ...

    def load_state_dict(self, state: object) -> None: ...
