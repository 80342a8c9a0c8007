"""The virtue-ethics RLAIF pipeline of seed 004, stage by stage, each resuming from what is on disk.

    train-judge  (judge mode supervised, the default) a LoRA classifier on the      judge_rm/
                 labelled pairs' train split: the supervised judge
    judge-check  the judge on the labelled pairs' check split, both orders:      judge_check/<judge>.json,
                 accuracy with a bootstrap interval, order consistency           judge_check/<judge>.parquet
    curate     prompts ─► two three-turn dialogues per prompt with the policy      dialogues.parquet
    judge      each pair, each turn, both orders, five virtues ─► majority          judgements.parquet,
                                                                                   preferences/<turn>.parquet
    train-rm   one reward model per turn (TRL RewardTrainer, LoRA)                  reward_models/<turn>/,
                                                                                   reward_models/metrics.json
    vr-check   does the VR reward depend on the move? the base policy's reasons    vr_check/summary.json,
               after C and after D on the VR agent's game prompts, scored by the    vr_check/reasons.parquet
               reward models (and the supervised judge): paired C - D, correlation
    sft        LoRA SFT on the chosen answers, merged (optional: --no-sft)          sft/merged/
    ppo        PPO with the ensemble reward, from the SFT model                     ppo/adapter/, ppo/steps.parquet
    evaluate   base, SFT and SFT+PPO on the held-out prompts: the report's score    eval/<model>.parquet,
               with a bootstrap interval, and paired differences                    eval/summary.json
               (--eval_reward_models DIR: scored by other reward models, in eval-<DIR name>/;
               --eval_judge MODEL: that judge also compares each model's answers with the base's)

The judge's accuracy (judge-check) is carried into judge_summary.json, reward_models/metrics.json (beside the reward
models' own accuracy on the same labelled pairs) and eval/summary.json, with the name of the evaluator.

A stage whose output exists is skipped (delete the output to redo it); curate, judge and evaluate also keep the
chunks they finished (`parts/`), so an interrupted stage resumes where it stopped. Every file is written beside its
target and renamed into place, so a crash never leaves a half output that a resumed run would take as done.
`<out>/config.json` holds the configuration of the last invocation and `<out>/timings.json` each stage's wall time.

Modules: actors/llm/virtue/ (dialogue, judge, reward, sft, ppo; pure maths in scoring.py), this file the order
and the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from actors.llm.virtue.data import (
    PromptRecord,
    load_labelled,
    load_prompts,
    select_prompts,
    stable_seed,
    truncation_rates,
    write_json_atomic,
    write_parquet_atomic,
)
from actors.llm.virtue.ppo import PPOStageConfig
from actors.llm.virtue.reward import RewardModelConfig
from actors.llm.virtue.scoring import JUDGE_RULES, TURNS, Tally, bootstrap_difference, bootstrap_score
from actors.llm.virtue.sft import SFTStageConfig
from simulator.errors import ConfigError

log = logging.getLogger("moralsim.virtue")

SHIPPED_PROMPTS = Path(__file__).with_name("prompts.jsonl")
LABELLED_DIR = Path(__file__).with_name("labelled")
SHIPPED_LABELLED = (LABELLED_DIR / "ethics_pairs.jsonl", LABELLED_DIR / "handwritten_pairs.jsonl")
JUDGE_MODES = ("compare", "per-virtue", "pointwise", "supervised")  # actors/llm/virtue/judge.py
PASS_LOW, PASS_CONSISTENCY = 0.6, 0.7
"""a judge passes the check when the lower 95% bound of its accuracy is above PASS_LOW on every labelled set and its
order consistency is at least PASS_CONSISTENCY on each."""
DEFAULT_SYSTEM = "You are a helpful assistant. Answer in at most three sentences."
DEFAULT_JUDGE_MODE = "supervised"
DEFAULT_JUDGE_RM = RewardModelConfig(max_length=128, epochs=1.0, learning_rate=1e-3, gradient_accumulation_steps=1,
                                     batch_size=8, lora_r=16, lora_alpha=32)
"""the supervised judge's training settings that passed the judge check (ETHICS 0.688, hand-written 0.806)."""
STAGES = ("train-judge", "judge-check", "curate", "judge", "train-rm", "vr-check", "sft", "ppo", "evaluate")
ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class PipelineConfig:
    output: Path
    model: str = "smollm2-135m-instruct"
    """policy model: an embedded name, a local model folder or a hub id; also the reward models' base."""
    judge_model: str | None = None
    """None: the policy model judges its own answers (the report's set-up)."""
    prompts: Path = SHIPPED_PROMPTS
    max_train_prompts: int | None = None
    max_heldout_prompts: int | None = None
    system_prompt: str | None = DEFAULT_SYSTEM
    max_tokens: tuple[int, int, int] = (96, 64, 64)
    """token limit of the action, motivation and consequences turns (the report: 32 each)."""
    temperature: float = 0.7
    """curation and evaluation sampling temperature."""
    chunk: int = 16
    """prompts per generate / judge call: the progress step, and the resume unit."""
    tie_margin: float = 0.0
    """a virtue is tied when |P(A better) - 0.5| <= tie_margin."""
    engine: str = "hf"
    device: str = "cpu"
    seed: int = 0
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    sft: SFTStageConfig | None = field(default_factory=SFTStageConfig)
    """None skips the SFT stage; PPO then starts from the base model."""
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    lam: float = 0.5
    """ensemble reward = mean - lam * std over the three reward models."""
    bootstrap: int = 2000
    judge_mode: str = DEFAULT_JUDGE_MODE
    """how the judge is asked (actors/llm/virtue/judge.py): compare, per-virtue, pointwise or supervised. The
    default, supervised, is the one candidate that passed the judge check on this CPU (README, issue 18)."""
    judge_rule: str = "average"
    """average: the order-averaged probability decides a virtue; agree: a point only when both orders agree."""
    judge_adapter: Path | None = None
    """supervised judge: the reward-model adapter (default <output>/judge_rm, made by the train-judge stage)."""
    judge_rm: RewardModelConfig = field(default_factory=lambda: DEFAULT_JUDGE_RM)
    """the supervised judge's training: the labelled train pairs (382 shipped), 8 per step, one epoch at lr 1e-3
    (48 optimiser steps): the settings that passed the check."""
    labelled: tuple[Path, ...] = SHIPPED_LABELLED
    """labelled pair files (JSONL): the judge-check scores their check split, train-judge trains on their train split."""
    check_max_pairs: int | None = None
    """judge-check and the reward models' labelled accuracy: the first N check pairs of each subset (None = all),
    for a slow judge."""
    vr_check_orders: int = 4
    """vr-check: option orders per history (5 histories), so 5 x this many game prompts."""
    vr_check_samples: int = 4
    """vr-check: reasons per prompt and move."""
    eval_reward_models: Path | None = None
    """evaluate with these reward models (a folder with action/motivation/consequences adapters, or one adapter used
    for every turn) instead of the ones that trained PPO."""
    eval_judge: str | None = None
    """evaluate: this judge (model; the --judge_mode and --judge_rule apply) also compares every model's held-out
    answers with the base model's, both orders; reports the win rate with a bootstrap interval."""

    def __post_init__(self) -> None:
        if self.judge_mode not in JUDGE_MODES:
            raise ConfigError(f"unknown judge mode {self.judge_mode!r}; valid: {', '.join(JUDGE_MODES)}")
        if self.judge_rule not in JUDGE_RULES:
            raise ConfigError(f"unknown judge rule {self.judge_rule!r}; valid: {', '.join(JUDGE_RULES)}")
        if self.check_max_pairs is not None and self.check_max_pairs < 1:
            raise ConfigError(f"check_max_pairs must be >= 1, got {self.check_max_pairs}")
        if self.eval_judge is not None and self.judge_mode == "supervised":
            raise ConfigError("--eval_judge needs a language-model judge mode (compare, per-virtue or pointwise)")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if len(self.max_tokens) != len(TURNS) or min(self.max_tokens) < 1:
            raise ConfigError(f"max_tokens needs {len(TURNS)} positive limits, got {self.max_tokens}")
        if self.vr_check_orders < 1 or self.vr_check_samples < 1:
            raise ConfigError(f"vr_check_orders and vr_check_samples must be >= 1, got {self.vr_check_orders}, "
                              f"{self.vr_check_samples}")
        if self.chunk < 1 or self.bootstrap < 1:
            raise ConfigError(f"chunk and bootstrap must be >= 1, got {self.chunk}, {self.bootstrap}")

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def judge_tag(cfg: PipelineConfig, model: str | None = None) -> str:
    """A file-name-safe name of the judge: model, mode, rule (the supervised judge: its adapter folder)."""
    name = model or cfg.judge_model or cfg.model
    if cfg.judge_mode == "supervised" and model is None:
        name = f"{name}+{(cfg.judge_adapter.name if cfg.judge_adapter else 'judge_rm')}"
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in Path(name).name or name)
    return f"{safe}-{cfg.judge_mode}-{cfg.judge_rule}"


