"""PPOLearner: config, step statistics, optimizer-step semantics, and learning on a tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from actors.llm import prompts as P
from actors.llm.engine import GenerationRequest
from actors.llm.hf_engine import HFEngine
from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
from simulator.contracts import Action
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
def test_ppo_raises_probability_of_the_rewarded_token(tiny_model_path: Path) -> None:
    """Reward C (+1), D (0), illegal (R_illegal) on the IPD prompt; P(action1) must pass 0.9 within 60 PPO steps.

    Rollouts: 3 of the 5 answers per step are sampled from the synced HFEngine (one token, like the paper's fixed
    gen_len); 2 are the C answer, because a random tiny model almost never samples a legal token by itself (the
    paper's Gemma did). lr 5e-3 instead of 1.41e-5, so a tiny model learns in tens of steps; all else is the
    paper's config (KL 0.2 adaptive, score norm, 4 epochs, grad accumulation 4). Trials: about 20-25 steps.
    """
    learner = PPOLearner(tiny_model_path, "agent-a", PPOConfig(learning_rate=5e-3))
    engine = HFEngine(tiny_model_path, seed=1)
    engine.load_adapter(learner.export_adapter())
    tok = engine.tokenizer
    rng = np.random.default_rng(0)
    c, d = P.answer_ids(tok, "action1")[:1], P.answer_ids(tok, "action2")[:1]
    p_c, start = 0.0, time.monotonic()
    for _ in range(60):
        queries = []
        for _ in range(5):
            own, opp = (Action(int(x)) for x in rng.integers(0, 2, 2))
            queries.append(P.game_prompt_ids(tok, GAMES["IPD"], A12, own, opp, rng))
        p_c = float(engine.action_probs(["agent-a"] * 5, queries, c, d)[:, 0].min())
        if p_c > 0.9:
            break
        sampled = engine.generate([GenerationRequest(tuple(q), "agent-a", max_new_tokens=1) for q in queries[2:]])
        responses = [c, c, *(list(r.token_ids) for r in sampled)]
        scores = []
        for r in responses:
            action = P.parse_answer(tok.decode(r, skip_special_tokens=True), A12)
            scores.append(R_ILLEGAL if action is None else (1.0 if action == Action.C else 0.0))
        learner.step(queries, responses, scores)
        engine.load_adapter(learner.export_adapter())
    assert p_c > 0.9, f"P(action1) reached only {p_c:.3f} in {time.monotonic() - start:.0f} s"
