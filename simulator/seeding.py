"""The one entry point for randomness: one SeedSequence per run, spawned per agent.

    SeedSequence(seed, spawn_key=(run,))
        .spawn(1 + N) -> [protocol stream, agent 0, ..., agent N-1]
The protocol stream draws the initial env_state and then every iteration's uniforms (simulator/engine.py);
agent streams draw each agent's own initial weights. A draw that belongs to a run rather than to one decision (an LLM
run's random action tokens, its engine seed) comes from `side_stream` of a stream: a spawned child, so the parent's
own draws stay exactly what they were. Run k's streams do not depend on how many runs there
are or how they are batched, so any run can be recomputed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.errors import ConfigError


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class RunStreams:
    run: int
    entropy: int
    protocol: np.random.Generator
    agents: tuple[np.random.Generator, ...]


def run_streams(seed: int, run: int, num_agents: int) -> RunStreams:
    root = np.random.SeedSequence(check_seed(seed), spawn_key=(run,))
    protocol, *agents = root.spawn(1 + num_agents)
    return RunStreams(
        run, root.entropy, np.random.default_rng(protocol), tuple(np.random.default_rng(a) for a in agents)  # type: ignore[arg-type]
    )


def initial_state(protocol: np.random.Generator, num_agents: int) -> np.ndarray:
    """env_state starts random (DESIGN section 1): the protocol stream's first draw."""
    return protocol.integers(0, 2, num_agents).astype(np.int8)


def side_stream(stream: np.random.Generator) -> np.random.Generator:
    """A child of `stream` for a run-level draw; `stream` itself draws the same numbers as without it."""
    return stream.spawn(1)[0]
