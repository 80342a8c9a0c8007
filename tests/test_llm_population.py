"""LLM agents inside populations, end to end through main.py's driver: tiny random models, real HF and vLLM engines."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from actors.llm.agent import LLMAgentConfig, LLMGroup
from actors.llm.config import PPOConfig
from actors.llm.learners import StepJob
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.contracts import DilemmaBatch
from simulator.driver import run_sweep
from simulator.errors import ConfigError, StaleAdapterError
from simulator.games import GAMES
from tests.helpers import need, read_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL_PPO = PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1)


def run_llm(tmp_path: Path, population: str, iterations: int, **llm: object) -> pl.DataFrame:
    cfg = RunConfig(population, num_iterations=iterations, num_runs=2, seed=3, output=tmp_path)
    config = LLMAgentConfig(model=str(llm.pop("model")), ppo=SMALL_PPO, **llm)  # type: ignore[arg-type]
    cfg = with_agents(cfg, llm=config)
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    return read_dataset(cfg.dataset_dir)


@pytest.mark.parametrize("selection", ["random", "prompt", "dqn"])
def test_mixed_population_with_llm_agents(tmp_path, tiny_model_path, selection):
    df = run_llm(tmp_path, "1xUT@llm_1xDE@llm_1xTFT_1xS@dqn", 4, model=tiny_model_path, selection=selection)
    assert df.height == 2 * 4 * 4
    llm = df.filter(pl.col("selector_type").is_in(["UT", "DE"]))
    others = df.filter(~pl.col("selector_type").is_in(["UT", "DE"]))
    # LLM columns are filled for LLM players and null for everyone else
    assert llm["selector_legal"].null_count() == 0 and llm["selector_raw_answer"].null_count() == 0
    assert others["selector_legal"].null_count() == others.height
    # an illegal answer keeps the agent's last move (the paper's state rule), with reason "illegal" and R_illegal;
    # selected_state is the selector's own snapshot move
    illegal = llm.filter(~pl.col("selector_legal"))
    assert illegal.height > 0
    assert (illegal["selector_action"] == illegal["selected_state"]).all()
    assert (illegal["selector_reason"] == "illegal").all()
    assert (illegal["selector_learning_reward"] == -6).all()
    legal = llm.filter(pl.col("selector_legal"))
    assert (legal["selector_reason"] == "policy").all()
    # PPO ran (2 decisions per LLM agent per iteration, batch 2) and every later decision used a newer adapter
    versions = llm.group_by("run", "selector").agg(pl.col("selector_adapter_version").max())
    assert (versions["selector_adapter_version"] >= 2).all()
    assert llm.filter(pl.col("iteration") == 0)["selector_adapter_version"].max() == 0
    p = llm["selector_p_cooperate"]
    assert ((p >= 0) & (p <= 1)).all()
    if selection == "prompt":
        assert set(llm["selection_reason"].unique()) <= {"policy", "illegal"}
    if selection == "dqn":
        assert set(llm["selection_reason"].unique()) <= {"first", "greedy", "explore"}
    adapters = sorted((tmp_path / "1xUT@llm_1xDE@llm_1xTFT_1xS@dqn").glob("run=*/adapters/slot*/adapter_config.json"))
    assert len(adapters) == 4


def test_llm_agents_on_vllm_in_a_population(tmp_path, tiny_model_path):
    need("vllm")
    df = run_llm(tmp_path, "1xDe@llm_1xTFT", 3, model=tiny_model_path, engine="vllm")
    llm = df.filter(pl.col("selector_type") == "De")
    assert llm.height == 2 * 3 and llm["selector_raw_answer"].null_count() == 0
    assert llm["selector_adapter_version"].max() >= 1


def test_stale_adapter_is_reported_not_used(tiny_model_path):
    rngs = [[np.random.default_rng(0)]]
    group = LLMGroup(np.array([0]), 2, GAMES["IPD"], rngs, LLMAgentConfig(model=str(tiny_model_path), ppo=SMALL_PPO))
    (job,) = group.learners.submit([StepJob(group.names[0], [[1, 2, 3]] * 2, [[4]] * 2, [1.0, 0.0])])
    group.serving.served[group.adapter(0)] = job.result().version  # the group expects v1; the engine never got it
    batch = DilemmaBatch(1, np.zeros(1, int), np.zeros(1, int), np.ones(1, int), np.zeros(1, np.int8),
                         np.zeros(1, np.int8), np.full((1, 2), 0.5))
    with pytest.raises(StaleAdapterError, match="came from version 0, expected >= 1"):
        group.act(batch)


def test_bad_llm_settings_are_named():
    with pytest.raises(ConfigError, match="random, dqn, prompt"):
        LLMAgentConfig(selection="telepathy")
    with pytest.raises(ConfigError, match="hf, vllm"):
        replace(LLMAgentConfig(), engine="tgi").__post_init__()


def test_evaluation_matrix_on_a_saved_adapter(tmp_path, tiny_model_path):
    run_llm(tmp_path, "1xDe@llm_1xTFT", 2, model=tiny_model_path)
    adapter = next((tmp_path / "1xDe@llm_1xTFT").glob("run=0/adapters/slot0"))
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "main.py", "evaluate", "--model", str(tiny_model_path), "--adapter", str(adapter),
         "--samples", "2", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = pl.read_parquet(out / "eval.parquet")
    table = pl.read_csv(out / "eval_table.csv")
    assert set(answers["game"].unique()) == {"IPD", "ISH", "IVD", "ICN", "BOS", "ICD", "-"}
    assert {"structured", "reversed", "permuted", "unstructured", "value_ut", "value_de", "poetic", "unrelated"} == set(
        answers["prompt_variant"].unique())
    assert answers["action_tokens"].n_unique() >= 7
    assert (answers.filter(~pl.col("legal"))["action"].null_count() == answers.filter(~pl.col("legal")).height)
    assert table.height == 6 + 7 + 7 + 1 and {"cooperation_rate", "illegal_rate"} <= set(table.columns)
    # the masked answer mode (as the CPU demo trains): every answer is one of the two legal tokens
    proc = subprocess.run(
        [sys.executable, "main.py", "evaluate", "--model", str(tiny_model_path), "--adapter", str(adapter),
         "--samples", "1", "--output", str(out / "mask"), "--answer_mode", "mask"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    masked = pl.read_parquet(out / "mask" / "eval.parquet")
    assert masked["legal"].all() and (masked["answer_mode"] == "mask").all()


def test_demo_scenario_parses_and_names_errors(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--scenario", "iclr2025/no_such"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "de_vs_tft_smollm2" in proc.stderr


def test_random_action_tokens_are_drawn_per_run_from_the_run_streams(tiny_model_path):
    from simulator.seeding import run_streams

    def group(runs: list[int]) -> LLMGroup:
        rngs = [[run_streams(5, r, 2).agents[0]] for r in runs]
        return LLMGroup(np.array([0]), 2, GAMES["IPD"], rngs,
                        LLMAgentConfig(model=str(tiny_model_path), tokens="random:3", ppo=SMALL_PPO, train=False))

    both, alone = group([0, 1]), group([1])
    assert both.runs[0].tokens != both.runs[1].tokens  # each run its own pair
    assert both.runs[1].tokens == alone.runs[0].tokens  # a run's pair does not depend on its batch
    # the draw comes from a side stream: the agent's own stream draws what it would without it
    fresh = run_streams(5, 1, 2).agents[0]
    fresh.integers(2**31)  # the learner's seed, the group's one draw at start-up
    assert both.rngs[1].random() == fresh.random()
