"""Turns a run's population into agent groups: the only place that knows which class plays which code.

The run driver (simulator/driver.py) receives `build_groups` and never imports actors itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from actors.static import StaticGroup
from simulator.config import RunConfig
from simulator.contracts import AgentGroup
from simulator.errors import ConfigError
from simulator.seeding import RunStreams


def build_groups(cfg: RunConfig, streams: Sequence[RunStreams]) -> list[AgentGroup]:
    """One group per agent kind present in cfg.population (already resolved and checked); slots keep its order.
    Each learner group gets its own settings from cfg.agents (scenarios.run.AgentConfigs)."""
    from scenarios.run import AgentConfigs

    agents = cfg.agents or AgentConfigs()
    population = cfg.population
    kinds: dict[str, list[int]] = {}
    for slot, agent in enumerate(population.agents):
        kinds.setdefault("static" if agent.is_static else str(agent.learner), []).append(slot)
    groups: list[AgentGroup] = []
    n = population.size
    for kind, slots_list in kinds.items():
        slots = np.array(slots_list)
        rngs = [[st.agents[s] for s in slots] for st in streams]
        if kind == "static":
            groups.append(StaticGroup(slots, [population.agents[s].code for s in slots], len(streams)))
        elif kind == "dqn":
            from actors.dqn import DQNGroup

            groups.append(DQNGroup(slots, n, rngs, replace(agents.dqn, learn_selection=cfg.learns_selection)))
        elif kind == "tabularQ":
            from actors.tabular import TabularGroup

            tabular = replace(agents.tabular, learn_selection=cfg.learns_selection)
            groups.append(TabularGroup(slots, n, len(streams), tabular))
        elif kind == "llm":
            from actors.llm.agent import LLMGroup
            from actors.llm.config import LLMAgentConfig

            groups.append(LLMGroup(slots, n, cfg.game, rngs, agents.llm or LLMAgentConfig(),
                                   codes=[population.agents[s].code for s in slots]))
        else:
            raise ConfigError(f"unknown learner kind {kind!r}; valid: static, dqn, tabularQ, llm")
    return groups