class Layout:
    """Where each stage writes under the output folder."""

    def __init__(self, root: Path, judge: str = "judge", evaluator: str = "") -> None:
        self.root = root
        self.judge_rm = root / "judge_rm"
        self.judge_check = root / "judge_check" / f"{judge}.json"
        self.judge_check_rows = root / "judge_check" / f"{judge}.parquet"
        self.eval_dir = root / (f"eval-{evaluator}" if evaluator else "eval")
        self.dialogues = root / "dialogues.parquet"
        self.judgements = root / "judgements.parquet"
        self.judge_summary = root / "judge_summary.json"
        self.rm_metrics = root / "reward_models" / "metrics.json"
        self.vr_check = root / "vr_check" / "summary.json"
        self.vr_check_rows = root / "vr_check" / "reasons.parquet"
        self.sft_model = root / "sft" / "merged"
        self.ppo_adapter = root / "ppo" / "adapter"
        self.ppo_steps = root / "ppo" / "steps.parquet"
        self.eval_summary = self.eval_dir / "summary.json"

    def parts(self, stage: str) -> Path:
        return self.root / "parts" / stage

    def preferences(self, turn: str) -> Path:
        return self.root / "preferences" / f"{turn}.parquet"

    def reward_model(self, turn: str) -> Path:
        return self.root / "reward_models" / turn

    def eval_scores(self, variant: str) -> Path:
        return self.eval_dir / f"{variant}.parquet"

    @classmethod
    def of(cls, cfg: PipelineConfig) -> Layout:
        return cls(cfg.output, judge_tag(cfg), cfg.eval_reward_models.name if cfg.eval_reward_models else "")


# ── helpers ─────────────────────────────────────────────────────────────────────────────────────────────────────


def _records(cfg: PipelineConfig) -> list[PromptRecord]:
    return select_prompts(load_prompts(cfg.prompts), cfg.max_train_prompts, cfg.max_heldout_prompts)


def _model_dir(name: str) -> Path:
    from actors.llm.models import resolve_model

    return resolve_model(name)


def _engine(cfg: PipelineConfig, model_dir: Path, seed: int) -> Any:
    from actors.llm.engine import make_engine

    return make_engine(cfg.engine, model_dir, device=cfg.device, seed=seed, max_lora_rank=cfg.ppo.lora_r)


