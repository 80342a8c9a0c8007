"""PPOLearner: merged identical passes give the same update; off-policy samples are never treated as on-policy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.llm import prompts as P
from actors.llm.answers import AnswerTrie
from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
from simulator.games import GAMES

A12 = P.TOKEN_PAIRS["action12"]
PAPER = PPOConfig(learning_rate=1e-3)  # the paper's mini-batch = batch = 5, 4 epochs, grad accumulation 4; a visible lr


def _batch(tok) -> tuple[list[list[int]], list[list[int]]]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    q = [P.game_prompt_ids(tok, GAMES["IPD"], A12, None, None, rng) for _ in range(5)]
    c, d = P.answer_ids(tok, "action1"), P.answer_ids(tok, "action2")
    return q, [c, d, c, d, c]


@pytest.mark.parametrize("mask", [False, True])
def test_merged_passes_give_the_same_update(tiny_model_path: Path, mask: bool) -> None:
    host = PolicyHost(tiny_model_path)
    merged = PPOLearner(host, "merged", replace(PAPER, seed=3))
    every = PPOLearner(host, "every", replace(PAPER, seed=3, merge_identical_passes=False))
    q, r = _batch(host.tokenizer)
    allowed = None
    if mask:
        trie = AnswerTrie.from_texts(host.tokenizer, ["action1", "action2"])
        r = [list(trie.sequences[k % 2]) for k in range(5)]
        allowed = [trie.allowed(x) for x in r]
    for step, scores in enumerate(([3.0, 0.0, 3.0, 0.0, 3.0], [1.0, 0.0, 4.0, 1.0, 0.0], [0.0, 3.0, 3.0, 0.0, 1.0])):
        a = merged.step(q, r, scores, allowed=allowed)
        b = every.step(q, r, scores, allowed=allowed)
        assert a["forward_backward_passes"] == 1.0 and b["forward_backward_passes"] == 4.0
        assert a["optimizer_steps"] == b["optimizer_steps"] == 1.0
        assert a["ratio"] == pytest.approx(1.0, abs=1e-6) and b["ratio"] == pytest.approx(1.0, abs=1e-6)
        for key in ("policy_loss", "value_loss", "kl", "entropy", "mean_scaled_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (step, key)
    wa, wb = merged.export_adapter().tensors, every.export_adapter().tensors
    moved = max(float((wa[k] - 0).abs().max()) for k in wa if "lora_B" in k)
    assert moved > 1e-4  # the updates did something
    # Summing four equal gradients and scaling one by four differ in the last bits; Adam's g / sqrt(v) turns that
    # rounding into a visible step only where a gradient is ~0. So: every weight within 5% of one Adam step (lr),
    # and on average the two updates agree to 1e-7.
    lr = PAPER.learning_rate
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0.05 * lr)
        assert float((wa[k] - wb[k]).abs().mean()) < 1e-7, k
    torch.testing.assert_close(merged.value_head.weight, every.value_head.weight, rtol=0, atol=0.05 * lr)


def test_passes_are_not_merged_when_they_differ(tiny_model_path: Path) -> None:
    learner = PPOLearner(tiny_model_path, "a", PPOConfig(batch_size=4, mini_batch_size=2))
    q, r = _batch(learner.tokenizer)
    stats = learner.step(q[:4], r[:4], [1.0, 0.0, 1.0, 0.0])
    assert stats["forward_backward_passes"] == 8.0  # 4 epochs x 2 shuffled mini-batches: weights differ between them


def test_stale_samples_use_the_importance_ratio_and_are_counted(tiny_model_path: Path) -> None:
    learner = PPOLearner(tiny_model_path, "a", replace(PAPER, learning_rate=5e-3))
    q, r = _batch(learner.tokenizer)
    behaviour_v0 = [learner.logprobs(x, y) for x, y in zip(q, r, strict=True)]
    learner.step(q, r, [3.0, 0.0, 3.0, 0.0, 3.0], versions=[0] * 5, behaviour_logprobs=behaviour_v0)
    assert learner.version == 1
    # two samples were produced by v0, three by the current v1
    behaviour = [*behaviour_v0[:2], *(learner.logprobs(x, y) for x, y in zip(q[2:], r[2:], strict=True))]
    stats = learner.step(q, r, [3.0, 0.0, 3.0, 0.0, 3.0], versions=[0, 0, 1, 1, 1], behaviour_logprobs=behaviour)
    assert stats["stale_samples"] == 2.0
    assert abs(stats["ratio"] - 1.0) > 1e-4  # pi_v1 / pi_v0 on the stale rows: not treated as on-policy
    with pytest.raises(ValueError, match="behaviour log pi"):
        learner.step(q, r, [1.0] * 5, versions=[0, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="newer"):
        learner.step(q, r, [1.0] * 5, versions=[9] * 5, behaviour_logprobs=behaviour)


@pytest.mark.parametrize("mask", [False, True])
def test_a_shared_prefix_gives_the_same_update_as_full_prompts(tiny_model_path: Path, mask: bool) -> None:
    """share_prefix (the CPU path) computes the prompt text all samples share once: same log pi, values, update."""
    host = PolicyHost(tiny_model_path)
    full = PPOLearner(host, "full", replace(PAPER, seed=3))
    shared = PPOLearner(host, "shared", replace(PAPER, seed=3, share_prefix=True))
    rng = np.random.default_rng(1)  # different histories after the same game text: a real shared prefix
    q = [P.game_prompt_ids(host.tokenizer, GAMES["IPD"], A12, own, opp, rng, P.STRUCTURED)
         for own, opp in [(None, None), (P.Action.C, P.Action.D), (P.Action.D, P.Action.D), (P.Action.C, P.Action.C),
                          (P.Action.D, P.Action.C)]]
    assert 8 <= PPOLearner._shared_prefix(q) < min(len(x) for x in q)
    trie = AnswerTrie.from_texts(host.tokenizer, ["action1", "action2"])
    r = [list(trie.sequences[k % 2]) for k in range(5)]
    allowed = [trie.allowed(x) for x in r] if mask else None
    for learner in (full, shared):
        learner._activate()
        logp, v, _, _ = learner._forward(q, r, 2, allowed=allowed)
        if learner is full:
            ref = (logp.detach(), v.detach())  # type: ignore[union-attr]
    torch.testing.assert_close(logp.detach(), ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(v.detach(), ref[1], atol=1e-5, rtol=0)  # type: ignore[union-attr]
    for scores in ([3.0, 0.0, 3.0, 0.0, 3.0], [1.0, 0.0, 4.0, 1.0, 0.0]):
        a = full.step(q, r, scores, allowed=allowed)
        b = shared.step(q, r, scores, allowed=allowed)
        for key in ("policy_loss", "value_loss", "kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    # the reference policy's head was computed once and served to the second step from the host's cache
    assert len(host.reference_heads) == 1
    batch = SimpleNamespace(queries=q, responses=r, width=2, allowed=allowed)
    mask = torch.tensor([[1.0] * len(x) + [0.0] * (2 - len(x)) for x in r])  # padding positions carry no number
    torch.testing.assert_close(shared._reference_logprobs(batch) * mask, full._reference_logprobs(batch) * mask,
                               atol=1e-5, rtol=0)
    assert len(host.reference_memo) == len({(tuple(x), tuple(y)) for x, y in zip(q, r, strict=True)})  # memo: shared
    wa, wb = full.export_adapter().tensors, shared.export_adapter().tensors
    for k in wa:  # as for merged passes: rounding differences show only where Adam divides a ~0 gradient
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0.05 * PAPER.learning_rate)
