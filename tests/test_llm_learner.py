"""PPOLearner: config, step statistics, optimizer-step semantics, and learning on a tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from actors.llm import prompts as P
from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
from simulator.errors import ConfigError
from simulator.games import GAMES
from simulator.rewards import R_ILLEGAL

A12 = P.TOKEN_PAIRS["action12"]


def test_config_defaults_are_the_papers() -> None:
    cfg = PPOConfig()
    assert (cfg.learning_rate, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.ppo_epochs) == (1.41e-5, 5, 4, 4)
    assert (cfg.cliprange, cfg.cliprange_value, cfg.vf_coef, cfg.gamma, cfg.lam) == (0.2, 0.2, 0.1, 1.0, 0.95)
    assert (cfg.init_kl_coef, cfg.target, cfg.horizon, cfg.adap_kl_ctrl) == (0.2, 6.0, 10000.0, True)
    assert cfg.use_score_scaling and cfg.use_score_norm
    assert (cfg.lora_r, cfg.lora_target_modules) == (64, "all-linear")
    for bad in ({"batch_size": 0}, {"lam": 1.5}, {"mini_batch_size": 6}, {"lora_dropout": 1.0}):
        with pytest.raises(ConfigError):
            PPOConfig(**bad)  # type: ignore[arg-type]


def test_fused_adam_gives_the_same_update_up_to_rounding(tiny_model_path: Path) -> None:
    """ppo.fused_adam: torch's fused Adam kernel instead of its per-tensor loop, on the same batch and init."""
    from dataclasses import replace

    cfg = PPOConfig(lora_r=8, lora_alpha=16, learning_rate=1e-3, gradient_accumulation_steps=1)
    plain, fused = PPOLearner(tiny_model_path, "agent-0", cfg), PPOLearner(tiny_model_path, "agent-0",
                                                                        replace(cfg, fused_adam=True))
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    tok = plain.tokenizer
    rng = np.random.default_rng(0)
    q = [P.game_prompt_ids(tok, GAMES["IPD"], A12, None, None, rng) for _ in range(5)]
    r = [P.answer_ids(tok, "action1"), P.answer_ids(tok, "action2")] * 2 + [P.answer_ids(tok, "action1")]
    for learner in (plain, fused):
        for _ in range(2):
            learner.step(q, r, [3.0, 0.0, 4.0, 1.0, 3.0])
    a, b = plain.export_adapter().tensors, fused.export_adapter().tensors
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-4  # the adapters moved off their zero init ...
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5 * max(1.0, moved)  # ... to the same place, to float rounding


def test_step_stats_versions_and_one_adam_step_per_ppo_step(tiny_model_path: Path) -> None:
    learner = PPOLearner(tiny_model_path, "agent-0")
    tok = learner.tokenizer
    rng = np.random.default_rng(0)
    q = [P.game_prompt_ids(tok, GAMES["IPD"], A12, None, None, rng) for _ in range(5)]
    c, d = P.answer_ids(tok, "action1"), P.answer_ids(tok, "action2")
    w0 = learner.export_adapter()
    assert w0.version == 0 and w0.peft_config["r"] == 64
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in w0.tensors)
    stats = learner.step(q, [c, d, c, [d[0]], c], [3.0, 0.0, 3.0, R_ILLEGAL, 3.0])
    for key in ("kl", "kl_coef", "policy_loss", "value_loss", "entropy", "mean_score", "clipfrac", "approxkl"):
        assert np.isfinite(stats[key]), key
    assert stats["kl"] == 0.0  # the first rollout: policy == reference (LoRA B starts at 0)
    assert stats["kl_coef"] == 0.2 and stats["next_kl_coef"] == pytest.approx(0.2 * (1 - 0.2 * 5 / 10000))
    assert stats["mean_score"] == pytest.approx((9.0 + R_ILLEGAL) / 5)
    # paper semantics: mini_batch = batch = 5, 4 epochs, grad accumulation 4 -> one Adam step per PPO step
    assert stats["optimizer_steps"] == 1.0
    assert learner.export_adapter().version == 1
    stats = learner.step(q, [c, d, c, d, c], [3.0, 0.0, 3.0, 0.0, 3.0])
    assert stats["kl"] != 0.0 and learner.version == 2
    with pytest.raises(ValueError, match="batch_size=5"):
        learner.step(q[:3], [c] * 3, [1.0] * 3)


def test_learners_share_one_base(tiny_model_path: Path) -> None:
    host = PolicyHost(tiny_model_path)
    cfg = PPOConfig(learning_rate=1e-2, batch_size=1, mini_batch_size=1, gradient_accumulation_steps=1)
    a, b = PPOLearner(host, "agent-a", cfg), PPOLearner(host, "agent-b", cfg)
    tok = host.tokenizer
    q = [P.game_prompt_ids(tok, GAMES["IPD"], A12, None, None, np.random.default_rng(0))]
    c = P.answer_ids(tok, "action1")
    before_b = b.logprobs(q[0], c)
    a.step(q, [c], [1.0])
    assert b.logprobs(q[0], c) == before_b  # a's update leaves b's adapter alone
    assert a.logprobs(q[0], c) != before_b
    with pytest.raises(ConfigError):
        PPOLearner(host, "agent-a", cfg)


@pytest.mark.slow
def test_ppo_raises_probability_of_the_rewarded_action_from_its_own_samples(tmp_path: Path, tiny_model_path: Path) -> None:
    """No forced answers: an LLM agent in the paper's pair protocol answers only from its own samples (answer_mode =
    "mask", the two legal tokens, so every sample carries a reward signal), rewarded for defecting (aggressiveness,
    Vagg: +5 for D, 0 for C) against AC. PPO must bring P(defect) from the untrained adapter's (v0) value, below
    0.75, to above 0.9 over the last 25 decisions.
    lr 5e-3 instead of the paper's 1.41e-5 so that a tiny random model learns in tens of updates; the rest is the
    paper's config (batch 5, 4 epochs, grad accumulation 4, adaptive KL 0.2, score normalisation).
    """

    import polars as pl

    from actors.llm.config import LLMAgentConfig
    from scenarios.factory import build_groups
    from scenarios.run import with_agents
    from simulator.config import RunConfig
    from simulator.driver import run_sweep
    from tests.helpers import read_dataset

    cfg = RunConfig("1xVagg@llm_1xAC", num_iterations=300, num_runs=1, seed=0, output=tmp_path, protocol="pair",
                    episode_length=5)
    llm = LLMAgentConfig(model=str(tiny_model_path), answer_mode="mask", ppo=PPOConfig(learning_rate=5e-3))
    cfg = with_agents(cfg, llm=llm)
    start = time.monotonic()
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    df = read_dataset(cfg.dataset_dir).sort("iteration")
    assert df["selector_legal"].all() and (df["selector_answer_mode"] == "mask").all()
    p_d = 1.0 - df["selector_p_cooperate"].to_numpy()
    untrained = 1.0 - df.filter(pl.col("selector_adapter_version") == 0)["selector_p_cooperate"].to_numpy()
    first, last = float(np.mean(untrained)), float(np.mean(p_d[-25:]))
    assert first < 0.75, f"the untrained policy (adapter v0) should not already defect, P(D) = {first:.3f}"
    assert last > 0.9, f"P(D) went {first:.3f} -> {last:.3f} in {time.monotonic() - start:.0f} s"
    defect = df.with_columns(ep=pl.col("iteration") // 5).group_by("ep").agg((pl.col("selector_action") == 1).mean())
    assert defect.sort("ep")["selector_action"].tail(10).mean() > 0.8  # the sampled moves follow
