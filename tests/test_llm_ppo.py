"""PPO maths against hand-computed numbers (actors/llm/ppo.py). Each expected value is worked out in a comment."""

from __future__ import annotations

import math

import pytest
import torch

from actors.llm import ppo

T = torch.tensor


def close(a: torch.Tensor, b: list, atol: float = 1e-6) -> None:  # type: ignore[type-arg]
    torch.testing.assert_close(a, T(b, dtype=a.dtype), atol=atol, rtol=0)


def test_gae_by_hand() -> None:
    # row 0: V = [1, 2], r = [0.5, 1], gamma 1, lambda 0.95
    #   t=1: delta = 1 + 0 - 2 = -1            A1 = -1
    #   t=0: delta = 0.5 + 2 - 1 = 1.5         A0 = 1.5 + 0.95 * -1 = 0.55
    #   returns = A + V = [1.55, 1.0]
    # row 1: V = [3, 9], r = [2, 7], mask [1, 0] -> V, r zeroed on the pad
    #   t=1: 0;  t=0: delta = 2 + 0 - 3 = -1, A0 = -1; returns [2, 0]
    values = T([[1.0, 2.0], [3.0, 9.0]])
    rewards = T([[0.5, 1.0], [2.0, 7.0]])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    adv, ret = ppo.gae(values, rewards, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.55, -1.0], [-1.0, 0.0]])
    close(ret, [[1.55, 1.0], [2.0, 0.0]])


def test_gae_discount() -> None:
    # V = 0, r = [0, 0, 1], gamma 0.5, lambda 1: A = [0.25, 0.5, 1]
    adv, _ = ppo.gae(torch.zeros(1, 3), T([[0.0, 0.0, 1.0]]), torch.ones(1, 3), gamma=0.5, lam=1.0)
    close(adv, [[0.25, 0.5, 1.0]])


def test_kl_shaped_rewards_by_hand() -> None:
    # row 0: kl = logp - ref = [-1 + 1.5, -2 + 1] = [0.5, -1]; beta 0.1 -> non-score [-0.05, 0.1];
    #        the score 2 lands on the last token: [-0.05, 2.1]
    # row 1: mask [1, 0]: kl = [-1 + 1.2, 0] = [0.2, 0]; non-score [-0.02, 0]; score 1 on token 0: [0.98, 0]
    scores = T([2.0, 1.0])
    logp = T([[-1.0, -2.0], [-1.0, -5.0]])
    ref = T([[-1.5, -1.0], [-1.2, -1.0]])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    rewards, non_score, kl = ppo.kl_shaped_rewards(scores, logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0], [0.2, 0.0]])
    close(non_score, [[-0.05, 0.1], [-0.02, 0.0]])
    close(rewards, [[-0.05, 2.1], [0.98, 0.0]])


def test_whitening_by_hand() -> None:
    # [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + .25 + .25 + 2.25) / 3 = 5/3, sd 1.2909944
    x = T([[1.0, 2.0, 3.0, 4.0]])
    w = ppo.masked_whiten(x, torch.ones_like(x))
    sd = math.sqrt(5 / 3 + 1e-8)
    close(w, [[-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd]])
    close(ppo.masked_whiten(x, torch.ones_like(x), shift_mean=False), [[v + 2.5 for v in w[0].tolist()]])
    # masked: [1, 2, 3 | 100]: mean 2, var (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1]
    w = ppo.masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    close(w[:, :3], [[-1.0, 0.0, 1.0]], atol=1e-6)