def _close(engine: Any) -> None:
    engine.close()
    gc.collect()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _done_ids(parts: Path) -> set[str]:
    if not parts.is_dir():
        return set()
    files = sorted(parts.glob("part-*.parquet"))
    return set(pl.concat([pl.read_parquet(f, columns=["prompt_id"]) for f in files])["prompt_id"]) if files else set()


def _write_part(parts: Path, df: pl.DataFrame) -> None:
    n = len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0
    write_parquet_atomic(df, parts / f"part-{n:05d}.parquet")


def _collect_parts(parts: Path, ids: Sequence[str]) -> pl.DataFrame:
    """Every finished chunk, in the order of `ids` (prompt order), restricted to them."""
    if not ids:
        raise ConfigError("no prompts selected (check --max_train_prompts / --max_heldout_prompts)")
    df = pl.concat([pl.read_parquet(f) for f in sorted(parts.glob("part-*.parquet"))], how="vertical")
    order = pl.DataFrame({"prompt_id": list(ids), "_order": range(len(ids))})
    return df.join(order, on="prompt_id", maintain_order="left").sort("_order", maintain_order=True).drop("_order")


def _drop_parts(parts: Path) -> None:
    shutil.rmtree(parts)
    with contextlib.suppress(OSError):  # the last stage's parts gone: the folder too
        parts.parent.rmdir()


def _in_chunks(todo: Sequence[Any], total: int, chunk: int, desc: str, unit: str) -> Iterator[Sequence[Any]]:
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit=unit) as bar:
        for part in _chunks(todo, chunk):
            yield part
            bar.update(len(part))


def _preference_rows(layout: Layout, turn: str, split: str) -> list[dict[str, Any]]:
    return pl.read_parquet(layout.preferences(turn)).filter(pl.col("split") == split).to_dicts()


def _need(path: Path, stage: str) -> None:
    if not path.exists():
        raise ConfigError(f"{path} is missing: run the {stage!r} stage first (or `all`)")


# ── the judge ───────────────────────────────────────────────────────────────────────────────────────────────────


class _Judge:
    """The configured judge, loaded once: `probs(pairs)` -> (N, V, 2, 2), the same code for judge and judge-check."""

    def __init__(self, cfg: PipelineConfig, layout: Layout, model: str | None = None) -> None:
        self.mode = cfg.judge_mode
        name = model or cfg.judge_model or cfg.model
        if self.mode == "supervised":
            from actors.llm.virtue.reward import RewardModels

            adapter = cfg.judge_adapter or layout.judge_rm
            _need(adapter / "adapter_config.json", "train-judge")
            self.models: Any = RewardModels(_model_dir(name), {"judge": adapter}, cfg.judge_rm.max_length, cfg.device)
            self.engine = None
        else:
            self.engine = _engine(cfg, _model_dir(name), cfg.seed)

    def probs(self, pairs: Sequence[Any]) -> np.ndarray:
        from actors.llm.virtue.judge import judge_pairs, supervised_pairs

        if self.engine is None:
            return supervised_pairs(self.models, "judge", pairs)
        return judge_pairs(self.engine, pairs, mode=self.mode)

    def close(self) -> None:
        if self.engine is not None:
            _close(self.engine)
        self.engine = self.models = None
        gc.collect()


def _labelled(cfg: PipelineConfig, split: str) -> pl.DataFrame:
    df = load_labelled(cfg.labelled).filter(pl.col("split") == split)
    if split == "check" and cfg.check_max_pairs is not None:
        df = df.group_by("set", "subset", maintain_order=True).head(cfg.check_max_pairs)
    if df.is_empty():
        raise ConfigError(f"the labelled pair files hold no {split!r} pairs: {', '.join(map(str, cfg.labelled))}")
    return df


def _judge_desc(cfg: PipelineConfig, model: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model or cfg.judge_model or cfg.model, "mode": cfg.judge_mode,
                           "rule": cfg.judge_rule, "tie_margin": cfg.tie_margin}
    if cfg.judge_mode == "supervised":
        out["adapter"] = str(cfg.judge_adapter or "<output>/judge_rm")
    return out


def _check_sets(df: pl.DataFrame, probs: np.ndarray, cfg: PipelineConfig, rule: str) -> dict[str, Any]:
    """check_metrics per labelled set (and per subset inside it) from (N, V, 2, 2) probabilities, good shown first."""
    from actors.llm.virtue.scoring import check_metrics, label_share

    p_ab = label_share(probs[:, :, 0, 0], probs[:, :, 0, 1])
    p_ba = label_share(probs[:, :, 1, 0], probs[:, :, 1, 1])

    def metrics(mask: np.ndarray) -> dict[str, Any]:
        return check_metrics(p_ab[mask], p_ba[mask], cfg.tie_margin, rule, cfg.bootstrap, cfg.seed).as_dict()

    sets: dict[str, Any] = {}
    for name in df["set"].unique(maintain_order=True):
        in_set = (df["set"] == name).to_numpy()
        sets[name] = metrics(in_set)
        subsets = df.filter(pl.col("set") == name)["subset"].unique(maintain_order=True).to_list()
        if len(subsets) > 1:
            sets[name]["subsets"] = {sub: metrics(in_set & (df["subset"] == sub).to_numpy()) for sub in subsets}
    return sets


def passes(sets: dict[str, Any]) -> bool:
    """The adoption rule: lower bound above PASS_LOW and consistency >= PASS_CONSISTENCY on every set."""
    return bool(sets) and all(m["accuracy_low"] > PASS_LOW and m["consistency"] >= PASS_CONSISTENCY
                              for m in sets.values())


