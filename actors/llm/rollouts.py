"""Rollouts: an LLM group's calls to its rollout engine, one per phase of an iteration, each result checked against
the adapter version that Serving says the engine serves.

    free answers     generate()   one GenerationRequest per decision, sampled with the agent's own seed
    masked answers   masked()     every legal sequence of every decision scored in one call, then sampled on its
                                  trie with the agent's own coins (actors/llm/answers.py)
    P(C)             p_cooperate() C and D scored after each prompt (free answers; in mask mode it comes free)
    any requests     run()        e.g. the VR types' stated reasons (actors/llm/virtue/dilemma.py, stated_reasons)

A plain class over any RolloutEngine (HF, vLLM, the Ray wrappers, or a scripted fake in tests). Randomness: every
request's seed and every coin comes from the agent's own stream `rngs[b]`, so an agent's draws do not depend on the
batch around it. `clock` adds each call's seconds to its phase (rollouts, scoring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from actors.llm.answers import AnswerTrie, token_ids
from actors.llm.deciding import masked_picks, masked_rows
from actors.llm.engine import GenerationRequest, GenerationResult, action_logprobs, check_fresh, legal_share
from actors.llm.prompts import TokenPair


def cooperation_probability(
    engine: Any, tokenizer: Any, tokens: TokenPair, adapters: list[str | None], prompts: list[list[int]]
) -> np.ndarray:
    """(B,) P(C answer) / (P(C answer) + P(D answer)) per prompt, one scoring call on either engine."""
    c_ids, d_ids = token_ids(tokenizer, tokens.c), token_ids(tokenizer, tokens.d)  # spelled random tokens by char
    lp = action_logprobs(engine, adapters, prompts, c_ids, d_ids)
    return legal_share(lp[:, 0], lp[:, 1])


class Rollouts:
    """The engine calls of one LLM group (see module docstring); agents b = run * G + member."""

    def __init__(self, engine: Any, tokenizer: Any, serving: Any, rngs: Sequence[np.random.Generator],
                 temperature: float, stop_at_eos: bool, clock: Callable[[str], Any]) -> None:
        self.engine, self.tokenizer, self.serving = engine, tokenizer, serving
        self.rngs = rngs
        self.temperature, self.stop_at_eos = temperature, stop_at_eos
        self.clock = clock

    def run(self, requests: list[GenerationRequest], bs: Sequence[int], phase: str) -> list[GenerationResult]:
        """One generate call for agents `bs`, its seconds added to `phase`; stale results raise."""
        with self.clock(phase):
            results = self.engine.generate(requests)
        check_fresh(results, self.serving.expected(bs))
        return results

    def generate(self, bs: Sequence[int], prompts: Sequence[Sequence[int]],
                 max_new_tokens: Sequence[int]) -> list[GenerationResult]:
        """Free answers: one request per decision, each with its agent's adapter and a seed from its stream."""
        requests = [
            GenerationRequest(tuple(p), self.serving.adapter_of[b], n, self.temperature, stop_at_eos=self.stop_at_eos,
                              seed=int(self.rngs[b].integers(2**63)))
            for b, p, n in zip(bs, prompts, max_new_tokens, strict=True)
        ]
        return self.run(requests, bs, "rollouts")

    def masked(
        self, bs: Sequence[int], prompts: Sequence[Sequence[int]], tries: Sequence[AnswerTrie],
        texts: Sequence[tuple[str, ...]],
    ) -> tuple[list[GenerationResult], list[list[list[float]]]]:
        """Masked answers: score every legal answer of every prompt (one call), sample each on its trie with the
        agent's coins. Returns the results (as if generated) and each decision's raw score rows."""
        adapter_of = self.serving.adapter_of
        rows = masked_rows(tries)
        with self.clock("rollouts"):
            raw = self.engine.score_batch(
                [adapter_of[b] for b, n in zip(bs, rows, strict=True) for _ in range(n)],
                [list(p) for p, n in zip(prompts, rows, strict=True) for _ in range(n)],
                [list(q) for t in tries for q in t.sequences],
            )
        coins = [self.rngs[b].random(max(len(q) for q in t.sequences)) for b, t in zip(bs, tries, strict=True)]
        results, scores = [], []
        for b, trie, answers, (pick, logps, rows_k) in zip(
                bs, tries, texts, masked_picks(tries, raw, coins, self.temperature), strict=True):
            name = adapter_of[b]
            results.append(GenerationResult(trie.sequences[pick], tuple(logps), answers[pick], name,
                                            self.engine.adapter_version(name)))
            scores.append(rows_k)
        check_fresh(results, self.serving.expected(bs))
        return results, scores

    def p_cooperate(self, bs: Sequence[int], prompts: Sequence[Sequence[int]],
                    tokens_of: Callable[[int], TokenPair]) -> np.ndarray:
        """(len(bs),) P(C | legal) after each prompt: one scoring call per distinct action-token pair."""
        p_c = np.empty(len(bs))
        with self.clock("scoring"):
            for tokens in {tokens_of(b) for b in bs}:
                ks = [k for k, b in enumerate(bs) if tokens_of(b) == tokens]
                p_c[ks] = cooperation_probability(self.engine, self.tokenizer, tokens,
                                                  [self.serving.adapter_of[bs[k]] for k in ks],
                                                  [list(prompts[k]) for k in ks])
        return p_c
