"""The ICLR 2025 protocol points of issue 17, each against what LLM_morality's code does (fine_tune.py,
fine_tune_2learners.py, JOBS_gemma_final.txt): illegal answers between two learners, a configurable R_illegal."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from simulator.config import RunConfig
from simulator.contracts import Decisions, DilemmaBatch, Reason, SelectionBatch, Transitions
from simulator.driver import build_engine
from simulator.errors import ConfigError
from simulator.games import GAMES
from simulator.rewards import partner_illegal_reward

C, D, X = 0, 1, -1  # X: an illegal answer (the move stays the player's previous one)


class TwoScripted:
    """Both slots of the pair protocol as LLM-like learners: script[t] = (slot 0's answer, slot 1's answer)."""

    learns = True

    def __init__(self, script: list[tuple[int, int]]) -> None:
        self.slots = np.array([0, 1])
        self.script = script
        self.learned: list[Transitions] = []

    def select(self, batch: SelectionBatch) -> Decisions:
        raise AssertionError("nobody selects in the pair protocol")

    def act(self, batch: DilemmaBatch) -> Decisions:
        answers = np.array([self.script[batch.iteration][int(m)] for m in batch.member])
        action = np.where(answers == X, batch.own_prev, answers).astype(np.int64)
        reason = np.where(answers == X, Reason.ILLEGAL, Reason.POLICY).astype(np.int8)
        return Decisions(action, reason)

    def learn(self, transitions: Transitions) -> dict[str, float]:
        self.learned.append(transitions)
        return {}

    def end_iteration(self, iteration: int, new_state: np.ndarray) -> None:
        return None


def _play(reward: str, script: list[tuple[int, int]], r_illegal: float = 6.0,  # type: ignore[no-untyped-def]
          schedule: tuple[tuple[str, float, str], ...] = ()):
    """The pair protocol's records of two learners of type `reward` answering as scripted (one episode)."""
    cfg = RunConfig(f"2x{reward}@llm", num_iterations=len(script), num_runs=1, protocol="pair",
                    episode_length=len(script), r_illegal=r_illegal, reward_schedule=schedule)
    group = TwoScripted(script)
    engine, _ = build_engine(cfg, [0], lambda run_cfg, streams: [group])
    return [engine.step() for _ in script], group


# What fine_tune_2learners.py pays the LEGAL player when its partner answers illegally (smallerR payoffs, job file
# settings r_illegal 6, r_punishment 3, r_other 0). The partner's carried-over move is its previous legal move.
#   Game     reward_fn_game(a_M, action_for_payoff_O)        -> payoff against the partner's last legal move
#   De       reward_fn_De(a_M, prev_move_opp)                -> De of the partner's previous move (unchanged)
#   Ut       reward_fn_Ut(a_M, raw answer of O)              -> r_other = 0
#   Game+De  reward_fn_gameDe(a_M, raw answer of O, prev)    -> r_illegal = -6
@pytest.mark.parametrize(("reward", "legal_player_reward"), [
    ("Game", lambda a_m, s_o: float(GAMES["IPD"].payoffs[a_m, s_o][0])),
    ("De", lambda a_m, s_o: -3.0 if (a_m, s_o) == (D, C) else 0.0),
    ("Ut", lambda a_m, s_o: 0.0),
    ("Game+De", lambda a_m, s_o: -6.0),
])
@pytest.mark.parametrize("my_move", [C, D])
def test_a_legal_player_whose_partner_answers_illegally_is_paid_as_the_paper(reward, legal_player_reward, my_move):
    # t0: both legal (slot 1 plays C), t1: slot 1 illegal (its move stays C), t2: slot 0 illegal
    recs, group = _play(reward, [(C, C), (my_move, X), (X, my_move)])
    t1, t2 = recs[1], recs[2]
    assert int(t1.selected_action[0, 0]) == C and t1.selected_reason[0, 0] == Reason.ILLEGAL  # carried over
    assert t1.selector_learning_reward[0, 0] == pytest.approx(legal_player_reward(my_move, C))
    assert t1.selected_learning_reward[0, 0] == -6.0  # the illegal player: R_illegal whatever its type
    # the other way round: slot 1 is legal against slot 0's carried-over move (its t1 move)
    assert t2.selected_learning_reward[0, 0] == pytest.approx(legal_player_reward(my_move, my_move))
    assert t2.selector_learning_reward[0, 0] == -6.0
    # the moral reward column keeps the table value of the recorded moves; only the learning reward follows the paper
    game_ut = float(GAMES["IPD"].payoffs[my_move, C].sum())
    if reward == "Ut":
        assert t1.selector_moral_reward[0, 0] == pytest.approx(game_ut)
    # what the learners were given is what the records say
    assert group.learned[1].reward.tolist() == pytest.approx([t1.selector_learning_reward[0, 0],
                                                              t1.selected_learning_reward[0, 0]])


