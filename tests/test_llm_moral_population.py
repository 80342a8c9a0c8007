"""Moral LLM populations (issue 16) on tiny random models: masked partner selection, shared adapters, and an LLM
that learns from its own samples to prefer the partner that pays it more."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from actors.llm.agent import LLMGroup
from actors.llm.config import LLMAgentConfig, PPOConfig
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.contracts import SelectionBatch
from simulator.driver import run_sweep
from simulator.errors import ConfigError
from simulator.games import GAMES
from simulator.seeding import run_streams
from tests.helpers import need, read_dataset

SMALL_PPO = PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1)


def run(tmp_path: Path, population: str, iterations: int, runs: int = 1, seed: int = 3, **llm: object) -> pl.DataFrame:
    cfg = RunConfig(population, num_iterations=iterations, num_runs=runs, seed=seed, output=tmp_path)
    ppo = llm.pop("ppo", SMALL_PPO)
    config = LLMAgentConfig(model=str(llm.pop("model")), ppo=ppo, **llm)  # type: ignore[arg-type]
    cfg = with_agents(cfg, llm=config)
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    return read_dataset(cfg.dataset_dir)


def test_masked_selection_answers_only_candidate_ids_and_ppo_trains_that_mask(tiny_model_path):
    need("peft")
    n = 12  # two-digit, zero-padded ids: "00" .. "11"
    streams = [run_streams(1, 0, n)]
    config = LLMAgentConfig(model=str(tiny_model_path), selection="prompt", answer_mode="mask", ppo=SMALL_PPO)
    slots = np.array([0, 5, 11])
    group = LLMGroup(slots, n, GAMES["IPD"], [[st.agents[s] for s in slots] for st in streams], config,
                     codes=["UT", "DE", "aUT"])
    state = np.random.default_rng(0).integers(0, 2, (1, 3, n - 1)).astype(np.int8)
    decisions = group.select(SelectionBatch(1, state, np.random.default_rng(1).random((1, 3, 2))))
    assert (decisions.reason == 1).all() or set(decisions.reason.ravel().tolist()) == {int(decisions.reason[0, 0])}
    assert not group._sel_illegal.any()  # every masked answer is a candidate's id
    assert ((decisions.choice >= 0) & (decisions.choice < n - 1)).all()
    for g, slot in enumerate(slots):
        sample = group._sel_samples[g]
        answer = group.tokenizer.decode(sample.response)
        assert answer in group.decider.partner_answers(g) and answer != f"{slot:02d}"  # never itself
        assert int(answer) == group.decider.others(g)[int(decisions.choice[0, g])]
        # the learner's log pi of that answer under the same mask is what the rollout recorded
        learner = group.learners.learners[group.adapter(g)]  # type: ignore[attr-defined]
        trie = group.decider.partner_trie(g)  # the mask: the candidates' id token sequences, however tokenized
        assert sample.allowed == trie.allowed(sample.response) and len(sample.allowed[0]) >= 2
        assert learner.logprobs(sample.prompt, sample.response, sample.allowed) == pytest.approx(sample.logprobs,
                                                                                                abs=1e-5)
        assert np.exp(sum(sample.logprobs)) < 1.0  # the mask renormalises; it does not make the answer certain
    group.close()


def test_masked_selection_end_to_end_is_always_legal(tmp_path, tiny_model_path):
    need("peft")
    df = run(tmp_path, "1xUT@llm_1xaUT@llm_1xDE@llm", 4, model=tiny_model_path, selection="prompt",
             answer_mode="mask")
    assert df.height == 4 * 3
    assert (df["selection_reason"] == "policy").all() and df["selector_legal"].all()
    assert (df["selector"] != df["selected"]).all()
    assert df["selector_adapter_version"].max() >= 1  # selection and move samples trained


def test_64_agents_of_4_types_share_4_adapters_and_keep_their_own_records(tmp_path, tiny_model_path):
    need("peft")
    population = "16xUT@llm_16xDE@llm_16xaUT@llm_16xmDE@llm"
    df = run(tmp_path, population, 2, model=tiny_model_path, adapters="per_type", answer_mode="mask",
             ppo=PPOConfig(batch_size=16, mini_batch_size=16, gradient_accumulation_steps=1))
    assert df.height == 2 * 64 and df["selector"].n_unique() == 64  # every agent selects, under its own id
    assert df.group_by("iteration").agg(pl.col("selector").n_unique())["selector"].to_list() == [64, 64]
    types = df.select("selector", "selector_type").unique()
    assert types.height == 64 and types.group_by("selector_type").len()["len"].to_list() == [16] * 4
    # one adapter per type, trained on the samples of its 16 agents: iteration 1 plays version 1 everywhere
    later = df.filter(pl.col("iteration") == 1)
    assert (later["selector_adapter_version"] >= 1).all()
    folders = sorted(p.name for p in (tmp_path / population).glob("run=0/adapters/*"))
    assert folders == ["type-DE", "type-UT", "type-aUT", "type-mDE"]


def test_adapter_modes_name_each_agents_adapter():
    from actors.llm.serving import Serving, adapter_names

    codes = ["UT", "DE", "UT"]
    assert adapter_names("per_agent", 1, [0, 1, 3], codes) == ["run0-slot0", "run0-slot1", "run0-slot3"]
    assert adapter_names("per_type", 2, [0, 1, 3], codes) == [
        "run0-type-UT", "run0-type-DE", "run0-type-UT", "run1-type-UT", "run1-type-DE", "run1-type-UT"]
    assert adapter_names("shared", 1, [0, 1, 3], codes) == ["run0-shared"] * 3
    assert adapter_names("per_type", 1, [4], ["Game+VR"]) == ["run0-type-Game_VR"]
    serving = Serving(adapter_names("per_type", 1, [0, 1, 3], codes))
    assert serving.names == ["run0-type-UT", "run0-type-DE"] and serving.agents("run0-type-UT") == [0, 2]
    with pytest.raises(ConfigError, match="valid: per_agent, per_type, shared"):
        LLMAgentConfig(adapters="per_moon")


def test_bad_population_settings_fail_before_any_model_loads():
    masked = LLMAgentConfig(model="/no/such/model", selection="prompt", answer_mode="mask")
    with pytest.raises(ConfigError, match="valid: selection = dqn or random, or answer_mode = free"):
        LLMGroup(np.arange(2), 66, GAMES["IPD"], [[np.random.default_rng(0)] * 2], masked)
    budget = LLMAgentConfig(selection="prompt", answer_mode="mask", max_new_tokens=1)
    with pytest.raises(ConfigError, match="2-digit agent id, more than max_new_tokens = 1"):
        budget.check_population(12)
    budget.check_population(10)  # one digit fits


def test_an_llm_learns_to_choose_the_partner_that_pays_it_more(tmp_path, tiny_model_path):
    """A selfish LLM between an always-cooperator (pays it 3 or 4) and an always-defector (0 or 1) learns from its
    own selection samples to pick the cooperator: the planted payoff difference is the only signal."""
    need("peft")
    ppo = PPOConfig(batch_size=4, mini_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-3,
                    lora_r=8, lora_alpha=16)
    df = run(tmp_path, "1xS@llm_1xAC_1xAD", 40, runs=4, seed=11, model=tiny_model_path, selection="prompt",
             answer_mode="mask", ppo=ppo)
    picks = df.filter(pl.col("selector_type") == "S").with_columns(
        (pl.col("selected_type") == "AC").alias("picks_ac"))
    first = picks.filter(pl.col("iteration") < 8)["picks_ac"].mean()
    last = picks.filter(pl.col("iteration") >= 32)["picks_ac"].mean()
    print(f"P(pick AC): first 8 iterations {first:.2f}, last 8 {last:.2f}")
    assert last >= 0.9 and last - first >= 0.25  # type: ignore[operator]


GEMMA_2_2B = {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True}


def _scenario_config(name: str) -> tuple[LLMAgentConfig, str]:
    from scenarios.run import resolve

    (cfg,) = resolve(["--scenario", name]).runs
    assert cfg.agents is not None and cfg.agents.llm is not None
    return cfg.agents.llm, cfg.destination_folder


def test_bad_adapter_modes_get_one_line_naming_the_valid_ones(capsys):
    from scenarios.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--destination_folder", "1xUT@llm_1xDE@llm", "--llm_adapters", "per_moon"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "valid: per_agent, per_type, shared" in err[0]


def test_the_population_scenarios_parse_and_the_gpu_mix_fits_its_gpus(tmp_path):
    import json

    from actors.llm import budget
    from simulator.population import parse_population

    cpu, folder = _scenario_config("llm_population/ut_aut_de_smollm2")
    assert (cpu.answer_mode, cpu.selection, cpu.variant, cpu.ppo.share_prefix) == ("mask", "prompt", "compact", True)
    assert cpu.ppo.fused_adam
    assert folder == "1xUT@llm_1xaUT@llm_1xDE@llm"
    gpu, folder = _scenario_config("llm_population/aies_mix_16_gpu")
    pop = parse_population(folder)
    assert pop.size == 16 and all(a.learner == "llm" for a in pop.agents)
    assert (gpu.answer_mode, gpu.engine, gpu.device, gpu.actors.rollout_actors) == ("free", "vllm", "cuda", 1)
    (tmp_path / "config.json").write_text(json.dumps(GEMMA_2_2B))
    shape = budget.ModelShape.from_dir(tmp_path)
    assert 2.5e9 < shape.params < 2.7e9 and 80e6 < shape.lora_params(64) < 86e6  # Gemma-2-2B; LoRA r64: 83M
    codes = [a.code for a in pop.agents]
    fits = budget.check_memory(gpu, shape, codes, 16, 1, budget.available_bytes(gpu))
    assert fits < 2 * 80 * budget.GiB
    # 1,024 agents with one adapter each do not fit two GPUs; the error names the way out
    many = ["S"] * 1024
    with pytest.raises(ConfigError, match="adapters = per_type or shared"):
        budget.check_memory(gpu, shape, many, 1024, 1, budget.available_bytes(gpu))