def train_judge(cfg: PipelineConfig, layout: Layout) -> None:
    """The supervised judge: a LoRA reward model on the labelled pairs' train split (never the check split)."""
    from actors.llm.virtue.data import labelled_preference_rows
    from actors.llm.virtue.reward import train_reward_model

    if cfg.judge_mode != "supervised":
        log.info("train-judge: judge mode %s needs no training, skipping", cfg.judge_mode)
        return
    if cfg.judge_adapter is not None or (layout.judge_rm / "adapter_config.json").exists():
        log.info("train-judge: adapter exists, skipping")
        return
    rows = labelled_preference_rows(_labelled(cfg, "train"))
    tmp = layout.judge_rm.with_name(".judge_rm.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train_reward_model(_model_dir(cfg.judge_model or cfg.model), rows, tmp, cfg.judge_rm, device=cfg.device)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    tmp.rename(layout.judge_rm)


def judge_check(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """The judge on labelled pairs (good answer = A), both orders, through the judge stage's code."""
    from actors.llm.virtue.judge import Pair
    from actors.llm.virtue.scoring import VIRTUES, label_share

    df = _labelled(cfg, "check")
    pairs = [Pair(r["question"], r["turn"], r["good"], r["bad"]) for r in df.iter_rows(named=True)]
    t0 = time.perf_counter()
    judge_ = _Judge(cfg, layout)
    load_s = time.perf_counter() - t0
    parts = [judge_.probs(chunk) for chunk in _in_chunks(pairs, len(pairs), cfg.chunk, "judge-check", "pair")]
    judge_.close()
    probs = np.concatenate(parts)
    wall = time.perf_counter() - t0
    sets = _check_sets(df, probs, cfg, cfg.judge_rule)
    other = next(r for r in JUDGE_RULES if r != cfg.judge_rule)
    other_sets = _check_sets(df, probs, cfg, other)  # the same verdicts under the other rule: free to report
    result = {"judge": _judge_desc(cfg), "wall_s": round(wall, 1), "load_s": round(load_s, 1), "pairs": len(pairs),
              "sets": sets, "passes": passes(sets),
              "other_rule": {"rule": other, "sets": other_sets, "passes": passes(other_sets)},
              "criterion": f"accuracy_low > {PASS_LOW} and consistency >= {PASS_CONSISTENCY} on every set",
              "accuracy": "the pipeline's verdict (both orders, the rule, majority of the virtues): good answer "
                          "chosen 1, tied 0.5, bad 0; interval: percentile bootstrap over pairs"}
    rows = df.select("id", "set", "subset").with_columns(
        *[pl.Series(f"{v}_p_ab", label_share(probs[:, k, 0, 0], probs[:, k, 0, 1])) for k, v in enumerate(VIRTUES)],
        *[pl.Series(f"{v}_p_ba", label_share(probs[:, k, 1, 0], probs[:, k, 1, 1])) for k, v in enumerate(VIRTUES)])
    write_parquet_atomic(rows, layout.judge_check_rows)
    write_json_atomic(result, layout.judge_check)
    log.info("judge-check %s: %s (%.0f s)", judge_tag(cfg), format_check(result), wall)
    return result


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_check(result: dict[str, Any]) -> str:
    parts = []
    for name, m in result["sets"].items():
        parts.append(f"{name} accuracy {m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}] "
                     f"(n={m['pairs']}), consistency {m['consistency']:.3f}, accuracy when consistent "
                     f"{_num(m['consistent_accuracy'])} (n={m['consistent_pairs']})")
    return "; ".join(parts) + ("; PASSES" if result["passes"] else "; does not pass")


def _check_of(layout: Layout) -> dict[str, Any] | None:
    """The judge-check result of this judge, when it was run (judge_summary and eval summaries carry it)."""
    return json.loads(layout.judge_check.read_text()) if layout.judge_check.exists() else None


# ── stages ──────────────────────────────────────────────────────────────────────────────────────────────────────


def curate(cfg: PipelineConfig, layout: Layout) -> None:
    from actors.llm.virtue.data import dialogue_rows
    from actors.llm.virtue.dialogue import run_dialogues

    records = _records(cfg)
    parts = layout.parts("curate")
    done = _done_ids(parts)
    todo = [r for r in records if r.id not in done]
    if todo:
        engine = _engine(cfg, _model_dir(cfg.model), cfg.seed)
        for chunk in _in_chunks(todo, len(records), cfg.chunk, "curate", "prompt"):
            recs = [r for r in chunk for _ in (0, 1)]
            samples = [0, 1] * len(chunk)
            seeds = [stable_seed(cfg.seed, r.id, s) for r, s in zip(recs, samples, strict=True)]
            dialogues = run_dialogues(engine, [r.prompt for r in recs], seeds, cfg.max_tokens,
                                      temperature=cfg.temperature, system=cfg.system_prompt)
            _write_part(parts, pl.DataFrame(dialogue_rows(recs, samples, dialogues)))
        _close(engine)
    df = _collect_parts(parts, [r.id for r in records])
    write_parquet_atomic(df, layout.dialogues)
    _drop_parts(parts)
    rates = truncation_rates(df)
    log.info("curated %d dialogues for %d prompts; cut off at the token limit: %s", df.height, len(records),
             ", ".join(f"{t} {r:.0%}" for t, r in rates.items()))


def judge(cfg: PipelineConfig, layout: Layout) -> None:
    from actors.llm.virtue.data import judgement_rows, pairs_table, preference_datasets
    from actors.llm.virtue.judge import Pair

    _need(layout.dialogues, "curate")
    pairs = pairs_table(pl.read_parquet(layout.dialogues))
    parts = layout.parts("judge")
    done = _done_ids(parts)
    todo = [r for r in pairs.iter_rows(named=True) if r["prompt_id"] not in done]
    if todo:
        judge_ = _Judge(cfg, layout)
        for chunk in _in_chunks(todo, pairs.height, cfg.chunk, "judge", "prompt"):
            keys = [{"prompt_id": r["prompt_id"], "split": r["split"], "turn": t} for r in chunk for t in TURNS]
            batch = [Pair(r["prompt"], t, r[f"{t}_a"], r[f"{t}_b"]) for r in chunk for t in TURNS]
            probs = judge_.probs(batch)
            _write_part(parts, pl.DataFrame(judgement_rows(keys, probs, cfg.tie_margin, cfg.judge_rule)))
        judge_.close()
    judgements = _collect_parts(parts, pairs["prompt_id"].to_list())
    datasets = preference_datasets(pairs, judgements, cfg.system_prompt)
    for turn, df in datasets.items():
        write_parquet_atomic(df, layout.preferences(turn))
    summary: dict[str, Any] = {}
    for turn in TURNS:
        j = judgements.filter(pl.col("turn") == turn)
        summary[turn] = _tally(j, cfg.tie_margin, cfg.judge_rule).as_dict() | {
            "train_pairs": int((datasets[turn]["split"] == "train").sum()),
            "heldout_pairs": int((datasets[turn]["split"] == "heldout").sum())}
    summary["judge"] = _judge_desc(cfg)
    summary["judge_check"] = _check_of(layout)  # None: run the judge-check stage to know this judge's accuracy
    write_json_atomic(summary, layout.judge_summary)
    write_parquet_atomic(judgements, layout.judgements)
    _drop_parts(parts)
    if summary["judge_check"] is None:
        log.warning("judge: this judge's accuracy is unknown; run the judge-check stage with the same judge options")
    for turn in TURNS:
        s = summary[turn]
        log.info("%s: %d pairs, %d tied (%d of %d virtue verdicts tied, %d position-biased); %d train / %d held-out",
                 turn, s["pairs"], s["tied_pairs"], s["tied_virtues"], s["virtue_verdicts"], s["position_biased"],
                 s["train_pairs"], s["heldout_pairs"])


def _tally(j: pl.DataFrame, margin: float, rule: str) -> Tally:
    from actors.llm.virtue.scoring import VIRTUES, label_share, tally

    def share(order: str) -> np.ndarray:  # (N, V) P(first shown is better) in this order
        return np.stack([label_share(j[f"{v}_p1_{order}"].to_numpy(), j[f"{v}_p2_{order}"].to_numpy())
                         for v in VIRTUES], axis=1)

    return tally(share("ab"), share("ba"), margin, rule)


def train_rm(cfg: PipelineConfig, layout: Layout) -> None:
    from actors.llm.virtue.reward import RewardModels, preference_accuracy, train_reward_model

    for turn in TURNS:
        _need(layout.preferences(turn), "judge")
    base = _model_dir(cfg.model)
    for turn in TURNS:
        target = layout.reward_model(turn)
        if (target / "adapter_config.json").exists():
            log.info("reward model %s exists, skipping", turn)
            continue
        tmp = target.with_name(f".{turn}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("training the %s reward model", turn)
        train_reward_model(base, _preference_rows(layout, turn, "train"), tmp, cfg.rm, device=cfg.device)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        tmp.rename(target)
    if layout.rm_metrics.exists():
        return
    models = RewardModels(base, {t: layout.reward_model(t) for t in TURNS}, cfg.rm.max_length, cfg.device)
    metrics: dict[str, Any] = {}
    for turn in TURNS:
        train, held = _preference_rows(layout, turn, "train"), _preference_rows(layout, turn, "heldout")
        metrics[turn] = {"train_pairs": len(train), "heldout_pairs": len(held),
                         "train_accuracy": preference_accuracy(models, turn, train),
                         "heldout_accuracy": preference_accuracy(models, turn, held)}
        log.info("reward model %s: agreement with the judge on held-out pairs %.3f on %d pairs (train %.3f on %d)",
                 turn, metrics[turn]["heldout_accuracy"], len(held), metrics[turn]["train_accuracy"], len(train))
    metrics["labelled"] = labelled_accuracy(cfg, models)
    metrics["judge_check"] = _check_of(layout)
    write_json_atomic(metrics, layout.rm_metrics)


def labelled_accuracy(cfg: PipelineConfig, models: Any) -> dict[str, Any]:
    """Each reward model and their ensemble on the labelled check pairs (good above bad), per set, with a bootstrap
    interval: their real accuracy, where `heldout_accuracy` is their agreement with the judge."""
    from actors.llm.virtue.judge import pair_conversation
    from actors.llm.virtue.scoring import ensemble_reward

    df = _labelled(cfg, "check")
    good = [pair_conversation(r["question"], r["turn"], r["good"]) for r in df.iter_rows(named=True)]
    bad = [pair_conversation(r["question"], r["turn"], r["bad"]) for r in df.iter_rows(named=True)]
    s_good = np.stack([models.score(n, good) for n in models.names], axis=1)  # (N, M)
    s_bad = np.stack([models.score(n, bad) for n in models.names], axis=1)
    cols = {n: (s_good[:, k], s_bad[:, k]) for k, n in enumerate(models.names)}
    cols["ensemble"] = (ensemble_reward(s_good, cfg.lam), ensemble_reward(s_bad, cfg.lam))
    out: dict[str, Any] = {}
    for name in df["set"].unique(maintain_order=True):
        mask = (df["set"] == name).to_numpy()
        out[name] = {}
        for model, (g, b) in cols.items():
            correct = (g[mask] > b[mask]) + 0.5 * (g[mask] == b[mask])
            ci = _mean_interval(correct, cfg)
            out[name][model] = {"accuracy": ci.estimate, "low": ci.low, "high": ci.high, "pairs": ci.n}
        log.info("reward models on labelled %s pairs: %s", name,
                 ", ".join(f"{m} {v['accuracy']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for m, v in out[name].items()))
    return out


def _mean_interval(values: np.ndarray, cfg: PipelineConfig) -> Any:
    from actors.llm.virtue.scoring import bootstrap_mean

    return bootstrap_mean(values, cfg.bootstrap, cfg.seed, 0.95)


def sft(cfg: PipelineConfig, layout: Layout) -> None:
    from actors.llm.virtue.sft import sft_examples, train_sft

    if cfg.sft is None:
        log.info("SFT disabled (--no-sft): PPO starts from the base model")
        return
    if (layout.sft_model / "config.json").exists():
        log.info("SFT model exists, skipping")
        return
    rows = []
    for turn in TURNS:
        _need(layout.preferences(turn), "judge")
        rows += _preference_rows(layout, turn, "train")
    tmp = layout.sft_model.parent.with_name(".sft.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    train_sft(_model_dir(cfg.model), sft_examples(rows), tmp, cfg.sft, device=cfg.device)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    shutil.rmtree(layout.sft_model.parent, ignore_errors=True)
    tmp.rename(layout.sft_model.parent)


def vr_check(cfg: PipelineConfig, layout: Layout) -> None:
    """Before any training: does the VR reward depend on the move? (actors/llm/virtue/separation.py). The base
    policy states its reason after C and after D on the VR agent's game prompts; the pipeline's reward models (the
    VR reward) and, when trained, the supervised judge score both. Writes vr_check/summary.json and reasons.parquet."""
    from actors.llm.virtue.reward import EnsembleReward, RewardModels
    from actors.llm.virtue.separation import measure, separation_prompts

    scorers: dict[str, Any] = {"reward_models": _ensemble(cfg, layout)}
    judge_rm = cfg.judge_adapter or layout.judge_rm
    if (judge_rm / "adapter_config.json").exists():
        scorers["judge"] = EnsembleReward(RewardModels(_model_dir(cfg.judge_model or cfg.model), {"judge": judge_rm},
                                                       cfg.judge_rm.max_length, cfg.device), cfg.lam)
    engine = _engine(cfg, _model_dir(cfg.model), cfg.seed)
    try:
        prompts = separation_prompts(orders=cfg.vr_check_orders, seed=cfg.seed)
        log.info("vr-check: %d game prompts x C, D x %d reasons", len(prompts), cfg.vr_check_samples)
        rows, summary = measure(engine, scorers, prompts, samples=cfg.vr_check_samples, seed=cfg.seed)
    finally:
        _close(engine)
    for name, sep in summary.items():
        d = sep.difference
        log.info("vr-check %s: mean after C %.4f, after D %.4f, C - D %+.4f [%+.4f, %+.4f], correlation %+.3f",
                 name, sep.mean_after_c, sep.mean_after_d, d.estimate, d.low, d.high, sep.correlation)
    write_parquet_atomic(pl.DataFrame(rows), layout.vr_check_rows)
    write_json_atomic({"scorers": {k: v.as_dict() for k, v in summary.items()},
                       "prompts": len(prompts), "samples": cfg.vr_check_samples, "game": "IPD", "tokens": "action12",
                       "reason_question": "What is the motivation behind the answer? Answer in one sentence."},
                      layout.vr_check)


def _ppo_start(cfg: PipelineConfig, layout: Layout) -> Path:
    if cfg.sft is None:
        return _model_dir(cfg.model)
    _need(layout.sft_model / "config.json", "sft")
    return layout.sft_model


def _ensemble(cfg: PipelineConfig, layout: Layout) -> Any:
    from actors.llm.virtue.reward import EnsembleReward, RewardModels

    for turn in TURNS:
        _need(layout.reward_model(turn) / "adapter_config.json", "train-rm")
    models = RewardModels(_model_dir(cfg.model), {t: layout.reward_model(t) for t in TURNS}, cfg.rm.max_length,
                          cfg.device)
    return EnsembleReward(models, cfg.lam)


def _eval_ensemble(cfg: PipelineConfig, layout: Layout) -> Any:
    """The evaluator's reward models: --eval_reward_models when given (on the same base), else the pipeline's own."""
    from actors.llm.virtue.reward import EnsembleReward, RewardModels, turn_adapters

    d = cfg.eval_reward_models
    if d is None:
        return _ensemble(cfg, layout)
    adapters = turn_adapters(d)  # one model (e.g. the supervised judge) may score every turn
    if adapters is None:
        raise ConfigError(f"--eval_reward_models {d}: expected {', '.join(f'{t}/' for t in TURNS)} adapter folders "
                          "or one adapter folder (adapter_config.json)")
    return EnsembleReward(RewardModels(_model_dir(cfg.model), adapters, cfg.rm.max_length, cfg.device), cfg.lam)


def _evaluator(cfg: PipelineConfig) -> str:
    if cfg.eval_reward_models is None:
        return ("the pipeline's own reward models (they trained PPO: circular; judge's labels, see judge_check); "
                "score = mean - 0.5 std of RM_turn(turn)")
    return f"reward models in {cfg.eval_reward_models} (not those that trained PPO); score = mean - 0.5 std"


def ppo(cfg: PipelineConfig, layout: Layout) -> None:
    from actors.llm.virtue.ppo import train_ppo
    from actors.llm.weight_sync import adapter_to_peft_dir

    if (layout.ppo_adapter / "adapter_config.json").exists():
        log.info("PPO adapter exists, skipping")
        return
    start = _ppo_start(cfg, layout)
    ensemble = _ensemble(cfg, layout)
    prompts = [r.prompt for r in _records(cfg) if r.split == "train"]
    engine = _engine(cfg, start, cfg.seed + 2)
    with tqdm(total=cfg.ppo.steps, desc="ppo", unit="step") as bar:
        learner, steps = train_ppo(start, engine, ensemble, prompts, cfg.ppo, cfg.max_tokens,
                                   system=cfg.system_prompt, device=cfg.device, progress=bar)
    _close(engine)
    write_parquet_atomic(pl.DataFrame(steps), layout.ppo_steps)
    adapter_to_peft_dir(learner.export_adapter(), layout.ppo_adapter)


def _variants(cfg: PipelineConfig, layout: Layout) -> list[tuple[str, Path, Path | None]]:
    """(name, model folder, adapter folder or None) of each model to evaluate, in the order of the table."""
    out: list[tuple[str, Path, Path | None]] = [("base", _model_dir(cfg.model), None)]
    if cfg.sft is not None and (layout.sft_model / "config.json").exists():
        out.append(("sft", layout.sft_model, None))
    if (layout.ppo_adapter / "adapter_config.json").exists():
        out.append(("sft+ppo" if cfg.sft is not None else "ppo", _ppo_start(cfg, layout), layout.ppo_adapter))
    return out


def evaluate(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    from actors.llm.virtue.dialogue import run_dialogues
    from actors.llm.weight_sync import peft_dir_to_adapter

    held = [r for r in _records(cfg) if r.split == "heldout"]
    if not held:
        raise ConfigError(f"{cfg.prompts} has no held-out prompts to evaluate on")
    ensemble = None
    for name, model_dir, adapter_dir in _variants(cfg, layout):
        parts = layout.parts(f"eval-{name}")
        done = _done_ids(parts)
        todo = [r for r in held if r.id not in done]
        if not layout.eval_scores(name).exists() and todo:
            ensemble = ensemble or _eval_ensemble(cfg, layout)
            engine = _engine(cfg, model_dir, cfg.seed + 3)
            adapter = None
            if adapter_dir is not None:
                adapter = "evaluated"
                engine.load_adapter(peft_dir_to_adapter(adapter_dir, adapter, 0))
            for chunk in _in_chunks(todo, len(held), cfg.chunk, f"evaluate {name}", "prompt"):
                seeds = [stable_seed(cfg.seed + 1, r.id, 0) for r in chunk]  # the same for every model
                dialogues = run_dialogues(engine, [r.prompt for r in chunk], seeds, cfg.max_tokens,
                                          temperature=cfg.temperature, adapter=adapter, system=cfg.system_prompt)
                scores = ensemble.turn_scores([[d.messages(k, cfg.system_prompt) for k in range(len(TURNS))]
                                               for d in dialogues])
                rows = [{"prompt_id": r.id, "model": name, **{t: d.turns[k].text for k, t in enumerate(TURNS)},
                         **{f"{t}_truncated": d.turns[k].truncated for k, t in enumerate(TURNS)},
                         **{f"score_{t}": float(s[k]) for k, t in enumerate(TURNS)}}
                        for r, d, s in zip(chunk, dialogues, scores, strict=True)]
                _write_part(parts, pl.DataFrame(rows))
            _close(engine)
            del engine  # vLLM: the old engine's finalizers reset global state, so they must run before the next one
            gc.collect()
        if not layout.eval_scores(name).exists():
            write_parquet_atomic(_collect_parts(parts, [r.id for r in held]), layout.eval_scores(name))
            _drop_parts(parts)
    del ensemble
    gc.collect()
    summary = summarise(cfg, layout)
    if cfg.eval_judge is not None:
        summary["judge_comparison"] = judge_comparison(cfg, layout)
    write_json_atomic(summary, layout.eval_summary)
    return summary


def judge_comparison(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """--eval_judge: each model's held-out answers against the base model's on the same prompt and turn, both orders;
    the win rate of the model (won 1, tied 0.5, lost 0) with a bootstrap interval over (prompt, turn) pairs."""
    from actors.llm.virtue.judge import Pair
    from actors.llm.virtue.scoring import A_WINS, TIE, label_share, majority, virtue_winners

    assert cfg.eval_judge is not None
    held = {r.id: r.prompt for r in _records(cfg) if r.split == "heldout"}
    names = [n for n, _, _ in _variants(cfg, layout)]
    frames = {n: pl.read_parquet(layout.eval_scores(n)).sort("prompt_id") for n in names}
    base = frames[names[0]]
    judge_ = _Judge(cfg, layout, model=cfg.eval_judge)
    out: dict[str, Any] = {"judge": _judge_desc(cfg, cfg.eval_judge),
                           "judge_check": _check_of(Layout(cfg.output, judge_tag(cfg, cfg.eval_judge))),
                           "models": {}}
    for name in names[1:]:
        other = frames[name]
        pairs = [Pair(held[pid], t, a, b) for t in TURNS
                 for pid, a, b in zip(other["prompt_id"], other[t], base[t], strict=True)]
        probs = np.concatenate([judge_.probs(c) for c in _chunks(pairs, cfg.chunk)])
        p_ab = label_share(probs[:, :, 0, 0], probs[:, :, 0, 1])
        p_ba = label_share(probs[:, :, 1, 0], probs[:, :, 1, 1])
        outcome = majority(virtue_winners(p_ab, p_ba, cfg.tie_margin, cfg.judge_rule)).outcome
        ci = _mean_interval((outcome == A_WINS) + 0.5 * (outcome == TIE), cfg)
        out["models"][f"{name} vs {names[0]}"] = {"win_rate": ci.estimate, "low": ci.low, "high": ci.high,
                                                  "pairs": ci.n, "ties": int((outcome == TIE).sum())}
    judge_.close()
    return out


def summarise(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """The report's score per model with its bootstrap interval, and paired differences between models."""
    names = [n for n, _, _ in _variants(cfg, layout)]
    frames = {n: pl.read_parquet(layout.eval_scores(n)).sort("prompt_id") for n in names}
    mats = {n: df.select([f"score_{t}" for t in TURNS]).to_numpy() for n, df in frames.items()}
    out: dict[str, Any] = {"models": {}, "differences": {}, "evaluator": _evaluator(cfg),
                           "judge": _judge_desc(cfg), "judge_check": _check_of(Layout.of(cfg))}
    rm = Layout(cfg.output).rm_metrics
    if rm.exists():
        out["reward_models_on_labelled_pairs"] = json.loads(rm.read_text()).get("labelled")
    vr = Layout(cfg.output).vr_check
    if vr.exists():
        out["vr_check"] = json.loads(vr.read_text())["scorers"]
    for n, m in mats.items():
        ci = bootstrap_score(m, cfg.bootstrap, cfg.seed)
        out["models"][n] = ci.as_dict() | {
            "prompts": int(m.shape[0]),
            **{f"mean_{t}": float(m[:, k].mean()) for k, t in enumerate(TURNS)},
            **{f"truncated_{t}": float(np.mean(frames[n][f"{t}_truncated"].to_numpy())) for t in TURNS},
        }
    for a, b in [(x, y) for i, x in enumerate(names) for y in names[:i]]:
        out["differences"][f"{a} - {b}"] = bootstrap_difference(mats[a], mats[b], cfg.bootstrap, cfg.seed).as_dict()
    return out


def format_summary(summary: dict[str, Any], rm_metrics: dict[str, Any] | None) -> str:
    lines = []
    check = summary.get("judge_check")
    j = summary.get("judge", {})
    lines.append(f"judge {j.get('model')} ({j.get('mode')}, {j.get('rule')}): "
                 + (format_check(check) if check else "accuracy unknown (run the judge-check stage)"))
    labelled = (rm_metrics or {}).get("labelled")
    if labelled:
        for name, models in labelled.items():
            lines.append(f"reward models on labelled {name} pairs: "
                         + ", ".join(f"{m} {v['accuracy']:.3f} [{v['low']:.3f}, {v['high']:.3f}] (n={v['pairs']})"
                                     for m, v in models.items()))
    for name, sep in (summary.get("vr_check") or {}).items():
        d = sep["difference"]
        lines.append(f"VR move separation ({name}): after C {sep['mean_after_c']:.4f}, after D {sep['mean_after_d']:.4f}, "
                     f"C - D {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (n={sep['pairs']}), "
                     f"correlation with C {sep['correlation_with_cooperation']:+.3f}")
    lines.append(f"evaluator: {summary.get('evaluator', 'the pipeline reward models')}")
    if rm_metrics:
        lines.append("reward model   agreement with the judge: held-out (pairs)   train (pairs)")
        for t in TURNS:
            m = rm_metrics[t]
            lines.append(f"{t:<14} {m['heldout_accuracy']:.3f} ({m['heldout_pairs']:>3})"
                         f"{'':<15}{m['train_accuracy']:.3f} ({m['train_pairs']:>3})")
        lines.append("")
    lines.append("model      prompts  score (mean - 0.5 std)  95% bootstrap interval")
    for n, m in summary["models"].items():
        lines.append(f"{n:<10} {m['prompts']:>7}  {m['estimate']:>22.4f}  [{m['low']:.4f}, {m['high']:.4f}]")
    for n, d in summary["differences"].items():
        lines.append(f"{n:<18} {d['estimate']:>+14.4f}  [{d['low']:+.4f}, {d['high']:+.4f}]")
    comp = summary.get("judge_comparison")
    if comp:
        lines.append(f"judged by {comp['judge']['model']} ({comp['judge']['mode']}): "
                     + ", ".join(f"{k} win rate {v['win_rate']:.3f} [{v['low']:.3f}, {v['high']:.3f}] (n={v['pairs']})"
                                 for k, v in comp["models"].items()))
    return "\n".join(lines)


STAGE_FUNCS: dict[str, Callable[[PipelineConfig, Layout], Any]] = {
    "train-judge": train_judge, "judge-check": judge_check, "curate": curate, "judge": judge, "train-rm": train_rm,
    "vr-check": vr_check, "sft": sft, "ppo": ppo, "evaluate": evaluate,
}
OUTPUTS: dict[str, Callable[[Layout], Path]] = {
    "train-judge": lambda lay: lay.judge_rm / "adapter_config.json",
    "judge-check": lambda lay: lay.judge_check,
    "curate": lambda lay: lay.dialogues,
    "judge": lambda lay: lay.judgements,
    "train-rm": lambda lay: lay.rm_metrics,
    "vr-check": lambda lay: lay.vr_check,
    "sft": lambda lay: lay.sft_model / "config.json",
    "ppo": lambda lay: lay.ppo_adapter / "adapter_config.json",
    "evaluate": lambda lay: lay.eval_summary,
}


def run(cfg: PipelineConfig, stages: Sequence[str]) -> dict[str, float]:
    """Run `stages` in pipeline order; returns the wall time of each stage run in this call (skipped: absent)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; valid: {', '.join(STAGES)}, all")
    layout = Layout.of(cfg)
    cfg.output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.as_dict(), cfg.output / "config.json")
    timings_file = cfg.output / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    ran: dict[str, float] = {}
    for stage in STAGES:
        if stage not in stages or (stage == "train-judge" and cfg.judge_mode != "supervised"):
            continue  # only the supervised judge is trained
        if stage != "evaluate" and OUTPUTS[stage](layout).exists():
            log.info("%s: %s exists, skipping", stage, OUTPUTS[stage](layout))
            continue
        t0 = time.perf_counter()
        STAGE_FUNCS[stage](cfg, layout)
        ran[stage] = time.perf_counter() - t0
        timings[stage] = round(ran[stage], 1)
        write_json_atomic(timings, timings_file)
        log.info("%s done in %.1f s", stage, ran[stage])
    return ran
