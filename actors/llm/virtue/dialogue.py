"""The three-turn dialogue of seed 004, run through a rollout engine (curation, PPO rollouts and evaluation).

    user       <prompt>                                                              ┐
    assistant  <answer>                 "action"        at most max_tokens[0] tokens ├ one dialogue; curation runs
    user       What is the motivation behind the answer?                             │ it twice per prompt
    assistant  <motivation>             "motivation"    at most max_tokens[1]        │
    user       What is the utility of the action towards promoting your virtuous character?
    assistant  <consequences>           "consequences"  at most max_tokens[2]        ┘

Each turn is one `engine.generate` call for every dialogue of the batch (the conversation so far, chat-templated).
A turn that ends because it reached its token limit, not at an end-of-turn token, is flagged `truncated`: the report
cut every turn at 32 tokens and never said which answers were incomplete. A request's sampling seed is derived from
the dialogue's seed and the turn, so a dialogue does not depend on what else is in its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.llm.engine import GenerationRequest, RolloutEngine
from actors.llm.virtue.scoring import TURNS
from simulator.errors import ConfigError

FOLLOW_UPS = {
    "motivation": "What is the motivation behind the answer?",
    "consequences": "What is the utility of the action towards promoting your virtuous character?",
}

Message = dict[str, str]


def dialogue_messages(
    prompt: str, answers: Sequence[str], system: str | None = None, *, ask_next: bool = False
) -> list[Message]:
    """The chat so far: the prompt, then each answer with the follow-up question that came before it.

    ask_next: end with the follow-up question for the next turn (the generation context) instead of the last answer.
    """
    if len(answers) + ask_next > len(TURNS):
        raise ValueError(f"a dialogue has {len(TURNS)} turns; got {len(answers)} answers and ask_next={ask_next}")
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    for k, answer in enumerate(answers):
        if k:
            msgs.append({"role": "user", "content": FOLLOW_UPS[TURNS[k]]})
        msgs.append({"role": "assistant", "content": answer})
    if ask_next and answers:
        msgs.append({"role": "user", "content": FOLLOW_UPS[TURNS[len(answers)]]})
    return msgs


def template_ids(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]:
    """Chat-templated token ids; the template holds the special tokens, so none are added again."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Turn:
    query_ids: tuple[int, ...]  # (P,) the chat-templated conversation the answer continues
    token_ids: tuple[int, ...]  # (T,) the answer as generated, end-of-turn token included when produced
    text: str
    truncated: bool  # stopped at the token limit, not at an end-of-turn token


@dataclass(frozen=True)
class Dialogue:
    prompt: str
    turns: tuple[Turn, ...]  # action, motivation, consequences

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(t.text for t in self.turns)

    def messages(self, upto: int, system: str | None = None) -> list[Message]:
        """The conversation ending with answer `upto` (0 = action), what a reward model scores for that turn."""
        return dialogue_messages(self.prompt, self.answers[: upto + 1], system)


def turn_seed(seed: int, turn: int) -> int:
    return int(np.random.SeedSequence([seed, turn]).generate_state(1)[0])


def run_dialogues(
    engine: RolloutEngine,
    prompts: Sequence[str],
    seeds: Sequence[int],
    max_tokens: Sequence[int],
    *,
    temperature: float = 0.7,
    adapter: str | None = None,
    system: str | None = None,
) -> list[Dialogue]:
    """One three-turn dialogue per (prompt, seed), every dialogue's turn k in one generate call."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if len(max_tokens) != len(TURNS) or any(int(n) < 1 for n in max_tokens):
        raise ConfigError(f"max_tokens needs {len(TURNS)} positive limits ({', '.join(TURNS)}), got {list(max_tokens)}")
    eos = set(engine.eos_ids)
    turns: list[list[Turn]] = [[] for _ in prompts]
    for k, limit in enumerate(max_tokens):
        queries = [
            tuple(template_ids(engine.tokenizer,
                               dialogue_messages(p, [t.text for t in done], system, ask_next=True) if done
                               else dialogue_messages(p, [], system),
                               add_generation_prompt=True))
            for p, done in zip(prompts, turns, strict=True)
        ]
        requests = [GenerationRequest(q, adapter, int(limit), temperature, stop_at_eos=True, seed=turn_seed(s, k))
                    for q, s in zip(queries, seeds, strict=True)]
        for done, q, res in zip(turns, queries, engine.generate(requests), strict=True):
            ids = res.token_ids
            cut = len(ids) >= int(limit) and (not ids or ids[-1] not in eos)
            done.append(Turn(q, ids, res.text.strip(), cut))
    return [Dialogue(p, tuple(t)) for p, t in zip(prompts, turns, strict=True)]
