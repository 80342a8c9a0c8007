"""Reward models (TRL RewardTrainer + LoRA) and the ensemble reward, on a tiny random model: a planted preference is
learned (held-out accuracy above 0.9), inputs are cut from the left like the report's 100 tokens, the ensemble's
numbers are its formula over the models, and several adapters on one base score like each one alone."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from actors.llm.virtue.scoring import ensemble_reward
from tests.helpers import need

WORDS = ("the", "game", "round", "player", "points", "partner", "choose", "move", "score", "table", "option", "agent")


def _planted(n: int, seed: int) -> list[dict]:
    """Same question, same filler; the chosen answer cooperates, the rejected one defects."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = "What should I do in this game? " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 6)))
        rows.append({
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": f"I cooperate with my partner, {filler}."}],
            "rejected": [{"role": "assistant", "content": f"I defect against my partner, {filler}."}],
        })
    return rows


@pytest.fixture(scope="module")
def trained(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("trl")
    from actors.llm.virtue.reward import RewardModelConfig, train_reward_model

    root = tmp_path_factory.mktemp("rm")
    cfg = RewardModelConfig(max_length=64, epochs=6, learning_rate=3e-3, gradient_accumulation_steps=1, batch_size=16,
                            lora_r=8, lora_alpha=16)
    planted = train_reward_model(tiny_model_path, _planted(64, seed=0), root / "planted", cfg)
    # a second model trained on the reverse preference: the ensemble then holds two models that disagree
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in _planted(64, seed=1)]
    reverse = train_reward_model(tiny_model_path, flipped, root / "reverse", RewardModelConfig(
        max_length=64, epochs=6, learning_rate=3e-3, gradient_accumulation_steps=1, batch_size=16, lora_r=8,
        lora_alpha=16, seed=1))
    return {"planted": planted, "reverse": reverse}


def test_reward_model_learns_a_planted_preference(trained, tiny_model_path: Path):
    from actors.llm.virtue.reward import RewardModels, preference_accuracy

    assert (trained["planted"] / "adapter_config.json").is_file()
    models = RewardModels(tiny_model_path, {"planted": trained["planted"]}, max_length=64)
    held_out = _planted(48, seed=99)  # prompts and fillers never seen in training
    assert preference_accuracy(models, "planted", held_out) > 0.9


def test_untrained_head_is_not_the_reason(trained, tiny_model_path: Path):
    """The reverse-trained model ranks the same held-out pairs the other way round."""
    from actors.llm.virtue.reward import RewardModels, preference_accuracy

    models = RewardModels(tiny_model_path, {"reverse": trained["reverse"]}, max_length=64)
    assert preference_accuracy(models, "reverse", _planted(48, seed=99)) < 0.1


def test_ensemble_reward_and_shared_base(trained, tiny_model_path: Path):
    from actors.llm.virtue.reward import EnsembleReward, RewardModels

    both = RewardModels(tiny_model_path, trained, max_length=64, batch_size=5)
    ensemble = EnsembleReward(both, lam=0.5)
    convs = [[*r["prompt"], *r[side]] for r in _planted(6, seed=5) for side in ("chosen", "rejected")]
    reward, per_model = ensemble.score(convs)
    assert per_model.shape == (12, 2) and reward.shape == (12,)
    np.testing.assert_allclose(reward, per_model.mean(1) - 0.5 * per_model.std(1))
    np.testing.assert_allclose(reward, ensemble_reward(per_model, 0.5))
    for k, name in enumerate(("planted", "reverse")):  # each adapter on the shared base scores as it does alone
        alone = RewardModels(tiny_model_path, {name: trained[name]}, max_length=64)
        np.testing.assert_allclose(per_model[:, k], alone.score(name, convs), rtol=1e-4, atol=1e-5)
    # turn_scores: model k scores the k-th conversation of each dialogue
    ts = ensemble.turn_scores([[convs[0], convs[1]], [convs[2], convs[3]]])
    np.testing.assert_allclose(ts, [[per_model[0, 0], per_model[1, 1]], [per_model[2, 0], per_model[3, 1]]], rtol=1e-5)
    with pytest.raises(ValueError, match="one conversation per model"):
        ensemble.turn_scores([[convs[0]]])


def test_inputs_keep_their_last_tokens(tiny_model_path: Path):
    need("transformers")
    from transformers import AutoTokenizer

    from actors.llm.virtue.dialogue import template_ids
    from actors.llm.virtue.reward import rm_input_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    conv = [{"role": "user", "content": "a long question " * 20}, {"role": "assistant", "content": "the answer"}]
    full = template_ids(tok, conv, add_generation_prompt=False)
    assert len(full) > 30
    assert rm_input_ids(tok, conv, 30) == full[-30:]  # the judged answer survives; the question's start goes
    assert rm_input_ids(tok, conv, 10_000) == full
