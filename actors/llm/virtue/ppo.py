"""PPO on free-text dialogues with the ensemble reward, reusing `actors.llm.learner.PPOLearner`.

One step, for `prompts_per_step` train prompts drawn without replacement (reshuffled each pass over them):

    engine (serves the learner's adapter, synced before the rollout)
      └► run_dialogues: the three turns, sampled at `temperature`
    EnsembleReward.score(conversation up to turn k) for every trained turn k   -> one reward per answer
    PPOLearner.step(queries = the context of each answer, responses = its tokens, scores = its reward)

Every trained turn of a dialogue is one PPO sample (batch = prompts_per_step x len(turns)); its query is the
chat-templated conversation before it, exactly as it was generated. The reference policy is the model PPO starts
from (the SFT model when that stage ran), through the learner's adapter-disabled forward.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.llm.engine import RolloutEngine
from actors.llm.learner import PPOConfig, PPOLearner
from actors.llm.virtue.dialogue import run_dialogues
from actors.llm.virtue.reward import EnsembleReward
from actors.llm.virtue.scoring import TURNS
from simulator.errors import ConfigError

logger = logging.getLogger(__name__)

ADAPTER = "virtue"


@dataclass(frozen=True)
class PPOStageConfig:
    steps: int = 8
    prompts_per_step: int = 4
    turns: tuple[str, ...] = TURNS
    """which answers of a dialogue are PPO samples (all three by default)."""
    temperature: float = 1.0
    """rollout sampling temperature; 1.0 samples from pi itself, the distribution PPO's ratios are about."""
    learning_rate: float = 1.41e-5
    ppo_epochs: int = 4
    gradient_accumulation_steps: int = 4
    """with mini-batch = batch, the 4 epochs are one accumulated Adam step per PPO step (as the ICLR run did)."""
    init_kl_coef: float = 0.2
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ConfigError(f"PPO needs steps >= 1 and prompts_per_step >= 1, got {self.steps}, {self.prompts_per_step}")
        bad = [t for t in self.turns if t not in TURNS]
        if bad or not self.turns:
            raise ConfigError(f"PPO turns must be a non-empty subset of {', '.join(TURNS)}, got {list(self.turns)}")

    def learner_config(self) -> PPOConfig:
        batch = self.prompts_per_step * len(self.turns)
        return PPOConfig(
            learning_rate=self.learning_rate, batch_size=batch, mini_batch_size=batch, ppo_epochs=self.ppo_epochs,
            gradient_accumulation_steps=self.gradient_accumulation_steps, init_kl_coef=self.init_kl_coef,
            lora_r=self.lora_r, lora_alpha=self.lora_alpha, seed=self.seed,
        )


def train_ppo(
    policy_dir: str | os.PathLike[str],
    engine: RolloutEngine,
    ensemble: EnsembleReward,
    prompts: Sequence[str],
    config: PPOStageConfig,
    max_tokens: Sequence[int],
    *,
    system: str | None = None,
    device: str = "cpu",
    progress: Any = None,
) -> tuple[PPOLearner, list[dict[str, float]]]:
    """Run `config.steps` PPO steps; returns the learner (its adapter is the result) and one stats row per step.

    `engine` must serve the same model as `policy_dir`; `progress` is an optional tqdm bar advanced once per step.
    """
    if len(prompts) < config.prompts_per_step:
        raise ConfigError(f"PPO needs at least prompts_per_step={config.prompts_per_step} train prompts, got {len(prompts)}")
    learner = PPOLearner(policy_dir, name=ADAPTER, config=config.learner_config(), device=device)
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    turn_idx = [TURNS.index(t) for t in config.turns]
    log = []
    for step in range(config.steps):
        if len(order) < config.prompts_per_step:
            order += rng.permutation(len(prompts)).tolist()
        picked, order = order[: config.prompts_per_step], order[config.prompts_per_step :]
        engine.load_adapter(learner.export_adapter())
        seeds = rng.integers(0, 2**31, size=len(picked)).tolist()
        dialogues = run_dialogues(engine, [prompts[i] for i in picked], seeds, max_tokens,
                                  temperature=config.temperature, adapter=ADAPTER, system=system)
        convs = [d.messages(k, system) for d in dialogues for k in turn_idx]
        reward, per_model = ensemble.score(convs)
        queries = [list(d.turns[k].query_ids) for d in dialogues for k in turn_idx]
        responses = [list(d.turns[k].token_ids) for d in dialogues for k in turn_idx]  # >= 1 token each
        stats = learner.step(queries, responses, reward.tolist())
        row = {"step": float(step), "reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
               **{f"rm_{n}": float(per_model[:, j].mean()) for j, n in enumerate(ensemble.names)},
               "truncated": float(np.mean([d.turns[k].truncated for d in dialogues for k in turn_idx])),
               **{k: stats[k] for k in ("kl", "kl_coef", "policy_loss", "value_loss", "entropy")}}
        log.append(row)
        logger.info("PPO step %d: reward %.4f (kl %.4f)", step, row["reward_mean"], row["kl"])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.3f}")
    return learner, log
