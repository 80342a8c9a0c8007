"""Does the VR reward depend on the move? The check a VR dilemma agent needs before it trains (issue 18, item 4).

For each game prompt a VR agent sees against TFT in the paper's protocol (the first round and the four last-round
histories, each with a few option orders), the move is fixed to C and then to D, the policy is asked its reason
exactly as a VR agent is (actors/llm/virtue/dilemma.py: "What is the motivation behind the answer? Answer in one
sentence.", at most `reason_tokens` tokens, the agent's temperature), and every scorer scores the conversation the
VR reward scores. Pair j = (prompt, sample k): its reward after C against after D. The sample seeds are the same
for C and D, so the only difference between the two reasons' contexts is the move.

    prompts  5 histories x `orders` option orders               rows: prompt_id, history, move, sample, reason,
    x moves  C, D                                                      reason_cut, score_<scorer>, <scorer>_<model>
    x samples `samples` reasons each                              summary: per scorer, MoveSeparation (scoring.py)

A scorer is an EnsembleReward: the pipeline's three reward models (the VR reward as the scenario uses it), or one
adapter scoring every turn (e.g. the supervised judge, whose ensemble is then its own score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.llm.virtue.dilemma import reason_context, scored_conversation
from actors.llm.virtue.scoring import MoveSeparation, move_separation
from simulator.contracts import Action

HISTORIES: tuple[tuple[str, Action | None, Action | None], ...] = (
    ("first", None, None), ("CC", Action.C, Action.C), ("CD", Action.C, Action.D),
    ("DC", Action.D, Action.C), ("DD", Action.D, Action.D),
)
"""(name, own last move, opponent's last move): the histories of a pair game against TFT."""


@dataclass(frozen=True)
class SeparationPrompt:
    prompt_id: str
    history: str
    text: str  # the game prompt's user message


def separation_prompts(game: str = "IPD", tokens: str = "action12", variant: str = "structured", orders: int = 4,
                       seed: int = 0) -> list[SeparationPrompt]:
    """The VR agent's game prompts: every history of HISTORIES with `orders` option orders (seeded)."""
    from actors.llm.prompts import game_prompt_text, token_pair
    from simulator.games import get_game

    g, pair = get_game(game), token_pair(tokens)
    rng = np.random.default_rng(seed)
    return [SeparationPrompt(f"{name}-{k}", name, game_prompt_text(g, pair, own, opp, rng, variant))
            for name, own, opp in HISTORIES for k in range(orders)]


def measure(engine: Any, scorers: Mapping[str, Any], prompts: Sequence[SeparationPrompt], *, tokens: str = "action12",
            samples: int = 4, reason_tokens: int = 32, temperature: float = 1.0, seed: int = 0
            ) -> tuple[list[dict[str, Any]], dict[str, MoveSeparation]]:
    """Ask the engine's base policy for the reasons after C and after D, score them with every scorer: (rows, the
    separation of each scorer)."""
    from actors.llm.engine import GenerationRequest
    from actors.llm.prompts import token_pair
    from actors.llm.virtue.dialogue import template_ids

    pair = token_pair(tokens)
    cells = [(j, p, move, k) for j, p in enumerate(prompts) for move in (Action.C, Action.D) for k in range(samples)]
    requests = [GenerationRequest(
        tuple(template_ids(engine.tokenizer, reason_context(p.text, pair.token(move)), add_generation_prompt=True)),
        None, reason_tokens, temperature, stop_at_eos=True, seed=seed * 1_000_003 + j * 7919 + k)
        for j, p, move, k in cells]  # the seed does not depend on the move
    results = engine.generate(requests)
    eos = set(engine.eos_ids)
    reasons = [r.text.strip() for r in results]
    conversations = [scored_conversation(p.text, pair.token(move), reason)
                     for (_, p, move, _), reason in zip(cells, reasons, strict=True)]
    rows: list[dict[str, Any]] = [
        {"prompt_id": p.prompt_id, "history": p.history, "move": move.name, "sample": k, "reason": reason,
         "reason_cut": len(res.token_ids) >= reason_tokens and res.token_ids[-1] not in eos}
        for (_, p, move, k), reason, res in zip(cells, reasons, results, strict=True)]
    summary: dict[str, MoveSeparation] = {}
    for name, scorer in scorers.items():
        ensemble, per_model = scorer.score(conversations)
        for i, row in enumerate(rows):
            row[f"score_{name}"] = float(ensemble[i])
            for m, model in enumerate(scorer.names):
                row[f"{name}_{model}"] = float(per_model[i, m])
        ens = np.asarray(ensemble, dtype=np.float64).reshape(len(prompts), 2, samples)  # prompt, move, sample
        summary[name] = move_separation(ens[:, 0].ravel(), ens[:, 1].ravel(), seed=seed)
    return rows, summary
