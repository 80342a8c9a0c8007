"""The ICLR job file as data (scenarios/iclr2025/jobs.toml): its expansion matches the authors' job file, and the
job command runs a subset on a tiny model, each group its own dataset with the job file's seeds as run ids."""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest

from scenarios.run import resolve
from scenarios.scenario import load_scenario
from simulator.errors import ConfigError, UnknownNameError
from tests.helpers import need, read_dataset

# The fine-tuning lines of JOBS_gemma_final.txt (liza-tennant/LLM_morality), counted by (script, reward, opponent,
# episodes per run): the --run values of each group. Read off the file by parsing its 147 `python` lines.
JOB_FILE = {
    ("fine_tune", "Game", "TFT", 1000): [1, 2, 3, 4, 5, 6],
    ("fine_tune", "De", "TFT", 1000): [1, 2, 3, 5, 6],
    ("fine_tune", "Ut", "TFT", 1000): [1, 2, 3, 5, 6],
    ("fine_tune", "Game+De", "TFT", 1000): [1, 2, 3, 5, 6],
    ("fine_tune", "Game then De", "TFT", 1000): [1, 2, 3, 4, 5, 6],  # 500 + 500
    ("fine_tune", "Game then Ut", "TFT", 1000): [1, 2, 3, 5, 6],
    **{("fine_tune", reward, opponent, 1000): [1, 2, 3, 4, 5, 6] if reward == "Game" else [1, 2, 3, 5, 6]
       for opponent in ("Random", "AD", "AC") for reward in ("Game", "De", "Ut", "Game+De")},
    ("2learners", "Game", "LLM", 1000): [1, 2, 3, 4, 5, 6],
    ("2learners", "De", "LLM", 1000): [1, 2, 3, 5, 6],
    ("2learners", "Ut", "LLM", 1000): [1, 2, 3, 5, 6],
    ("2learners", "Game+De", "LLM", 1000): [1, 2, 3, 5, 6],
    ("2learners", "Game then De", "LLM", 1000): [1, 2, 3, 5, 6],
    ("2learners", "Game then Ut", "LLM", 1000): [1, 2, 3, 5, 6],
    ("extra", "Game", "TFT", 1000): [1, 1, 1, 1, 1],  # five single runs with other PPO / LoRA settings
    ("extra", "Game+De", "LLM", 1000): [1, 2, 3, 5, 6],  # R_illegal 15
    ("unlearning", "Game then De", "Random", 2000): [1, 2, 3, 4, 5, 6],  # 1000 + 1000
    ("unlearning", "Game then Ut", "Random", 2000): [1, 2, 3, 5, 6],
}


def _key(g):  # type: ignore[no-untyped-def]
    codes = g.population.split("_")
    reward = codes[0].split("x", 1)[1].split("@")[0]
    if g.reward_schedule:
        reward = f"{reward} then {g.reward_schedule[0][2]}"
    opponent = "LLM" if len(codes) == 1 else codes[1].split("x", 1)[1]
    kind = ("extra" if g.name.startswith("extra") else "unlearning" if g.name.startswith("unlearning")
            else "2learners" if opponent == "LLM" else "fine_tune")
    return kind, reward, opponent, g.episodes


def test_the_job_expansion_matches_the_job_file():
    from scenarios.jobs import parse_groups

    groups = parse_groups("jobs", load_scenario("iclr2025/jobs").tables["job"])
    got: dict[tuple, list[int]] = {}
    for g in groups:
        got.setdefault(_key(g), []).extend(g.seeds)
    assert got == JOB_FILE
    assert sum(len(g.seeds) for g in groups) == 147 and len(groups) == 32
    # per reward x opponent: 5 or 6 seeds, as the job file ran them
    per = Counter({k: len(v) for k, v in got.items() if k[0] != "extra"})
    assert set(per.values()) == {5, 6}
    # two learners play batches of 3, everyone else 5; one PPO update per episode
    assert {g.batch_size for g in groups if "two learners" in g.name} == {3}
    assert {g.batch_size for g in groups if "two learners" not in g.name} == {5}


