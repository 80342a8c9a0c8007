"""Live metrics (--log_to): the curves TensorBoard and offline W&B receive equal what the Parquet records say."""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from scenarios.cli import main
from scenarios.factory import build_groups
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.driver import run_batch, run_sweep
from simulator.errors import ConfigError
from simulator.tracking import open_tracker, track_every
from tests.helpers import need, read_dataset

POP = "1xUT_1xDE_1xTFT"
ITERATIONS = 30


def sweep(out: Path, log_to: str, runs: int = 2) -> RunConfig:
    cfg = RunConfig(POP, num_iterations=ITERATIONS, num_runs=runs, seed=3, output=out, log_to=log_to)
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    return cfg


def record_cooperation(dataset: Path) -> dict[tuple[int, int], float]:
    """(run, iteration) -> share of C among both players' moves, straight from the Parquet records."""
    df = read_dataset(dataset)
    coop = df.group_by("run", "iteration").agg(
        (((pl.col("selector_action") == 0).sum() + (pl.col("selected_action") == 0).sum()) / (2 * pl.len())).alias("c")
    )
    return {(r, t): c for r, t, c in coop.iter_rows()}


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the TensorBoard event files in log_dir."""
    ea = need("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})  # type: ignore[attr-defined]
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_curves_equal_the_records(tmp_path):
    cfg = sweep(tmp_path, "tensorboard")
    expected = record_cooperation(cfg.dataset_dir)
    for run in (0, 1):
        curves = scalars(cfg.dataset_dir / "tensorboard" / f"run={run}")
        assert {"game/cooperation", "game/payoff", "game/learning_reward", "learn/dilemma_td2"} <= set(curves)
        coop = curves["game/cooperation"]
        assert sorted(coop) == list(range(ITERATIONS))  # a 30-iteration run is logged at every iteration
        for t, value in coop.items():
            assert value == pytest.approx(expected[run, t], abs=1e-6)
    # the two runs are tracked apart: their curves differ somewhere (different seeds, learning agents)
    assert scalars(cfg.dataset_dir / "tensorboard" / "run=0") != scalars(cfg.dataset_dir / "tensorboard" / "run=1")


BLOCK, HEADER = 32768, 7  # the leveldb log layout of a .wandb file: 32 KiB blocks, 7-byte record headers


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of an offline .wandb file (wandb ships no public reader for it)."""
    pb = need("wandb.proto.wandb_internal_pb2")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:HEADER]
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir: Path) -> tuple[dict[str, object], dict[str, dict[int, float]]]:
    """(config, key -> {step: value}) of one offline W&B run folder."""
    (path,) = run_dir.glob("run-*.wandb")
    config: dict[str, object] = {}
    history: dict[str, dict[int, float]] = {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")  # type: ignore[attr-defined]
        if kind in ("run", "config"):  # the init config comes with the run record, or after it as its own record
            updates = rec.run.config.update if kind == "run" else rec.config.update  # type: ignore[attr-defined]
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}  # type: ignore[attr-defined]
            for k, v in items.items():
                history.setdefault(k, {})[int(items["_step"])] = v
    return config, history


