"""How an LLM agent's answer is produced and how it ends (ICLR 2025 protocol), as plain data and maths.

Answer modes (`LLMAgentConfig.answer_mode`, recorded in every row as `answer_mode`):

    free   the paper's mode: sample `max_new_tokens` tokens from the model (the default, and the only mode a
           paper reproduction with a real model should use). The answer is parsed strictly afterwards.
    mask   the answer is restricted to the legal action answers (a logit mask): at each answer position only the
           tokens that continue one of the legal token sequences are allowed, and the model's probabilities are
           renormalised over them. Every answer is then legal. For a model too small to follow the answer format
           (SmolLM2-135M samples "You can choose either ..."), this is what lets PPO see a reward signal on CPU.
           PPO computes its log pi, the reference model's log pi and the KL under the same mask
           (`masked_logprobs`), so ratio and KL are those of the masked policy.

Masked sampling needs no engine support: the legal answers form a tiny trie (two sequences, e.g. "action1" =
[action, 1] and "action2" = [action, 2]); scoring every legal sequence once gives the raw log pi of every branch
of the trie, and the masked policy at a node is the softmax over its children. Both engines score through
`RolloutEngine.score_batch`, and the coins come from the agent's own random stream, so a masked answer does not
depend on how requests are batched.

How an answer ends (`stop`):

    length  exactly `max_new_tokens` tokens, end-of-sequence tokens included and not stopping (the paper: TRL's
            `respond_to_batch(model, query, txt_len=gen_len)` with gen_len = the action token's length in tokens,
            2 for "action1" on Gemma-2 and on SmolLM2). `max_new_tokens=None` means that length.
    eos     stop at the first end-of-sequence token, where EOS is the union of the tokenizer's EOS and the model's
            generation-config EOS ids (`eos_token_ids`); both engines stop at exactly that set, so for a chat model
            whose turn ends in another token (Gemma's <end_of_turn>) they generate, and train on, the same tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.errors import ConfigError

ANSWER_MODES = ("free", "mask")
STOP_MODES = ("length", "eos")


def eos_token_ids(tokenizer: Any, model_dir: str | os.PathLike[str] | None = None) -> tuple[int, ...]:
    """Every token id that ends a turn: the tokenizer's EOS plus the generation config's eos_token_id(s)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_dir is not None:
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(str(model_dir))
        except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
            gen = None
        extra = getattr(gen, "eos_token_id", None)
        for i in extra if isinstance(extra, list | tuple) else [extra]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


class SpelledToken(str):
    """An action token made of single-character tokens, as the paper built its random tokens (fine_tune.py's
    generate_seq: N characters, each its own token): its token ids are its characters' ids one after the other, not
    the tokenizer's merges of the whole string. It reads and compares as the plain string (prompts, parsing, records);
    only `token_ids` (generation length, masked answers, P(C)) sees the difference."""

    __slots__ = ()


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """A legal answer's token ids: a SpelledToken character by character, anything else as the tokenizer splits it."""
    if isinstance(text, SpelledToken):
        return [i for ch in text for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_length(tokenizer: Any, answers: Sequence[str]) -> int:
    """Tokens of the longest legal answer: the paper's fixed generation length (N for N-character random tokens)."""
    return max(len(token_ids(tokenizer, a)) for a in answers)


@dataclass(frozen=True)
class AnswerTrie:
    """The legal answers as token sequences; none may be a prefix of another (the answer would be ambiguous)."""

    sequences: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.sequences) < 2 or any(len(s) == 0 for s in self.sequences):
            raise ConfigError(f"a masked answer needs at least two non-empty legal answers, got {self.sequences}")
        for i, a in enumerate(self.sequences):
            for j, b in enumerate(self.sequences):
                if i != j and b[: len(a)] == a:
                    raise ConfigError(
                        f"legal answer tokens {list(a)} are a prefix of {list(b)}; a masked answer cannot tell them apart"
                    )

    @classmethod
    def from_texts(cls, tokenizer: Any, answers: Sequence[str]) -> AnswerTrie:
        return cls(tuple(tuple(token_ids(tokenizer, a)) for a in answers))

    def children(self, prefix: Sequence[int]) -> list[int]:
        """Allowed next tokens after `prefix`, in first-seen order."""
        t, out = len(prefix), []
        for s in self.sequences:
            if len(s) > t and list(s[:t]) == list(prefix) and s[t] not in out:
                out.append(s[t])
        return out

    def allowed(self, response: Sequence[int]) -> list[list[int]]:
        """Per position of `response` (a legal answer), the tokens the mask allowed there."""
        return [self.children(response[:t]) for t in range(len(response))]


def sample_masked(
    trie: AnswerTrie, raw: Sequence[Sequence[float]], u: Sequence[float] | np.ndarray, temperature: float = 1.0
) -> tuple[int, list[float]]:
    """Sample one legal answer from the masked policy.

    raw[i]: the raw per-token log pi of trie.sequences[i] (from score_batch); u: uniforms, one per answer position.
    Returns (index of the chosen sequence, its per-token masked log pi at temperature 1, the quantity PPO uses).
    Temperature scales the sampling only (0 = greedy), as the engines' logprobs are always those of pi itself.
    """
    prefix: list[int] = []
    logps: list[float] = []
    for t in range(max(len(s) for s in trie.sequences)):
        kids = trie.children(prefix)
        if not kids:
            break
        lp = np.array([_branch_logprob(trie, raw, prefix, k) for k in kids])
        masked = lp - _logsumexp(lp)
        if len(kids) == 1:
            pick = 0
        elif temperature <= 0:
            pick = int(np.argmax(masked))
        else:
            z = masked / temperature
            p = np.exp(z - _logsumexp(z))
            pick = min(int(np.searchsorted(np.cumsum(p), u[t] if t < len(u) else 0.5, side="right")), len(kids) - 1)
        prefix.append(kids[pick])
        logps.append(float(masked[pick]))
    return trie.sequences.index(tuple(prefix)), logps


def _branch_logprob(trie: AnswerTrie, raw: Sequence[Sequence[float]], prefix: Sequence[int], token: int) -> float:
    t = len(prefix)
    for s, lp in zip(trie.sequences, raw, strict=True):
        if len(s) > t and list(s[:t]) == list(prefix) and s[t] == token:
            return float(lp[t])
    raise ValueError(f"token {token} does not continue {list(prefix)} in the answer trie")


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def sequence_probability(raw: Sequence[float]) -> float:
    """P(a whole token sequence) from its per-token log pi."""
    return math.exp(sum(raw))