def test_without_bitsandbytes_only_the_qlora_group_is_skipped(monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    job = resolve(["--scenario", "iclr2025/jobs"])
    assert len(job.runs) == 31 and sum(c.num_runs for c in job.runs) == 146
    assert "skipping job group 'extra: Game vs TFT, QLoRA r4': quantize = nf4_double needs bitsandbytes" in caplog.text
    with pytest.raises(ConfigError, match="needs bitsandbytes"):  # asked of every group: refused, not skipped
        resolve(["--scenario", "iclr2025/jobs", "--llm_quantize", "nf4"])


def test_the_job_command_resolves_every_group_into_its_own_dataset(tmp_path):
    need("bitsandbytes")  # the QLoRA group's NF4 base
    job = resolve(["--scenario", "iclr2025/jobs", "--output", str(tmp_path)])
    assert len(job.runs) == 32 and sum(c.num_runs for c in job.runs) == 147  # every group runs, none skipped
    folders = {str(c.dataset_location) for c in job.runs}
    assert len(folders) == len(job.runs)  # no two groups share a folder
    de = next(c for c, g in zip(job.runs, job.jobs, strict=True) if g.name == "De vs TFT")
    assert (de.run_indices, de.num_iterations, de.episode_length, de.protocol) == ((1, 2, 3, 5, 6), 5000, 5, "pair")
    assert (de.agents.llm.ppo.batch_size, de.agents.llm.ppo.lora_r, de.checkpoint_every) == (5, 64, 25)
    two = next(c for c, g in zip(job.runs, job.jobs, strict=True) if g.name == "Game then De, two learners")
    assert (two.destination_folder, two.episode_length, two.reward_schedule) == ("2xGame@llm", 3, (("Game", 0.5, "De"),))
    assert two.agents.llm.ppo.mini_batch_size == 3
    by_name = {g.name: c for c, g in zip(job.runs, job.jobs, strict=True)}
    # the job file's own R_illegal per group: 6 everywhere but the extra groups (100, 15, and fine_tune.py's default)
    assert {n: c.r_illegal for n, c in by_name.items() if c.r_illegal != 6} == {
        "extra: Game vs TFT, LoRA r4, R_illegal 100": 100.0,
        "extra: Game vs TFT, LoRA alpha 128, R_illegal 100": 100.0,
        "extra: Game vs TFT, initial KL coefficient 0.4": 0.0014,
        "extra: Game vs TFT, gradient accumulation 4": 0.0014,
        "extra: Game+De, two learners, R_illegal 15": 15.0,
    }
    qlora = by_name["extra: Game vs TFT, QLoRA r4"].agents.llm
    assert (qlora.quantize, qlora.ppo.lora_r, qlora.ppo.gradient_accumulation_steps) == ("nf4_double", 4, 1)
    assert not qlora.ppo.use_score_scaling  # no --Rscaling on the extra lines
    assert {c.agents.llm.quantize for n, c in by_name.items() if "QLoRA" not in n} == {"none"}
    # a flag wins over the group's own value
    flagged = resolve(["--scenario", "iclr2025/jobs", "--only", "extra: Game+De, two learners, R_illegal 15",
                       "--r_illegal", "6"])
    assert flagged.runs[0].r_illegal == 6.0


def test_only_picks_groups_and_names_the_closest_on_a_typo():
    job = resolve(["--scenario", "iclr2025/jobs", "--only", "De vs TFT", "--only", "Game vs AC", "--only", "Ut vs AD"])
    assert [g.name for g in job.jobs] == ["De vs TFT", "Ut vs AD", "Game vs AC"]
    with pytest.raises(UnknownNameError, match=r"unknown job group 'De vs TfT'\. Did you mean 'De vs TFT'"):
        resolve(["--scenario", "iclr2025/jobs", "--only", "De vs TfT"])
    with pytest.raises(ConfigError, match="--only picks groups of a job scenario"):
        resolve(["--only", "De vs TFT"])


def test_a_job_subset_runs_on_a_tiny_model_and_resumes(tmp_path, tiny_model_path):
    need("peft")
    from scenarios.cli import main

    argv = ["--scenario", "iclr2025/jobs", "--only", "De vs TFT", "--only", "Game then Ut, two learners",
            "--num_iterations", "6", "--num_runs", "2", "--llm_model", str(tiny_model_path), "--llm_answer_mode",
            "mask", "--backend", "inline", "--no_progress", "--no-report", "--output", str(tmp_path)]
    assert main(argv) == 0
    root = tmp_path / "iclr2025_jobs"
    de = read_dataset(root / "de_vs_tft" / "1xDe@llm_1xTFT")
    assert sorted(de["run"].unique()) == [1, 2] and de.height == 2 * 6  # the job file's first two seeds
    two = read_dataset(root / "game_then_ut_two_learners" / "2xGame@llm")
    assert two.height == 2 * 6 and two["selected_legal"].null_count() == 0  # both players are LLM learners
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
    assert main(argv) == 0  # a second call finds every run done
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == before

    # the job file's inference part: every saved adapter evaluated, as its run trained (masked answers, the paper's
    # wording), then the report's generalisation figure across the seeds
    from analysis.report import write_report
    from scenarios.evaluate import evaluate_all, saved_adapters

    adapters = saved_adapters(root)
    assert len(adapters) == 2 + 2 * 2  # De vs TFT: slot 0 of runs 1, 2; two learners: slots 0 and 1 of runs 1, 2
    assert len(evaluate_all(root, samples=1)) == 6
    answers = pl.read_parquet(adapters[0] / "eval" / "eval.parquet")
    assert set(answers["answer_mode"]) == {"mask"} and "paper" in set(answers["prompt_variant"])
    assert evaluate_all(root, samples=1) == []  # evaluated already: nothing is done twice
    folders = [root / "de_vs_tft" / "1xDe@llm_1xTFT", root / "game_then_ut_two_learners" / "2xGame@llm"]
    write_report(folders, tmp_path / "report", dpi=30, names=["De vs TFT", "Game then Ut, two learners"])
    gen = pl.read_csv(tmp_path / "report" / "tables" / "compare_llm_generalisation.csv")
    assert set(gen["n_runs"]) == {2}  # every cell: the mean over the two seeds' adapters
    for name in ("compare_llm_generalisation", "paper_fine_tuning", "paper_two_learners", "paper_phased"):
        assert (tmp_path / "report" / "figures" / f"{name}.png").is_file()