def test_policy_loss_by_hand() -> None:
    # ratios [1.5, 0.5, 1.1], advantages [1, -1, 2], eps 0.2
    #   tok0: -A r = -1.5, clipped -A 1.2 = -1.2 -> max -1.2 (clipped)
    #   tok1: -A r = 0.5,  clipped -A 0.8 = 0.8  -> max 0.8  (clipped)
    #   tok2: -A r = -2.2, clipped same          -> -2.2
    #   loss = (-1.2 + 0.8 - 2.2) / 3 = -0.866667, clipfrac 2/3
    #   approxkl = 0.5 * mean(ln1.5^2, ln0.5^2, ln1.1^2) = 0.5 * (0.164402 + 0.480453 + 0.009085) / 3 = 0.108990
    old = torch.zeros(1, 3)
    logp = torch.log(T([[1.5, 0.5, 1.1]]))
    loss, stats = ppo.policy_loss(logp, old, T([[1.0, -1.0, 2.0]]), torch.ones(1, 3), cliprange=0.2)
    assert loss.item() == pytest.approx(-0.866667, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["approxkl"].item() == pytest.approx(0.108990, abs=1e-6)
    assert stats["ratio"].item() == pytest.approx(1.033333, abs=1e-6)


def test_policy_loss_ignores_padding() -> None:
    old = torch.zeros(1, 2)
    logp = torch.log(T([[1.5, 100.0]]))
    loss, _ = ppo.policy_loss(logp, old, T([[1.0, -50.0]]), T([[1.0, 0.0]]), cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2)


def test_value_loss_by_hand() -> None:
    # tok0: V 1.5, V_old 1, R 2: (1.5-2)^2 = 0.25; clipped V = 1.2: (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    # tok1: V 0, V_old 0, R 1: 1.0 both
    # loss = 0.5 * (0.64 + 1.0) / 2 = 0.41, clipfrac 0.5
    loss, stats = ppo.value_loss(T([[1.5, 0.0]]), T([[1.0, 0.0]]), T([[2.0, 1.0]]), torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.41)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_entropy() -> None:
    # uniform over 4: ln 4; one-hot-ish large logit: ~0
    h = ppo.entropy_from_logits(T([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]))
    close(h, [math.log(4), 0.0], atol=1e-5)


def test_adaptive_kl_controller_by_hand() -> None:
    # KL 9 vs target 6: error clip(9/6 - 1 = 0.5) = 0.2; mult 1 + 0.2 * 5 / 10000 = 1.0001 -> 0.20002
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=5)
    assert ctl.value == pytest.approx(0.20002, rel=1e-12)
    # KL 3: error clip(-0.5) = -0.2; mult 0.9999 -> 0.20002 * 0.9999 = 0.199999998
    ctl.update(3.0, n_steps=5)
    assert ctl.value == pytest.approx(0.199999998, rel=1e-12)
    # inside the clip: KL 6.6 -> error 0.1, n 100: mult 1.001 -> 0.2002
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=100)
    assert ctl.value == pytest.approx(0.2002, rel=1e-12)
    fixed = ppo.FixedKLController(0.2)
    fixed.update(100.0, 5)
    assert fixed.value == 0.2


def test_running_moments_and_score_normalisation_by_hand() -> None:
    # batch [1, 2, 3]: mean 2, unbiased sd 1 -> normalised [-1, 0, 1]
    running = ppo.RunningMoments()
    out = ppo.normalise_scores(T([1.0, 2.0, 3.0]), running)
    close(out, [-1.0, 0.0, 1.0], atol=1e-6)
    # then [5]: all seen [1, 2, 3, 5]: mean 2.75, unbiased var 8.75 / 3 -> sd 1.7078251
    # (5 - 2.75) / 1.7078251 = 1.3174649
    out = ppo.normalise_scores(T([5.0]), running)
    assert running.mean == pytest.approx(2.75)
    assert running.std == pytest.approx(math.sqrt(8.75 / 3))
    close(out, [1.3174649], atol=1e-6)
    # scaling only (no norm): 5 / sd; clip afterwards
    r2 = ppo.RunningMoments()
    close(ppo.normalise_scores(T([1.0, 2.0, 3.0]), r2, norm=False), [1.0, 2.0, 3.0], atol=1e-6)
    close(ppo.normalise_scores(T([-4.0, 0.5]), ppo.RunningMoments(), scaling=False, clip=1.0), [-1.0, 0.5])
