"""Turns a population into agent groups: the only place that knows which class plays which code.

The run driver (simulator/driver.py) receives `build_groups` and never imports actors itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from actors.dqn import DQNConfig, DQNGroup
from actors.static import StaticGroup
from actors.tabular import TabularConfig, TabularGroup
from simulator.contracts import AgentGroup
from simulator.errors import ConfigError
from simulator.games import GAMES, Game
from simulator.population import Population
from simulator.seeding import RunStreams


@dataclass(frozen=True)
class AgentSettings:
    """Learner settings shared by every learning agent of a run."""

    dqn: DQNConfig = field(default_factory=DQNConfig)
    tabular: TabularConfig = field(default_factory=TabularConfig)
    random_matching: bool = False
    llm: Any = None  # actors.llm.agent.LLMAgentConfig; typed loosely so DQN-only runs never import the LLM stack
    game: Game = field(default_factory=lambda: GAMES["IPD"])  # the game LLM prompts describe
    seed: int = 0


def build_groups(population: Population, streams: Sequence[RunStreams], settings: AgentSettings) -> list[AgentGroup]:
    """One group per agent kind present; slots keep the population's order."""
    kinds: dict[str, list[int]] = {}
    for slot, agent in enumerate(population.agents):
        kinds.setdefault("static" if agent.is_static else str(agent.learner), []).append(slot)
    groups: list[AgentGroup] = []
    n = population.size
    for kind, slots_list in kinds.items():
        slots = np.array(slots_list)
        if kind == "static":
            groups.append(StaticGroup(slots, [population.agents[s].code for s in slots], len(streams)))
        elif kind == "dqn":
            cfg = replace(settings.dqn, learn_selection=not settings.random_matching)
            rngs = [[st.agents[s] for s in slots] for st in streams]
            groups.append(DQNGroup(slots, n, rngs, cfg))
        elif kind == "tabularQ":
            cfg_t = replace(settings.tabular, learn_selection=not settings.random_matching)
            groups.append(TabularGroup(slots, n, len(streams), cfg_t))
        elif kind == "llm":
            from actors.llm.agent import LLMAgentConfig, LLMGroup

            rngs = [[st.agents[s] for s in slots] for st in streams]
            groups.append(LLMGroup(slots, n, settings.game, rngs, settings.llm or LLMAgentConfig(),
                                   codes=[population.agents[s].code for s in slots]))
        else:
            raise ConfigError(f"unknown learner kind {kind!r}; valid: static, dqn, tabularQ, llm")
    return groups

