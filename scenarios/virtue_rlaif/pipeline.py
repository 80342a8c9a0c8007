"""The virtue-ethics RLAIF pipeline of seed 004, stage by stage, each resuming from what is on disk.

    curate     prompts ─► two three-turn dialogues per prompt with the policy      dialogues.parquet
    judge      each pair, each turn, both orders, five virtues ─► majority          judgements.parquet,
                                                                                   preferences/<turn>.parquet
    train-rm   one reward model per turn (TRL RewardTrainer, LoRA)                  reward_models/<turn>/,
                                                                                   reward_models/metrics.json
    sft        LoRA SFT on the chosen answers, merged (optional: --no-sft)          sft/merged/
    ppo        PPO with the ensemble reward, from the SFT model                     ppo/adapter/, ppo/steps.parquet
    evaluate   base, SFT and SFT+PPO on the held-out prompts: the report's score    eval/<model>.parquet,
               with a bootstrap interval, and paired differences                    eval/summary.json

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
    load_prompts,
    select_prompts,
    stable_seed,
    truncation_rates,
    write_json_atomic,
    write_parquet_atomic,
)
from actors.llm.virtue.ppo import PPOStageConfig
from actors.llm.virtue.reward import RewardModelConfig
from actors.llm.virtue.scoring import TURNS, Tally, bootstrap_difference, bootstrap_score
from actors.llm.virtue.sft import SFTStageConfig
from simulator.errors import ConfigError

log = logging.getLogger("moralsim.virtue")

SHIPPED_PROMPTS = Path(__file__).with_name("prompts.jsonl")
DEFAULT_SYSTEM = "You are a helpful assistant. Answer in at most three sentences."
STAGES = ("curate", "judge", "train-rm", "sft", "ppo", "evaluate")
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

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if len(self.max_tokens) != len(TURNS) or min(self.max_tokens) < 1:
            raise ConfigError(f"max_tokens needs {len(TURNS)} positive limits, got {self.max_tokens}")
        if self.chunk < 1 or self.bootstrap < 1:
            raise ConfigError(f"chunk and bootstrap must be >= 1, got {self.chunk}, {self.bootstrap}")

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


class Layout:
    """Where each stage writes under the output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dialogues = root / "dialogues.parquet"
        self.judgements = root / "judgements.parquet"
        self.judge_summary = root / "judge_summary.json"
        self.rm_metrics = root / "reward_models" / "metrics.json"
        self.sft_model = root / "sft" / "merged"
        self.ppo_adapter = root / "ppo" / "adapter"
        self.ppo_steps = root / "ppo" / "steps.parquet"
        self.eval_summary = root / "eval" / "summary.json"

    def parts(self, stage: str) -> Path:
        return self.root / "parts" / stage

    def preferences(self, turn: str) -> Path:
        return self.root / "preferences" / f"{turn}.parquet"

    def reward_model(self, turn: str) -> Path:
        return self.root / "reward_models" / turn

    def eval_scores(self, variant: str) -> Path:
        return self.root / "eval" / f"{variant}.parquet"


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
    from actors.llm.virtue.judge import Pair, judge_pairs

    _need(layout.dialogues, "curate")
    pairs = pairs_table(pl.read_parquet(layout.dialogues))
    parts = layout.parts("judge")
    done = _done_ids(parts)
    todo = [r for r in pairs.iter_rows(named=True) if r["prompt_id"] not in done]
    if todo:
        engine = _engine(cfg, _model_dir(cfg.judge_model or cfg.model), cfg.seed)
        for chunk in _in_chunks(todo, pairs.height, cfg.chunk, "judge", "prompt"):
            keys = [{"prompt_id": r["prompt_id"], "split": r["split"], "turn": t} for r in chunk for t in TURNS]
            batch = [Pair(r["prompt"], t, r[f"{t}_a"], r[f"{t}_b"]) for r in chunk for t in TURNS]
            probs = judge_pairs(engine, batch)
            _write_part(parts, pl.DataFrame(judgement_rows(keys, probs, cfg.tie_margin)))
        _close(engine)
    judgements = _collect_parts(parts, pairs["prompt_id"].to_list())
    datasets = preference_datasets(pairs, judgements, cfg.system_prompt)
    for turn, df in datasets.items():
        write_parquet_atomic(df, layout.preferences(turn))
    summary = {}
    for turn in TURNS:
        j = judgements.filter(pl.col("turn") == turn)
        summary[turn] = _tally(j, cfg.tie_margin).as_dict() | {"train_pairs": int((datasets[turn]["split"] == "train").sum()),
                                               "heldout_pairs": int((datasets[turn]["split"] == "heldout").sum())}
    write_json_atomic(summary, layout.judge_summary)
    write_parquet_atomic(judgements, layout.judgements)
    _drop_parts(parts)
    for turn, s in summary.items():
        log.info("%s: %d pairs, %d tied (%d of %d virtue verdicts tied, %d position-biased); %d train / %d held-out",
                 turn, s["pairs"], s["tied_pairs"], s["tied_virtues"], s["virtue_verdicts"], s["position_biased"],
                 s["train_pairs"], s["heldout_pairs"])