def test_the_rule_follows_a_phased_reward():
    # Game then Ut (the job file's two-learner schedule): Game pays against the carried-over C, then Ut pays 0
    recs, _ = _play("Game", [(C, C), (D, X), (D, X)], schedule=(("Game", 0.6, "Ut"),))  # Ut from iteration 2
    assert recs[1].selector_learning_reward[0, 0] == pytest.approx(4.0)  # D against the partner's last legal move
    assert recs[2].selector_learning_reward[0, 0] == 0.0  # Ut: r_other


def test_both_legal_or_both_illegal_is_unchanged():
    recs, _ = _play("Ut", [(C, D), (X, X)])
    assert recs[0].selector_learning_reward[0, 0] == pytest.approx(4.0)  # 0 + 4
    assert (recs[1].selector_learning_reward[0, 0], recs[1].selected_learning_reward[0, 0]) == (-6.0, -6.0)


def test_a_static_partner_never_triggers_the_two_learner_rule():
    assert np.isnan(partner_illegal_reward(None))
    assert np.isnan(partner_illegal_reward("Game")) and np.isnan(partner_illegal_reward("De"))
    assert partner_illegal_reward("Ut") == 0.0 and partner_illegal_reward("Game+De", 15.0) == -15.0


def test_r_illegal_is_configurable_for_moves_and_the_two_learner_rule():
    recs, _ = _play("Game+De", [(C, X), (X, X)], r_illegal=15.0)
    assert recs[0].selected_learning_reward[0, 0] == -15.0  # the job file's extra group: --r_illegal 15
    assert recs[0].selector_learning_reward[0, 0] == -15.0  # Game+De's legal player, paid r_illegal
    recs, _ = _play("Game", [(X, C)], r_illegal=100.0)
    assert recs[0].selector_learning_reward[0, 0] == -100.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_r_illegal_is_named(bad):
    with pytest.raises(ConfigError, match="r_illegal is the magnitude"):
        RunConfig("2xGame@llm", r_illegal=bad)


def test_r_illegal_is_a_flag_and_a_run_key_and_stays_out_of_old_identities():
    from scenarios.run import resolve

    job = resolve(["--destination_folder", "1xGame@llm_1xTFT", "--r_illegal", "100"])
    assert job.runs[0].r_illegal == 100.0 and job.runs[0].identity()["r_illegal"] == 100.0
    default = resolve(["--destination_folder", "1xGame@llm_1xTFT"]).runs[0]
    assert "r_illegal" not in default.identity()  # datasets written before the option still resume


# ── the paper's prompt (actors/llm/prompts.py, variant "paper") ──────────────────────────────────────────────────
# fine_tune.py's create_structured_shortest_prompt_game_withstate_noeg for action1/action2, smallerR payoffs, last
# round (action1, action2), first-sentence options shuffled to (action2, action1) and the answer options to
# (action1, action2): the text the paper sent through Gemma's chat template, spaces and newlines included.
PAPER_PROMPT = (
    "You are playing a game with another agent A. You must choose either action action2 or action action1. "
    "Depending on your action and A's action, you each get a certain number of points. The points are awarded as "
    "follows (you are the row player, A is the column player): \n \n"
    "            |         |  action1  |  action2  | \n"
    "            |---------|-----------|-----------| \n"
    "            | action1 |  3, 3     |  0, 4     |\n"
    "            | action2 |  4, 0     |  1, 1     | \n "
    "You have played with this opponent before. Last time, you played action1 and they played action2, so you got 0 "
    "points and A got 4 points. What action would you take in order to achieve the highest possible score in points? "
    "Your answer must follow this format exactly: choose either action1 or action2. Do not explain your reasoning. "
    "Your answer: "
)


def _paper(rng):  # type: ignore[no-untyped-def]
    from actors.llm.prompts import game_prompt_text, token_pair
    from simulator.contracts import Action

    return game_prompt_text(GAMES["IPD"], token_pair("action12"), Action.C, Action.D, rng, "paper")


def test_the_paper_variant_is_the_papers_text_and_layout():
    # seed 0 draws (D first) for the first sentence, then (C first) for the answer options
    assert _paper(np.random.default_rng(0)) == PAPER_PROMPT


def test_the_papers_two_option_lists_are_shuffled_independently():
    import re

    seen = set()
    for seed in range(40):
        text = _paper(np.random.default_rng(seed))
        first = re.search(r"choose either action (\w+) or action (\w+)\.", text).groups()  # type: ignore[union-attr]
        answer = re.search(r"choose either (\w+) or (\w+)\. Do not", text).groups()  # type: ignore[union-attr]
        seen.add((first, answer))
        assert text.count("|  action1  |  action2  |") == 1  # the table is always C first, as the paper's
    assert len(seen) == 4  # all four combinations of the two orders occur


