"""The ICLR 2025 pair protocol (simulator/engine.py): one game per iteration, episodes with a fresh state.

Expected sequences follow LLM_morality's fine_tune.py: each episode draws the state afresh (AC starts from C, AD
from D, anyone else at random), TFT copies the learner's last move (also the drawn one at an episode's start), and
the state carries over from game to game within an episode.
"""

from __future__ import annotations

import numpy as np
import pytest

from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.contracts import Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions
from simulator.driver import build_engine, run_sweep
from simulator.errors import ConfigError
from tests.helpers import read_dataset

C, D = 0, 1


class Scripted:
    """Slot 0 plays a fixed move sequence; records what it was shown (a Concordia-style scripted agent)."""

    learns = True

    def __init__(self, moves: list[int]) -> None:
        self.slots = np.array([0])
        self.moves = moves
        self.seen: list[tuple[int, int, int, bool]] = []  # (iteration, state, own_prev, first)
        self.learned: list[Transitions] = []

    def select(self, batch: SelectionBatch) -> Decisions:
        raise AssertionError("nobody selects in the pair protocol")

    def act(self, batch: DilemmaBatch) -> Decisions:
        self.seen += [(batch.iteration, int(s), int(o), batch.first) for s, o in zip(batch.state, batch.own_prev, strict=True)]
        a = np.full(batch.run.shape, self.moves[batch.iteration])
        return Decisions(a, np.full(a.shape, Reason.POLICY, dtype=np.int8))

    def learn(self, transitions: Transitions) -> dict[str, float]:
        self.learned.append(transitions)
        return {}

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None


def _engine(opponent: str, moves: list[int], episode_length: int, seed: int = 0):  # type: ignore[no-untyped-def]
    cfg = RunConfig(f"1xDe_1x{opponent}", num_iterations=len(moves), num_runs=1, seed=seed, protocol="pair",
                    episode_length=episode_length)
    scripted = Scripted(moves)

    def factory(run_cfg, streams):  # type: ignore[no-untyped-def]
        from actors.static import StaticGroup

        return [scripted, StaticGroup(np.array([1]), [opponent], len(streams))]

    engine, _ = build_engine(cfg, [0], factory)
    return engine, scripted


def test_one_game_per_iteration_with_the_learner_as_row_player():
    engine, _ = _engine("TFT", [C, D, D, C, C, D], episode_length=3)
    recs = [engine.step() for _ in range(6)]
    assert all(r.selector.shape == (1, 1) and int(r.selector[0, 0]) == 0 and int(r.selected[0, 0]) == 1 for r in recs)


def test_tft_copies_the_learner_within_an_episode_and_the_drawn_state_at_its_start():
    moves = [C, D, D, C, C, D, D, D, C]
    engine, scripted = _engine("TFT", moves, episode_length=3)
    recs = [engine.step() for _ in moves]
    tft = [int(r.selected_action[0, 0]) for r in recs]
    for t, (it, state, own_prev, first) in enumerate(scripted.seen):
        assert it == t and not first  # every episode's drawn state stands for last round's moves
        if t % 3 == 0:  # episode start: TFT copies the learner's drawn last move
            assert tft[t] == own_prev
        else:  # within the episode: the learner's move of the previous game, and the state carried over
            assert tft[t] == moves[t - 1] == own_prev
            assert state == tft[t - 1]


@pytest.mark.parametrize(("opponent", "move"), [("AC", C), ("AD", D)])
def test_fixed_strategies_start_every_episode_from_their_own_move(opponent, move):
    engine, scripted = _engine(opponent, [D] * 12, episode_length=4)
    for _ in range(12):
        engine.step()
    assert {state for it, state, _, _ in scripted.seen if it % 4 == 0} == {move}


def test_the_learners_own_drawn_state_is_random_across_episodes():
    engine, scripted = _engine("AC", [C] * 400, episode_length=2)
    for _ in range(400):
        engine.step()
    drawn = [own for it, _, own, _ in scripted.seen if it % 2 == 0]
    assert 0.35 < np.mean(drawn) < 0.65


def test_pair_protocol_through_the_driver_writes_one_row_per_game(tmp_path):
    cfg = RunConfig("1xUT_1xTFT", num_iterations=20, num_runs=2, seed=1, output=tmp_path, protocol="pair",
                    episode_length=5)
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    df = read_dataset(cfg.dataset_dir)
    assert df.height == 2 * 20
    assert set(df["selector"].unique()) == {0} and set(df["selected"].unique()) == {1}
    assert sorted(df.filter(df["run"] == 0)["iteration"].to_list()) == list(range(20))


def test_bad_protocol_settings_are_named():
    with pytest.raises(ConfigError, match="two agents"):
        RunConfig("1xUT_1xTFT_1xAC", protocol="pair")
    with pytest.raises(ConfigError, match="population, pair"):
        RunConfig("1xUT_1xTFT", protocol="triad")
    with pytest.raises(ConfigError, match="needs protocol"):
        RunConfig("1xUT_1xTFT", episode_length=5)


def test_population_protocol_is_unchanged_by_default():
    cfg = RunConfig("1xUT_1xTFT")
    assert "protocol" not in cfg.identity() and "episode_length" not in cfg.identity()  # old datasets still resume
    assert cfg.games_per_iteration == 2
