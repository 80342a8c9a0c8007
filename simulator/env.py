"""One social dilemma between two agents as a PettingZoo-style parallel environment.

Outside RL code can train on a moralsim game and reward without the population machinery:

    env = DilemmaEnv("IPD", rewards=("UT", "S"), max_cycles=100)
    obs, infos = env.reset(seed=0)
    while env.agents:
        obs, rew, term, trunc, infos = env.step({a: env.action_space(a).sample() for a in env.agents})

Observation of each player: the opponent's previous move (0 = C, 1 = D, 2 = none yet), as in the
population protocol's dilemma state. Reward: the player's moral reward (simulator.rewards); infos carry the
game payoffs. When PettingZoo is installed the class is a real `pettingzoo.ParallelEnv`.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces

from simulator.games import Game, get_game
from simulator.rewards import moral_reward
from simulator.seeding import check_seed

try:
    from pettingzoo import ParallelEnv as _Base
except ImportError:  # the env works without PettingZoo; only the base class is missing
    _Base = object  # type: ignore[assignment,misc]

NO_MOVE = 2


class DilemmaEnv(_Base):  # type: ignore[misc,valid-type]
    metadata: ClassVar[dict[str, Any]] = {"name": "moralsim_dilemma_v0", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(self, game: str | Game = "IPD", rewards: tuple[str, str] = ("S", "S"), max_cycles: int = 100,
                 render_mode: str | None = None) -> None:
        self.game = game if isinstance(game, Game) else get_game(game)
        for code in rewards:
            moral_reward(code, 0, 0, 0.0, 0.0, 0)  # validates the code, with the list of valid ones if wrong
        self.reward_codes = tuple(rewards)
        self.max_cycles = max_cycles
        self.render_mode = render_mode
        self.possible_agents = ["player_0", "player_1"]
        self.agents: list[str] = []
        self._last = np.array([NO_MOVE, NO_MOVE])
        self._t = 0
        self.np_random = np.random.default_rng()

    @functools.cache  # noqa: B019 - PettingZoo asks for the same space object every call
    def observation_space(self, agent: str) -> spaces.Discrete:
        return spaces.Discrete(3)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Discrete:
        return spaces.Discrete(2)

    def _obs(self) -> dict[str, int]:
        return {"player_0": int(self._last[1]), "player_1": int(self._last[0])}

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
        if seed is not None:
            self.np_random = np.random.default_rng(check_seed(seed))
            for i, a in enumerate(self.possible_agents):
                self.action_space(a).seed(check_seed(seed) + i)
        self.agents = list(self.possible_agents)
        self._last = np.array([NO_MOVE, NO_MOVE])
        self._t = 0
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, int]):  # type: ignore[no-untyped-def]
        if not self.agents:
            return {}, {}, {}, {}, {}
        try:
            a0, a1 = int(actions["player_0"]), int(actions["player_1"])
        except KeyError as e:
            raise ValueError(f"step() needs an action for each of {self.agents}, missing {e}") from None
        if a0 not in (0, 1) or a1 not in (0, 1):
            raise ValueError(f"actions must be 0 (C) or 1 (D), got {actions}")
        r0, r1 = self.game.outcome(a0, a1)
        # before the first round there is no previous move: the norm-based rewards (DE, mDE) read it as D,
        # so a first-round defection betrays no one
        s_for_0 = self._last[1] if self._last[1] != NO_MOVE else 1
        s_for_1 = self._last[0] if self._last[0] != NO_MOVE else 1
        rew = {
            "player_0": float(moral_reward(self.reward_codes[0], a0, a1, r0, r1, s_for_0)),
            "player_1": float(moral_reward(self.reward_codes[1], a1, a0, r1, r0, s_for_1)),
        }
        self._last = np.array([a0, a1])
        self._t += 1
        done = self._t >= self.max_cycles
        infos = {"player_0": {"payoff": r0}, "player_1": {"payoff": r1}}
        obs = self._obs()
        term = {a: False for a in self.agents}
        trunc = {a: done for a in self.agents}
        if done:
            self.agents = []
        return obs, rew, term, trunc, infos

    def render(self) -> str | None:
        text = f"t={self._t} last moves: {['CD-'[m] for m in self._last]}"
        if self.render_mode == "ansi":
            return text
        return None

    def state(self) -> np.ndarray:
        return self._last.copy()

    def close(self) -> None:
        pass