def test_wandb_offline_run_holds_the_curves(tmp_path, monkeypatch):
    need("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")  # must not matter: the tracker is offline whatever the environment
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = sweep(tmp_path, "wandb")
    expected = record_cooperation(cfg.dataset_dir)
    folders = sorted((cfg.dataset_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    seen = set()
    for folder in folders:
        config, history = wandb_history(folder)
        run = int(config["run"])  # type: ignore[call-overload]
        seen.add(run)
        assert config["destination_folder"] == POP
        assert {"game/cooperation", "game/payoff", "learn/dilemma_td2"} <= set(history)
        coop = history["game/cooperation"]
        assert sorted(coop) == list(range(ITERATIONS))
        for t, value in coop.items():
            assert value == pytest.approx(expected[run, t])
    assert seen == {0, 1}


def test_none_writes_nothing_beside_the_records(tmp_path):
    cfg = sweep(tmp_path, "none")
    assert sorted(p.name for p in cfg.dataset_dir.iterdir()) == ["manifest.json", "run=0", "run=1"]


def test_log_to_is_not_part_of_the_identity_so_a_resume_may_change_it(tmp_path):
    sweep(tmp_path, "none", runs=1)
    cfg = sweep(tmp_path, "tensorboard", runs=2)  # resumes: only run 1 is computed, and tracked
    assert "log_to" not in cfg.identity()
    assert [p.name for p in (cfg.dataset_dir / "tensorboard").iterdir()] == ["run=1"]


def test_an_unknown_tracker_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord'.*valid: none, tensorboard, wandb"):
        RunConfig(POP, log_to="tensorbord")
    with pytest.raises(ConfigError, match="valid: none, tensorboard, wandb"):
        open_tracker("mlflow", tmp_path, "run=0", {})
    with pytest.raises(SystemExit) as e:
        main(["--destination_folder", POP, "--log_to", "mlflow", "--output", str(tmp_path)])
    assert e.value.code == 2 and "--log_to: invalid choice: 'mlflow'" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_says_what_to_install(tmp_path, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError, match=f"pip install {kind}"):
        open_tracker(kind, tmp_path, "run=0", {})


def test_nan_values_are_skipped(tmp_path):
    tracker = open_tracker("tensorboard", tmp_path, "run=0", {"seed": 0})
    tracker.log(0, {"game/payoff": 1.5, "learn/kl": math.nan})
    tracker.close()
    assert scalars(tmp_path / "tensorboard" / "run=0") == {"game/payoff": {0: 1.5}}


def test_a_crashed_run_still_flushes_its_curves(tmp_path):
    cfg = RunConfig(POP, num_iterations=200, num_runs=1, seed=3, output=tmp_path, log_to="tensorboard")

    def progress(n: int) -> None:
        raise RuntimeError("killed mid-run")

    with pytest.raises(RuntimeError, match="killed mid-run"):
        run_batch(cfg, [0], build_groups, progress)
    coop = scalars(cfg.dataset_dir / "tensorboard" / "run=0")["game/cooperation"]
    assert 0 < len(coop) < 200 and min(coop) == 0  # what was logged before the crash is on disk


def test_cheap_runs_log_about_a_thousand_points_llm_runs_every_iteration():
    assert track_every(30000, llm=False) == 30
    assert track_every(500, llm=False) == 1
    assert track_every(30000, llm=True) == 1


def test_llm_runs_track_their_answers_and_ppo(tmp_path, tiny_model_path):
    need("peft")
    from actors.llm.config import LLMAgentConfig, PPOConfig

    cfg = RunConfig("1xDe@llm_1xTFT", num_iterations=3, num_runs=1, seed=3, output=tmp_path, log_to="tensorboard")
    ppo = PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=1)
    cfg = with_agents(cfg, llm=LLMAgentConfig(model=str(tiny_model_path), ppo=ppo))
    run_sweep(cfg, build_groups, backend="inline", show_progress=False)
    curves = scalars(cfg.dataset_dir / "tensorboard" / "run=0")
    assert {"game/cooperation", "agents/legal", "agents/p_cooperate", "agents/adapter_version", "learn/ppo_updates"} <= set(
        curves
    )
    assert sorted(curves["agents/adapter_version"]) == [0, 1, 2]  # every iteration of an LLM run
    # the LLM's answers are averaged over its own moves in both roles; TFT's moves hold null in the LLM columns
    df = read_dataset(cfg.dataset_dir)
    for t, value in curves["agents/legal"].items():
        rows = df.filter(pl.col("iteration") == t)
        answers = pl.concat([rows["selector_legal"], rows["selected_legal"]]).drop_nulls().cast(pl.Float64)
        assert answers.len() == 2 and value == pytest.approx(answers.mean())
