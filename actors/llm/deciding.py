"""Deciding: what an LLM agent is told, and what its answers mean. Prompts in, answers out; no model, no engine.

    select(): SelectionBatch ──selection_prompts──► one prompt per agent ─┐ engine (masked: score every
    act():    DilemmaBatch  ──game_prompts──────► one prompt per game    ─┤ candidate's / action's tokens;
                                                                            │ free: generate)
              Decisions ◄──partner_choice / parse_answer── answers ◄───────┘

What a prompt may say (DESIGN section 8): the game prompt gives the agent's own most recent move, its opponent's
most recent move and, in a population, the opponent's move against this agent the last time the two met; the
selection prompt gives the same payoff table, says the choice picks the next game's opponent, and lists every
candidate's most recent move and its last move against the selector. `PartnerMemory` keeps those last moves per
pair; they are the agent's own memory (each agent keeps it whatever adapter it plays with).

Masked answers (`answer_mode = "mask"`): a move is one of the two action tokens' sequences, a partner one of the
candidates' id sequences (zero-padded ids, `config.id_width`, so none is a prefix of another). Scoring every legal
sequence once gives the whole trie's raw log pi (`masked_rows` / `masked_picks`); the coins come from the agent's
own stream, so a masked answer does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.llm.answers import AnswerTrie, answer_length, sample_masked
from actors.llm.config import LLMAgentConfig, id_width
from actors.llm.prompts import (
    Candidate,
    TokenPair,
    chat_ids,
    game_prompt_text,
    parse_partner,
    partner_id,
    partner_prompt_text,
    variant_system,
)
from simulator.contracts import Action, DilemmaBatch, SelectionBatch
from simulator.games import Game


@dataclass(frozen=True)
class RunAnswers:
    """One run's legal moves: its action-token pair, their trie (mask mode) and the answer length in tokens."""

    tokens: TokenPair
    trie: AnswerTrie | None
    max_new_tokens: int

    @property
    def answers(self) -> tuple[str, str]:
        return (self.tokens.c, self.tokens.d)


class PartnerMemory:
    """Per agent b and other agent j: j's move against b the last time they met (-1: never met)."""

    def __init__(self, agents: int, num_agents: int) -> None:
        self.against = np.full((agents, num_agents), -1, dtype=np.int8)

    def remember(self, bs: Sequence[int], opponents: Sequence[int], moves: Sequence[int]) -> None:
        """Games in play order: a later game of the same pair overwrites an earlier one."""
        for b, j, m in zip(bs, opponents, moves, strict=True):
            self.against[b, int(j)] = int(m)

    def get(self, b: int, j: int) -> Action | None:
        m = int(self.against[b, j])
        return None if m < 0 else Action(m)


def masked_rows(tries: Sequence[AnswerTrie]) -> list[int]:
    """Scoring rows per decision: one per legal sequence."""
    return [len(t.sequences) for t in tries]


def masked_picks(
    tries: Sequence[AnswerTrie], raw: Sequence[Sequence[float]], coins: Sequence[np.ndarray], temperature: float
) -> list[tuple[int, list[float], list[list[float]]]]:
    """Per decision: (index of the sampled legal sequence, its masked log pi per token, its raw score rows).

    raw: score_batch's rows for every decision's every legal sequence, in order (masked_rows)."""
    out, start = [], 0
    for trie, u in zip(tries, coins, strict=True):
        rows = [list(r) for r in raw[start : start + len(trie.sequences)]]
        start += len(trie.sequences)
        pick, logps = sample_masked(trie, rows, u, temperature)
        out.append((pick, logps, rows))
    return out


