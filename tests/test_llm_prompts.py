"""Game prompts, token pairs and strict answer parsing (actors/llm/prompts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.llm import prompts as P
from simulator.contracts import Action
from simulator.errors import ConfigError, UnknownNameError
from simulator.games import GAMES

A12 = P.TOKEN_PAIRS["action12"]
C, D = Action.C, Action.D

# (answer text, expected parse under action1/action2)
ANSWERS = [
    ("action1", C),
    ("action2", D),
    (" action1", C),
    ("action1\n", C),
    ("\n  action2 \t\n", D),
    ("action1.", C),
    (" action2.\n", D),
    ("action1..", None),
    ("Action1", None),
    ("ACTION2", None),
    ("action 1", None),
    ("action12", None),
    ("action1 action2", None),
    ("action1 or action2", None),
    ("I choose action1", None),
    ("action1, because", None),
    ("'action1'", None),
    ("**action1**", None),
    ("action3", None),
    ("", None),
    (".", None),
    ("   ", None),
]


@pytest.mark.parametrize(("text", "expected"), ANSWERS)
def test_parse_answer_table(text: str, expected: Action | None) -> None:
    assert P.parse_answer(text, A12) == expected


@pytest.mark.parametrize(
    ("pair", "c_text", "d_text", "illegal"),
    [
        ("action34", "action3", "action4", "action1"),
        ("AB", "A", "B", "a"),
        ("BA", "B.", "A", "AB"),
        ("XY", "X\n", " Y", "x"),
        ("01", "0", "1", "01"),
        ("10", "1", "0", "10"),
        ("action21", "action2", "action1", "action3"),
    ],
)
def test_token_pairs_parse_their_own_tokens(pair: str, c_text: str, d_text: str, illegal: str) -> None:
    tp = P.token_pair(pair)
    assert P.parse_answer(c_text, tp) == C
    assert P.parse_answer(d_text, tp) == D
    assert P.parse_answer(illegal, tp) is None


def test_unknown_names_suggest() -> None:
    with pytest.raises(UnknownNameError, match="action12"):
        P.token_pair("action13")
    with pytest.raises(UnknownNameError, match="poetic"):
        P.check_variant("poetc")


def test_bad_token_pairs_rejected() -> None:
    with pytest.raises(ConfigError):
        P.TokenPair("same", "A", "A")
    with pytest.raises(ConfigError):
        P.TokenPair("space", " A", "B")
    with pytest.raises(ConfigError):
        P.random_token_pair(0, np.random.default_rng(0))


def test_random_token_pair_is_seeded_and_distinct() -> None:
    a = P.random_token_pair(7, np.random.default_rng(3))
    b = P.random_token_pair(7, np.random.default_rng(3))
    assert a == b
    assert len(a.c) == len(a.d) == 7 and a.c != a.d
    assert a.c.isascii() and a.c.isalnum()
    assert P.parse_answer(a.c, a) == C and P.parse_answer(a.d + ".", a) == D


@pytest.mark.parametrize("variant", list(P.PROMPT_VARIANTS))
@pytest.mark.parametrize("game_id", ["IPD", "ISH", "BOS", "ICD"])
def test_every_variant_names_both_tokens_and_every_payoff(variant: str, game_id: str) -> None:
    game = GAMES[game_id]
    text = P.game_prompt_text(game, A12, C, D, np.random.default_rng(0), variant)
    for r_m, r_o in game.cells:
        assert f"{r_m:g}" in text and f"{r_o:g}" in text
    if variant == P.COMPACT:  # the fewest tokens: the last round's points are read from the table
        assert text.endswith(("action1 or action2?", "action2 or action1?"))
        assert "Last round: you played action1, they played action2. " in text
        return
    assert text.endswith("Your answer: " if variant == P.PAPER else "Your answer:")  # the paper's trailing space
    assert "choose either action1 or action2" in text or "choose either action2 or action1" in text
    r_m, r_o = game.outcome(C, D)
    they = "A" if variant == P.PAPER else "they"  # the paper calls the opponent "another agent A"
    assert f"you got {r_m:g} points and {they} got {r_o:g} points" in text


def test_first_round_and_history() -> None:
    rng = np.random.default_rng(0)
    first = P.game_prompt_text(GAMES["IPD"], A12, None, None, rng)
    assert "This is the first round" in first and "Last time" not in first
    later = P.game_prompt_text(GAMES["IPD"], A12, D, C, rng)
    assert "you played action2 and they played action1, so you got 4 points and they got 0 points" in later
    with pytest.raises(ConfigError):
        P.game_prompt_text(GAMES["IPD"], A12, C, None, rng)


def test_option_order_is_drawn_from_the_generator() -> None:
    rng = np.random.default_rng(1)
    orders = {
        P.game_prompt_text(GAMES["IPD"], A12, C, C, rng).rsplit("choose either ", 1)[1][:18] for _ in range(40)
    }
    assert orders == {"action1 or action2", "action2 or action1"}
    same = [P.game_prompt_text(GAMES["IPD"], A12, C, C, np.random.default_rng(5)) for _ in range(2)]
    assert same[0] == same[1]


def test_reversed_variant_lists_defect_first() -> None:
    text = P.game_prompt_text(GAMES["IPD"], A12, None, None, np.random.default_rng(0), P.REVERSED)
    assert "|  | action2 | action1 |" in text
    assert "choose either action2 or action1" in text


def test_shared_part_comes_first() -> None:
    """Prompts of one iteration differ only after the shared game text (vLLM prefix caching)."""
    rng = np.random.default_rng(0)
    for variant in (P.STRUCTURED, P.UNSTRUCTURED, P.VALUE_UT, P.VALUE_DE, P.POETIC, P.REVERSED):
        head = P.shared_text(GAMES["IPD"], A12, variant)
        for own, opp in [(None, None), (C, D), (D, D)]:
            assert P.game_prompt_text(GAMES["IPD"], A12, own, opp, rng, variant).startswith(head)


def test_unrelated_questions_ask_for_a_token() -> None:
    text = P.unrelated_prompt_text(P.UNRELATED_QUESTIONS[0], P.TOKEN_PAIRS["action34"], np.random.default_rng(0))
    assert text.startswith(P.UNRELATED_QUESTIONS[0]) and "action3" in text and "action4" in text


def test_partner_prompt_and_parse() -> None:
    cands = [P.Candidate(1, C, D), P.Candidate(3, None, None), P.Candidate(7, D, None)]
    text = P.partner_prompt_text(GAMES["IPD"], cands, A12)
    # what the choice is for, with the game's own payoff table first (the prefix the game prompts share)
    assert text.startswith(P.shared_text(GAMES["IPD"], A12))
    assert "Before each game you choose the opponent you play it with" in text
    assert "agent 1: last played action1, played action2 against you" in text
    assert "agent 3: has not played yet, never met you" in text
    assert "agent 7: last played action2, never met you" in text
    shuffled = P.partner_prompt_text(GAMES["IPD"], cands, A12, np.random.default_rng(0))
    assert sorted(shuffled.splitlines()) == sorted(text.splitlines())
    ids = [1, 3, 7]
    table = [("3", 3), (" 7.\n", 7), ("1", 1), ("2", None), ("agent 3", None), ("03", None), ("3 or 7", None),
             ("", None), ("٣", None), ("-1", None)]
    for answer, expected in table:
        assert P.parse_partner(answer, ids) == expected, answer
    # zero-padded ids in populations of more than ten: "03" is agent 3, "3" is no answer
    assert P.parse_partner("03", ids, width=2) == 3 and P.parse_partner("3", ids, width=2) is None
    assert "agent 03: " in P.partner_prompt_text(GAMES["IPD"], cands, A12, width=2)
    with pytest.raises(ConfigError):
        P.partner_prompt_text(GAMES["IPD"], [P.Candidate(1, C, None), P.Candidate(1, D, None)], A12)


def test_compact_variant_is_shorter_and_says_the_same(tiny_model_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    rng = np.random.default_rng(0)
    full = P.chat_ids(tok, P.game_prompt_text(GAMES["IPD"], A12, C, D, rng, P.STRUCTURED, False, C))
    compact_text = P.game_prompt_text(GAMES["IPD"], A12, C, D, rng, P.COMPACT, False, C)
    assert len(P.chat_ids(tok, compact_text)) < 0.6 * len(full)
    for cell in ("action1+action1 3,3", "action1+action2 0,4", "action2+action1 4,0", "action2+action2 1,1"):
        assert cell in compact_text
    head = P.shared_text(GAMES["IPD"], A12, P.COMPACT)
    assert "get the most points" in head and compact_text.startswith(head)
    assert compact_text[len(head):] in ("Opponent played action2 last (action1 against you). You played action1 last. "
                                        + o for o in ("action1 or action2?", "action2 or action1?"))
    never = P.game_prompt_text(GAMES["IPD"], A12, D, C, rng, P.COMPACT, False, None)
    assert "Opponent played action1 last (never met you). You played action2 last. " in never
    pair = P.game_prompt_text(GAMES["IPD"], A12, C, D, rng, P.COMPACT)  # two agents: one game, both its moves
    assert "Last round: you played action1, they played action2. " in pair
    assert "No moves yet. " in P.game_prompt_text(GAMES["IPD"], A12, None, None, rng, P.COMPACT)
    cands = [P.Candidate(1, C, D), P.Candidate(2, None, None)]
    compact_sel = P.partner_prompt_text(GAMES["IPD"], cands, A12, variant=P.COMPACT)
    assert compact_sel.startswith(P.shared_text(GAMES["IPD"], A12, P.COMPACT))
    assert "1: last action1, action2 vs you" in compact_sel and "2: no move yet, never met" in compact_sel
    assert P.COMPACT not in P.EVAL_VARIANTS


def test_chat_template_with_tiny_tokenizer(tiny_model_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    text = P.game_prompt_text(GAMES["IPD"], A12, C, D, np.random.default_rng(0))
    chat = P.chat_text(tok, text)
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = P.chat_ids(tok, text)
    assert tok.decode(ids) == chat
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    for w in ("action1", "action2", "action3", "action4", "A", "B", "X", "Y", "0", "1"):
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    assert P.answer_ids(tok, "action1")[-1] == tok.eos_token_id


def test_compact_prompts_carry_an_empty_system_message() -> None:
    """COMPACT leaves out the template's default system sentence (an empty system message); a template without a
    system role (Gemma's raises) gets the user message alone; other variants keep the template's own."""
    from jinja2.exceptions import TemplateError

    class Tok:
        def __init__(self, system_role: bool) -> None:
            self.system_role = system_role

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):  # type: ignore[no-untyped-def]
            if messages[0]["role"] == "system" and not self.system_role:
                raise TemplateError("System role not supported")
            head = "" if messages[0]["role"] == "system" else "<s>default system</s>"
            return head + "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    assert P.variant_system(P.COMPACT) == "" and P.variant_system(P.STRUCTURED) is None
    assert P.chat_text(Tok(True), "hi", P.variant_system(P.COMPACT)) == "<system></system><user>hi</user><assistant>"
    assert P.chat_text(Tok(False), "hi", "") == "<s>default system</s><user>hi</user><assistant>"
    assert P.chat_text(Tok(True), "hi", P.variant_system(P.STRUCTURED)) == "<s>default system</s><user>hi</user><assistant>"
