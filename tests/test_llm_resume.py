"""Nothing lost: LLM runs checkpoint their whole state, and continue after a SIGKILL of the driver, of a learner actor
or of a rollout actor with complete, unique records, equal to a run that never stopped.

Every kill is real: SIGKILL of a process found by its pid (the driver started with subprocess, Ray's actor workers
by their process title `ray::LearnerActor` / `ray::RolloutActor`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from actors.llm.config import LLMActors, LLMAgentConfig, PPOConfig
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.driver import STAGING, run_sweep
from tests.helpers import llm_main_argv, need, read_dataset, sigkill_after_checkpoint, writer_staging

ROOT = Path(__file__).resolve().parents[1]
POP = "1xUT@llm_1xDE@llm_1xTFT"
SMALL_PPO = PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3, lora_r=8)


def _checkpoint(folder: Path) -> dict | None:
    for path in folder.glob(f"{STAGING}/*/writer-*/checkpoint-runs=*/checkpoint.json"):
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):  # being replaced right now
            return None
    return None


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _main(out: Path, model: Path, iterations: int) -> list[str]:
    return llm_main_argv(POP, out, model, iterations)


def test_a_killed_driver_resumes_from_its_checkpoint_with_the_records_of_a_clean_run(tmp_path, tiny_model_path):
    iterations = 30
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    ckpt = sigkill_after_checkpoint(_main(killed, tiny_model_path, iterations), env, POP, killed, iteration=6)
    stage = Path(writer_staging(killed, POP) or "") / "run=0"
    assert not (killed / POP / "run=0").exists()  # killed mid-run
    before = _digest([stage / name for name in ckpt["parts"]["0"]])
    assert before  # the checkpoint names parts already written

    subprocess.run(_main(killed, tiny_model_path, iterations), cwd=ROOT, env=env, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    clean = tmp_path / "clean"
    subprocess.run(_main(clean, tiny_model_path, iterations), cwd=ROOT, env=env, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
    resumed = read_dataset(killed / POP)
    assert resumed.height == iterations * 3
    assert resumed.select("iteration", "order").is_duplicated().sum() == 0  # nothing written twice
    assert_frame_equal(resumed, read_dataset(clean / POP))  # nothing lost, nothing different
    after = _digest([killed / POP / "run=0" / name for name in ckpt["parts"]["0"]])
    assert after == before  # the records written before the checkpoint were not touched
    assert writer_staging(killed, POP) is None  # a finished batch leaves no staging and no checkpoint


# ── killed actors ───────────────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def ray_local():
    ray = need("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def _pids(title: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ray::{title}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _run_on_actors(out: Path, model: Path, kill: str | None, engine: str,
                   iterations: int = 12) -> tuple[pl.DataFrame, float]:
    """The population on 1 rollout + 1 learner actor; with `kill`, SIGKILL that actor's process once the run has
    checkpointed at iteration >= 4. Returns the records and the seconds from the kill to the run's end."""
    cfg = RunConfig(POP, num_iterations=iterations, num_runs=1, seed=4, output=out, checkpoint_every=2)
    llm = LLMAgentConfig(model=str(model), engine=engine, ppo=SMALL_PPO,
                         actors=LLMActors(rollout_actors=1, learner_actors=1))
    killed_at: list[float] = []

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ckpt = _checkpoint(out)
            pids = _pids(kill)  # type: ignore[arg-type]
            if ckpt is not None and ckpt["iteration"] >= 4 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed_at.append(time.monotonic())
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True) if kill else None
    if thread:
        thread.start()
    cfg = with_agents(cfg, llm=llm)
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    end = time.monotonic()
    if thread:
        thread.join(1)
        assert killed_at, f"the {kill} was never killed"
    return read_dataset(cfg.dataset_dir), (end - killed_at[0]) if killed_at else 0.0


@pytest.mark.parametrize("kill, engine", [("LearnerActor", "hf"), ("RolloutActor", "vllm"), ("LearnerActor", "vllm")])
def test_a_killed_actor_is_restarted_and_the_run_completes_with_the_records_of_a_clean_run(
    ray_local, tmp_path, tiny_model_path, kill, engine
):
    if engine == "vllm":
        need("vllm")
    got, after_kill = _run_on_actors(tmp_path / "killed", tiny_model_path, kill, engine)
    clean, _ = _run_on_actors(tmp_path / "clean", tiny_model_path, None, engine)
    assert got.height == clean.height == 12 * 3
    assert got.select("iteration", "order").is_duplicated().sum() == 0
    assert_frame_equal(got, clean)
    print(f"{kill} killed: the run finished {after_kill:.1f} s later")


def test_checkpoint_of_another_configuration_is_not_used(tmp_path, tiny_model_path):
    """A checkpoint is only ever resumed by the configuration (and batch) that wrote it."""
    from simulator.driver import read_checkpoint, write_checkpoint

    cfg = RunConfig(POP, num_iterations=4, num_runs=1, seed=4, output=tmp_path, checkpoint_every=2)
    llm = LLMAgentConfig(model=str(tiny_model_path), ppo=SMALL_PPO)
    cfg = with_agents(cfg, llm=llm)
    from simulator.driver import build_engine

    engine, _ = build_engine(cfg, [0], build_groups)
    root = str(tmp_path / STAGING / POP / "writer-00000001")
    stage = Path(root) / "run=0"
    stage.mkdir(parents=True)
    engine.step()
    write_checkpoint(cfg, [0], engine, [stage], rows=0, root=root)
    assert read_checkpoint(cfg, [0], root) is not None
    assert read_checkpoint(replace(cfg, seed=5), [0], root) is None
    assert read_checkpoint(cfg, [0, 1], root) is None