class Decider:
    """Prompts and answers of an LLM group's agents (see module docstring); b = run * G + member."""

    def __init__(self, tokenizer: Any, game: Game, config: LLMAgentConfig, slots: Sequence[int], num_agents: int,
                 run_tokens: Sequence[TokenPair]) -> None:
        self.tokenizer, self.game, self.cfg = tokenizer, game, config
        self.slots = [int(s) for s in slots]
        self.G, self.N = len(self.slots), num_agents
        self.same_game = num_agents == 2  # two agents: both last moves are the moves of one game
        self.width = id_width(num_agents)
        self.runs = [self._run_answers(t) for t in run_tokens]
        self.memory = PartnerMemory(len(run_tokens) * self.G, num_agents)
        self._partner_tries: dict[int, AnswerTrie] = {}

    def _run_answers(self, tokens: TokenPair) -> RunAnswers:
        answers = (tokens.c, tokens.d)
        trie = AnswerTrie.from_texts(self.tokenizer, answers) if self.cfg.answer_mode == "mask" else None
        return RunAnswers(tokens, trie, self.cfg.max_new_tokens or answer_length(self.tokenizer, answers))

    def run_of(self, b: int) -> RunAnswers:
        return self.runs[b // self.G]

    # -- partner selection ----------------------------------------------------------------------------------------
    def others(self, member: int) -> list[int]:
        """The candidates of a member: every other slot, in slot order (the index of a choice)."""
        return [j for j in range(self.N) if j != self.slots[member]]

    def selection_prompts(self, batch: SelectionBatch, rngs: Sequence[np.random.Generator]) -> list[list[int]]:
        """One prompt per agent b (all runs), drawing each agent's candidate order from its own stream."""
        prompts = []
        for r, run in enumerate(self.runs):
            for g in range(self.G):
                b = r * self.G + g
                cands = [Candidate(j, None if batch.iteration == 0 else Action(int(m)), self.memory.get(b, j))
                         for j, m in zip(self.others(g), batch.state[r, g], strict=True)]
                text = partner_prompt_text(self.game, cands, run.tokens, rngs[b], self.cfg.variant, self.width)
                prompts.append(chat_ids(self.tokenizer, text, variant_system(self.cfg.variant)))
        return prompts

    def partner_answers(self, member: int) -> tuple[str, ...]:
        """The member's legal partner answers: its candidates' ids as the prompt writes them, in candidate order."""
        return tuple(partner_id(j, self.width) for j in self.others(member))

    def partner_trie(self, member: int) -> AnswerTrie:
        """Mask mode: the member's legal partner answers as token sequences (same order)."""
        if member not in self._partner_tries:
            self._partner_tries[member] = AnswerTrie.from_texts(self.tokenizer, self.partner_answers(member))
        return self._partner_tries[member]

    def selection_tokens(self) -> int:
        """Tokens a free selection answer may take: the run's answer length, at least the id's digits."""
        return max(max(run.max_new_tokens for run in self.runs), self.width)

    def partner_choice(self, member: int, text: str) -> int | None:
        """The index among the member's candidates of the agent `text` names, None if it names none."""
        ids = self.others(member)
        picked = parse_partner(text, ids, self.width)
        return None if picked is None else ids.index(picked)

    # -- moves ----------------------------------------------------------------------------------------------------
    def game_prompts(
        self, batch: DilemmaBatch, rngs: Sequence[np.random.Generator]
    ) -> tuple[list[int], list[str], list[list[int]]]:
        """(agents b, prompt texts, prompt ids) of every decision, in batch order."""
        bs = (batch.run * self.G + batch.member).tolist()
        texts, prompts = [], []
        for k, b in enumerate(bs):
            own = None if batch.first else Action(int(batch.own_prev[k]))
            opp = None if batch.first else Action(int(batch.state[k]))
            against = None if self.same_game else self.memory.get(b, int(batch.opponent[k]))
            text = game_prompt_text(self.game, self.run_of(b).tokens, own, opp, rngs[b], self.cfg.variant,
                                    self.same_game, against)
            texts.append(text)
            prompts.append(chat_ids(self.tokenizer, text, variant_system(self.cfg.variant)))
        return bs, texts, prompts
