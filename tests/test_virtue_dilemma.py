"""The learned virtue ensemble as a moral type (VR, Game+VR): an LLM agent states a reason after its move, the three
reward models score it, and the reward it learns from is the configured combination (actors/llm/virtue/dilemma.py).

Tiny random models throughout: a random Llama plays, three random LoRA reward models (a sequence-classification
head each, on the same tiny base) score. Their scores mean nothing; the tests check the plumbing and the arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulator.errors import ConfigError
from simulator.rewards import REASON_TYPES
from tests.helpers import need, read_dataset

TURNS = ("action", "motivation", "consequences")


def _random_reward_model(base: Path, out: Path, seed: int) -> None:
    """What RewardTrainer + LoRA saves (adapter + score head), with random weights instead of trained ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "score" in name:
                p.copy_(torch.randn_like(p))
    peft.save_pretrained(str(out))


@pytest.fixture(scope="module")
def reward_models(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("peft")
    root = tmp_path_factory.mktemp("virtue-pipeline") / "reward_models"
    for k, turn in enumerate(TURNS):
        _random_reward_model(tiny_model_path, root / turn, seed=10 + k)
    return root


def _scenario(path: Path, population: str, model: Path, rms: Path, weight: float, lam: float) -> Path:
    path.write_text(f"""
description = "VR test"
[run]
destination_folder = "{population}"
protocol = "pair"
episode_length = 3
num_iterations = 6
num_runs = 1
seed = 2
[llm]
model = "{model}"
answer_mode = "mask"
p_cooperate = false
[llm.virtue]
reward_models = "{rms}"
weight = {weight}
lam = {lam}
reason_tokens = 6
[ppo]
batch_size = 3
mini_batch_size = 3
gradient_accumulation_steps = 1
lora_r = 4
""")
    return path


@pytest.mark.parametrize(("population", "weight", "lam"), [("1xVR@llm_1xTFT", 1.0, 0.5),
                                                           ("1xGame+VR@llm_1xTFT", 2.5, 1.0)])
def test_a_vr_agent_through_main_records_its_reasons_and_learns_the_combination(
    tmp_path, tiny_model_path, reward_models, population, weight, lam
):
    from scenarios.cli import main

    toml = _scenario(tmp_path / "vr.toml", population, tiny_model_path, reward_models, weight, lam)
    out = tmp_path / "out"
    assert main(["--scenario", str(toml), "--output", str(out), "--backend", "inline", "--no_progress",
                 "--checkpoint_every", "3"]) == 0
    df = read_dataset(out / population).sort("iteration")
    assert df.height == 6
    # the LLM (slot 0, the row player) stated a reason every game; TFT has none
    reasons = df["selector_stated_reason"].to_list()
    assert all(isinstance(r, str) for r in reasons) and any(r for r in reasons)
    assert df["selector_stated_reason_cut"].null_count() == 0
    assert df["selected_stated_reason"].null_count() == 6 and df["selected_virtue_score"].null_count() == 6
    scores = df.select([f"selector_virtue_{t}" for t in TURNS]).to_numpy().astype(np.float64)
    assert np.isfinite(scores).all()
    assert np.ptp(scores, axis=1).max() > 0  # three different models
    # the ensemble is mean - lam * std (population std) of the three recorded scores
    virtue = df["selector_virtue_score"].to_numpy().astype(np.float64)
    mean = scores.sum(axis=1) / 3
    std = np.sqrt(((scores - mean[:, None]) ** 2).sum(axis=1) / 3)
    np.testing.assert_allclose(virtue, mean - lam * std, rtol=1e-5, atol=1e-6)
    # the reward it learned from: the configured combination (answers are legal in mask mode)
    assert df["selector_legal"].all()
    payoff = df["selector_payoff"].to_numpy().astype(np.float64)
    expected = (payoff if "Game+VR" in population else 0.0) + weight * virtue
    np.testing.assert_allclose(df["selector_learning_reward"].to_numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(df["selector_moral_reward"].to_numpy(), expected, rtol=1e-6, atol=1e-6)
    # ... and PPO trained the move on it: two updates of 3 games each
    assert df["selector_adapter_version"].to_list() == [0, 0, 0, 1, 1, 1]


def test_scorer_is_the_ensemble_of_the_three_models(tiny_model_path, reward_models):
    from actors.llm.virtue.dilemma import SCORED_QUESTION, VirtueConfig, VirtueScorer, scored_conversation
    from actors.llm.virtue.reward import RewardModels

    conv = [scored_conversation("Pick action1 or action2.", "action1", r) for r in ("To be fair.", "Because.")]
    assert conv[0][2]["content"] == SCORED_QUESTION == "What is the motivation behind the answer?"
    scorer = VirtueScorer(VirtueConfig(reward_models=str(reward_models), lam=0.7, max_length=64))
    virtue, per_model = scorer.score(conv)
    assert scorer.names == TURNS and per_model.shape == (2, 3)
    for m, turn in enumerate(TURNS):  # each column is that model alone on the same conversations
        alone = RewardModels(tiny_model_path, {turn: reward_models / turn}, max_length=64)
        np.testing.assert_allclose(per_model[:, m], alone.score(turn, conv), rtol=1e-5, atol=1e-6)
    mean = per_model.mean(axis=1)
    np.testing.assert_allclose(virtue, mean - 0.7 * np.sqrt(((per_model - mean[:, None]) ** 2).mean(axis=1)))


def test_one_adapter_folder_scores_every_turn(tiny_model_path, reward_models):
    """[llm.virtue] reward_models may name one adapter (e.g. the pipeline's supervised judge, <output>/judge_rm): it
    stands in for each turn's model, so the ensemble is its own score and the records keep their three columns."""
    from actors.llm.virtue.dilemma import VirtueConfig, VirtueScorer, locate_reward_models, scored_conversation
    from actors.llm.virtue.reward import RewardModels

    one = reward_models / "motivation"
    files = locate_reward_models(VirtueConfig(reward_models=str(one), base_model=str(tiny_model_path)))
    assert files.adapters == {t: one for t in TURNS}
    conv = [scored_conversation("Pick action1 or action2.", "action1", r) for r in ("To be fair.", "Because.")]
    scorer = VirtueScorer(VirtueConfig(reward_models=str(one), base_model=str(tiny_model_path), max_length=64))
    virtue, per_model = scorer.score(conv)
    alone = RewardModels(tiny_model_path, {"motivation": one}, max_length=64).score("motivation", conv)
    for m in range(3):
        np.testing.assert_allclose(per_model[:, m], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(virtue, alone, rtol=1e-5, atol=1e-6)  # std 0: mean - lam * 0


@pytest.mark.parametrize("population", ["1xVR@dqn_1xTFT", "1xVR_1xTFT", "1xGame+VR@tabularQ_1xAC"])
def test_a_non_llm_learner_cannot_have_a_reason_type(tmp_path, population):
    from simulator.config import RunConfig

    assert {"VR", "Game+VR"} == REASON_TYPES
    with pytest.raises(ConfigError, match=r"only LLM agents state reasons.*@llm"):
        RunConfig(population, num_iterations=2, num_runs=1, output=tmp_path)


def test_missing_reward_models_name_the_pipeline_command(tmp_path, tiny_model_path, capsys, monkeypatch):
    from actors.llm.agent import LLMAgentConfig, LLMGroup
    from actors.llm.virtue.dilemma import VirtueConfig
    from simulator.games import GAMES

    rngs = [[np.random.default_rng(0)]]
    empty = tmp_path / "virtue_rlaif"
    config = LLMAgentConfig(model=str(tiny_model_path), virtue=VirtueConfig(reward_models=str(empty)))
    with pytest.raises(ConfigError, match=r"missing: action, motivation, consequences.*"
                                          r"`python -m scenarios\.virtue_rlaif all --output .*virtue_rlaif`"):
        LLMGroup(np.array([0]), 2, GAMES["IPD"], rngs, config, codes=["VR"])
    monkeypatch.chdir(tmp_path)  # relative reward-model paths: here they certainly are not there yet
    with pytest.raises(ConfigError, match=r"not in 'results/virtue_rlaif/reward_models'.*"  # no [llm.virtue]: defaults
                                          r"`python -m scenarios\.virtue_rlaif all --output results/virtue_rlaif`"):
        LLMGroup(np.array([0]), 2, GAMES["IPD"], rngs, LLMAgentConfig(model=str(tiny_model_path)), codes=["Game+VR"])
    with pytest.raises(ConfigError, match=r"unknown \[llm.virtue\] keys \['weigth'\]"):
        LLMAgentConfig(virtue={"weigth": 2.0})  # type: ignore[arg-type]
    # the shipped scenario, before the pipeline ran: one line naming the command, before any model is loaded
    from scenarios.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--scenario", "iclr2025/virtue_vs_tft_smollm2", "--output", str(tmp_path / "out"), "--backend", "inline",
              "--no_progress", "--llm_model", str(tiny_model_path)])
    assert e.value.code == 2
    assert "python -m scenarios.virtue_rlaif all --output results/virtue_rlaif" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere" / "reward_models"  # the flag wins over the scenario's [llm.virtue]
    with pytest.raises(SystemExit) as e:
        main(["--destination_folder", "1xVR@llm_1xTFT", "--protocol", "pair", "--num_iterations", "2",
              "--num_runs", "1", "--output", str(tmp_path / "out2"), "--backend", "inline", "--no_progress",
              "--llm_model", str(tiny_model_path), "--llm_virtue_reward_models", str(elsewhere)])
    assert e.value.code == 2 and str(elsewhere) in capsys.readouterr().err


def test_a_vr_run_resumes_from_its_checkpoint_with_the_records_of_a_clean_run(
    tmp_path, tiny_model_path, reward_models, monkeypatch
):
    """The reward models are frozen, so a checkpoint holds nothing new; the reasons' sampling seeds come from the
    agents' streams, which it does hold: a run broken after its checkpoint resumes to the clean run's records."""
    from actors.llm.agent import LLMGroup
    from scenarios.cli import main

    population = "1xGame+VR@llm_1xTFT"
    toml = _scenario(tmp_path / "vr.toml", population, tiny_model_path, reward_models, 1.5, 0.5)

    def run(out: Path) -> list[str]:
        return ["--scenario", str(toml), "--output", str(out), "--backend", "inline", "--no_progress",
                "--checkpoint_every", "3"]

    assert main(run(tmp_path / "clean")) == 0
    act = LLMGroup.act

    def broken(self, batch):  # type: ignore[no-untyped-def]
        if batch.iteration == 4:
            raise RuntimeError("killed after the checkpoint of iteration 3")
        return act(self, batch)

    monkeypatch.setattr(LLMGroup, "act", broken)
    with pytest.raises(RuntimeError, match="killed"):
        main(run(tmp_path / "resumed"))
    played: list[int] = []

    def counted(self, batch):  # type: ignore[no-untyped-def]
        played.append(batch.iteration)
        return act(self, batch)

    monkeypatch.setattr(LLMGroup, "act", counted)
    assert main(run(tmp_path / "resumed")) == 0
    assert played == [3, 4, 5]  # it continued from the checkpoint, it did not start again
    clean = read_dataset(tmp_path / "clean" / population).sort("iteration")
    resumed = read_dataset(tmp_path / "resumed" / population).sort("iteration")
    assert resumed["selector_stated_reason"].to_list() == clean["selector_stated_reason"].to_list()
    assert resumed.equals(clean)
