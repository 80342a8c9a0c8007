from __future__ import annotations

import pytest

from simulator.env import DilemmaEnv
from simulator.errors import UnknownNameError
from tests.helpers import need


def test_pettingzoo_parallel_api():
    parallel_api_test = need("pettingzoo.test").parallel_api_test  # type: ignore[attr-defined]
    parallel_api_test(DilemmaEnv("IPD", rewards=("DE", "UT"), max_cycles=25), num_cycles=100)


def test_rewards_and_observations():
    env = DilemmaEnv("IPD", rewards=("UT", "DE"), max_cycles=3)
    obs, _ = env.reset(seed=1)
    assert obs == {"player_0": 2, "player_1": 2}
    obs, rew, _, _, info = env.step({"player_0": 0, "player_1": 1})
    assert obs == {"player_0": 1, "player_1": 0}
    assert rew == {"player_0": 4.0, "player_1": 0.0}  # first round: no previous move, nobody betrayed
    assert info["player_1"]["payoff"] == 4.0
    obs, rew, *_ = env.step({"player_0": 0, "player_1": 1})
    assert rew["player_1"] == -5.0  # player_0 cooperated last round, player_1 defects: DE penalty
    _, _, _, trunc, _ = env.step({"player_0": 1, "player_1": 1})
    assert all(trunc.values()) and env.agents == []


def test_bad_inputs():
    with pytest.raises(UnknownNameError):
        DilemmaEnv("IPD", rewards=("UT", "XX"))
    env = DilemmaEnv()
    env.reset()
    with pytest.raises(ValueError, match="0 \\(C\\) or 1 \\(D\\)"):
        env.step({"player_0": 3, "player_1": 0})