def _tally(j: pl.DataFrame, margin: float) -> Tally:
    from actors.llm.virtue.scoring import VIRTUES, label_share, tally

    def share(order: str) -> np.ndarray:  # (N, V) P(first shown is better) in this order
        return np.stack([label_share(j[f"{v}_p1_{order}"].to_numpy(), j[f"{v}_p2_{order}"].to_numpy())
                         for v in VIRTUES], axis=1)

    return tally(share("ab"), share("ba"), margin)


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
    metrics = {}
    for turn in TURNS:
        train, held = _preference_rows(layout, turn, "train"), _preference_rows(layout, turn, "heldout")
        metrics[turn] = {"train_pairs": len(train), "heldout_pairs": len(held),
                         "train_accuracy": preference_accuracy(models, turn, train),
                         "heldout_accuracy": preference_accuracy(models, turn, held)}
        log.info("reward model %s: held-out preference accuracy %.3f on %d pairs (train %.3f on %d)", turn,
                 metrics[turn]["heldout_accuracy"], len(held), metrics[turn]["train_accuracy"], len(train))
    write_json_atomic(metrics, layout.rm_metrics)


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
            ensemble = ensemble or _ensemble(cfg, layout)
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
    summary = summarise(cfg, layout)
    write_json_atomic(summary, layout.eval_summary)
    return summary


def summarise(cfg: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """The report's score per model with its bootstrap interval, and paired differences between models."""
    names = [n for n, _, _ in _variants(cfg, layout)]
    frames = {n: pl.read_parquet(layout.eval_scores(n)).sort("prompt_id") for n in names}
    mats = {n: df.select([f"score_{t}" for t in TURNS]).to_numpy() for n, df in frames.items()}
    out: dict[str, Any] = {"models": {}, "differences": {}}
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
    if rm_metrics:
        lines.append("reward model   held-out accuracy (pairs)   train accuracy (pairs)")
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
    return "\n".join(lines)


STAGE_FUNCS: dict[str, Callable[[PipelineConfig, Layout], Any]] = {
    "curate": curate, "judge": judge, "train-rm": train_rm, "sft": sft, "ppo": ppo, "evaluate": evaluate,
}
OUTPUTS: dict[str, Callable[[Layout], Path]] = {
    "curate": lambda lay: lay.dialogues,
    "judge": lambda lay: lay.judgements,
    "train-rm": lambda lay: lay.rm_metrics,
    "sft": lambda lay: lay.sft_model / "config.json",
    "ppo": lambda lay: lay.ppo_adapter / "adapter_config.json",
    "evaluate": lambda lay: lay.eval_summary,
}


def run(cfg: PipelineConfig, stages: Sequence[str]) -> dict[str, float]:
    """Run `stages` in pipeline order; returns the wall time of each stage run in this call (skipped: absent)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; valid: {', '.join(STAGES)}, all")
    layout = Layout(cfg.output)
    cfg.output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.as_dict(), cfg.output / "config.json")
    timings_file = cfg.output / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    ran: dict[str, float] = {}
    for stage in STAGES:
        if stage not in stages:
            continue
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