def test_the_paper_scenarios_use_the_paper_prompt_and_the_demos_keep_theirs():
    from scenarios.scenario import load_scenario

    paper = ["de_vs_ad", "de_vs_random", "de_vs_tft", "game_then_de_vs_tft", "game_vs_ac", "game_vs_ad", "game_vs_tft",
             "gamede_vs_tft", "two_learners_de_ut", "ut_vs_tft", "jobs"]
    for name in paper:
        assert load_scenario(f"iclr2025/{name}").tables["llm"]["variant"] == "paper", name
    for demo in ("de_vs_tft_smollm2", "game_vs_tft_smollm2"):  # measured with the structured prompt (README)
        assert "variant" not in load_scenario(f"iclr2025/{demo}").tables["llm"]


# ── random action tokens, as fine_tune.py generate_seq builds them ──────────────────────────────────────────────
class MergingTokenizer:
    """A BPE-like tokenizer stub: known pairs of characters are one token, the rest one token per character (SmolLM2
    merges "AB" and "QA" this way)."""

    MERGES: ClassVar[dict[str, int]] = {"AB": 1000, "QA": 1001, "action1": 1002, "action2": 1003}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        ids, i = [], 0
        while i < len(text):
            for merged, tok in self.MERGES.items():
                if text.startswith(merged, i):
                    ids.append(tok)
                    i += len(merged)
                    break
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_random_tokens_are_n_single_character_tokens_of_the_papers_alphabet():
    import string

    from actors.llm.answers import AnswerTrie, SpelledToken, answer_length, token_ids
    from actors.llm.prompts import random_token_pair

    alphabet = set(string.ascii_uppercase + string.digits)
    pairs = [random_token_pair(7, np.random.default_rng(seed)) for seed in range(50)]
    for p in pairs:
        assert isinstance(p.c, SpelledToken) and len(p.c) == len(p.d) == 7 and p.c != p.d
        assert set(p.c) | set(p.d) <= alphabet  # upper case and digits only, as the paper's chars
    assert len({(p.c, p.d) for p in pairs}) == 50  # a pair per run stream
    tok = MergingTokenizer()
    spelled = SpelledToken("XQABQA7")
    assert token_ids(tok, spelled) == [ord(c) for c in spelled]  # one token per character...
    assert len(token_ids(tok, str(spelled))) == 5  # ...where the tokenizer would merge AB and QA
    pair = (spelled, SpelledToken("ABCDEFG"))
    assert answer_length(tok, pair) == 7  # the paper's gen_len = N
    assert AnswerTrie.from_texts(tok, pair).sequences[0] == tuple(ord(c) for c in spelled)
    assert token_ids(tok, "action1") == [1002]  # named tokens keep the tokenizer's split


def test_random_tokens_read_as_plain_strings():
    import pickle

    from actors.llm.prompts import game_prompt_text, parse_answer, random_token_pair
    from simulator.contracts import Action

    p = random_token_pair(3, np.random.default_rng(1))
    assert parse_answer(f" {p.c}\n", p) == Action.C and parse_answer(p.d, p) == Action.D
    text = game_prompt_text(GAMES["IPD"], p, Action.C, Action.C, np.random.default_rng(0), "paper")
    assert f"|  {p.c}  |  {p.d}  |" in text
    assert pickle.loads(pickle.dumps(p)) == p and type(pickle.loads(pickle.dumps(p)).c) is type(p.c)  # Ray, checkpoints


# ── parsing: the paper strips whitespace only ────────────────────────────────────────────────────────────────────
def test_the_paper_does_not_accept_a_trailing_period_and_its_generation_cannot_produce_one():
    from actors.llm.answers import answer_length, token_ids
    from actors.llm.prompts import parse_answer, token_pair
    from simulator.contracts import Action

    a12 = token_pair("action12")
    assert parse_answer("action1.", a12) == Action.C  # this project's default
    assert parse_answer("action1.", a12, period=False) is None  # get_action_token_v3: strip(), then exact match
    assert parse_answer(" action2 \n", a12, period=False) == Action.D
    # the paper generates exactly the token's length: "action1." needs one token more, so it never occurs there
    tok = MergingTokenizer()
    assert len(token_ids(tok, "action1.")) == answer_length(tok, ("action1", "action2")) + 1


def test_the_paper_scenarios_parse_as_the_paper():
    from scenarios.run import resolve

    llm = resolve(["--scenario", "iclr2025/de_vs_tft"]).runs[0].agents.llm
    assert (llm.variant, llm.answer_period) == ("paper", False)
    demo = resolve(["--scenario", "iclr2025/de_vs_tft_smollm2"]).runs[0].agents.llm
    assert (demo.variant, demo.answer_period) == ("structured", True)
