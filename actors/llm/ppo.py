"""PPO maths for LLM fine-tuning, as in TRL 0.x `PPOTrainer.step` (the version the ICLR 2025 paper used).

Pure torch; no trl, transformers or vllm. Tensors are response-aligned and right-padded:

    logprobs, ref_logprobs, values, mask : (B, T)   position t = the t-th generated token (mask 0 = padding)
    scores                               : (B,)     one scalar reward per completion

One PPO step (see actors/llm/learner.py):
    scores  ─► normalise_scores (running mean/std)          r_t = -beta (log pi - log pi_ref)_t  + [t = last] score
    values, r ─► gae (gamma, lambda) ─► advantages (whitened), returns
    epochs x mini-batches: policy_loss (clipped ratio) + vf_coef * value_loss (clipped values)
    kl_controller.update(mean_b sum_t (log pi - log pi_ref), n_steps = B)

References: Schulman et al. 2017 (PPO, eq. 7), Schulman et al. 2016 (GAE, eq. 16), Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences", adaptive KL, eq. 2), and TRL 0.x `trl/core.py` and
`trl/trainer/ppo_trainer.py` for the exact masking, whitening and statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WHITEN_EPS = 1e-8  # TRL: (x - mean) * rsqrt(var + 1e-8)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * m) / sum(m), over `dim` or over everything."""
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the unmasked entries; with `unbiased`, Bessel's n / (n - 1) as in TRL's masked_var."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 unmasked entries, got {int(n.item())}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the unmasked entries; `shift_mean=False` adds the mean back.

    With fewer than 2 unmasked entries the variance is undefined; then x - mean is returned (TRL would divide by 0).
    """
    mean = masked_mean(x, mask)
    centred = x - mean
    whitened = centred if mask.sum() < 2 else centred * torch.rsqrt(masked_var(x, mask) + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


def kl_shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * (log pi(a_t) - log pi_ref(a_t)), plus the score on each row's last token.

    Returns (rewards, non_score_rewards, kl), each (B, T) and zero on padding. This is TRL's `compute_rewards`
    with kl_penalty="kl": the KL estimate per token is the log-ratio of the sampled token.
    """
    kl = (logprobs - ref_logprobs) * mask  # (B, T) log pi/pi_ref of the sampled tokens
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    last = mask.sum(1).long() - 1  # (B,) index of each row's last real token (rows are right-padded)
    if (last < 0).any():
        raise ValueError("every completion needs at least one token")
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards, non_score, kl


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, un-whitened: returns (advantages, returns), each (B, T).

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_T = 0; V and r are zeroed on padding)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                            (the value target)
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (PPO eq. 7): mean_t max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old).

    Stats: clipfrac (share of tokens where the clipped term is larger), approxkl = 0.5 * mean (logp - logp_old)^2,
    ratio (mean rho).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, losses_clipped), mask)
    stats = {
        "clipfrac": masked_mean((losses_clipped > losses).float(), mask).detach(),
        "approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def value_loss(
    vpreds: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean_t max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)."""
    vclipped = torch.clamp(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    l1 = (vpreds - returns) ** 2
    l2 = (vclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask)
    return loss, {"clipfrac": masked_mean((l2 > l1).float(), mask).detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position: (..., V) -> (...)."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon)."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10000.0) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float = 0.2) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@dataclass
class RunningMoments:
    """Running mean and std of all scores seen so far (Chan et al. parallel update, as TRL's RunningMoments).

    `std` is the unbiased estimate over every score seen; the count starts at 1e-24 so the first batch sets
    mean and var (biased) directly.
    """

    mean: float = 0.0
    var: float = 1.0
    std: float = 1.0
    count: float = 1e-24

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch; returns that batch's (mean, unbiased std; NaN for a single score)."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        x_mean = float(xs.mean())
        x_var = float(((xs - x_mean) ** 2).mean())  # biased
        delta = x_mean - self.mean
        tot = self.count + n
        old_sum = self.var * self.count + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.var = (old_sum + x_var * n) / tot
        self.std = math.sqrt(self.var * tot / (tot - 1)) if tot > 1 else 1.0
        self.count = tot
        return x_mean, math.sqrt(x_var * n / (n - 1)) if n > 1 else float("nan")


def normalise_scores(
    scores: torch.Tensor, running: RunningMoments, scaling: bool = True, norm: bool = True, clip: float | None = None
) -> torch.Tensor:
    """TRL's use_score_scaling / use_score_norm / score_clip, in that order.

    scaling: update `running`, then s / (std + eps); with norm as well: (s - mean) / (std + eps). eps is the
    float eps of the score dtype. clip: clamp to [-clip, clip] afterwards.
    """
    if scaling:
        running.update(scores)
        factor = running.std + torch.finfo(scores.dtype).eps
        scores = (scores - running.mean) / factor if norm else scores / factor
    if clip is not None:
        scores = torch.clamp(scores, -clip, clip)
    return scores
