"""`python -m scenarios.virtue_rlaif STAGE [options]`: the virtue-ethics RLAIF pipeline (seed 004), one stage or all.

Stages, in order: train-judge, judge-check, curate, judge, train-rm, vr-check, sft, ppo, evaluate; `all` runs
them in order, and several names run those (`curate judge`). The default judge is `supervised` (a LoRA classifier
on SmolLM2 that train-judge fits to the labelled train pairs: the one candidate that passed the judge check).
Each stage skips work whose output is already in --output, so re-running a command resumes it. Defaults are the
report's where it gave them (reward models: max_length 100, 2 epochs, lr 1.41e-5, gradient accumulation 16, batch 20).

Presets (`--preset`, explicit flags override them):
    report     the report's settings (the defaults): RM batch 20 x grad-accum 16, lr 1.41e-5, 2 epochs
    cpu-demo   settings that fit the demo's data: 24 train / 12 held-out prompts, drawn from both categories
               (everyday and dilemma_game); at most 24 preference pairs per reward model, so RM batch 4, no
               accumulation, lr 1e-4, 3 epochs (about 18 optimiser steps, where the report's batch of 320 pairs
               per step gave one); SFT 1 epoch; PPO 4 steps x 3 prompts; shorter turns (64/48/48 tokens)

CPU demo (SmolLM2-135M; its figures are in README.md, "Virtue-ethics RLAIF"):
    python -m scenarios.virtue_rlaif all --preset cpu-demo --output results/virtue_demo

The judge's accuracy on labelled pairs (a few minutes for SmolLM2-135M):
    python -m scenarios.virtue_rlaif judge-check --output results/virtue_demo [--judge_mode pointwise]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from actors.llm.virtue.ppo import PPOStageConfig
from actors.llm.virtue.reward import RewardModelConfig
from actors.llm.virtue.scoring import JUDGE_RULES, TURNS
from actors.llm.virtue.sft import SFTStageConfig
from scenarios.virtue_rlaif.pipeline import (
    DEFAULT_JUDGE_MODE,
    DEFAULT_JUDGE_RM,
    DEFAULT_SYSTEM,
    ENGINES,
    JUDGE_MODES,
    SHIPPED_LABELLED,
    SHIPPED_PROMPTS,
    STAGES,
    PipelineConfig,
)
from simulator.errors import MoralsimError

log = logging.getLogger("moralsim.virtue")


def _turns(text: str) -> tuple[str, ...]:
    turns = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in turns if t not in TURNS]
    if bad or not turns:
        raise argparse.ArgumentTypeError(f"turns must be a comma-separated subset of {','.join(TURNS)}, got {text!r}")
    return turns


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scenarios.virtue_rlaif", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="+", choices=[*STAGES, "all"],
                   help="the stages to run (always in pipeline order), or all of them")
    p.add_argument("--preset", choices=tuple(PRESETS), default="report",
                   help="named defaults (module docstring); explicit flags override them (default %(default)s)")
    p.add_argument("--output", type=Path, default=Path("results/virtue_rlaif"), help="output folder (default %(default)s)")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="policy model, also the reward models' base: embedded name or local folder (default %(default)s)")
    p.add_argument("--judge_model", default=None, help="judge model (default: the policy model judges itself)")
    p.add_argument("--judge_mode", choices=JUDGE_MODES, default=DEFAULT_JUDGE_MODE,
                   help="how the judge is asked: compare (five virtues in one prompt), per-virtue (one prompt per "
                        "virtue), pointwise (yes/no per answer and virtue, no position), supervised (a LoRA classifier "
                        "trained on labelled pairs by train-judge) (default %(default)s)")
    p.add_argument("--judge_rule", choices=JUDGE_RULES, default="average",
                   help="average: the order-averaged probability decides; agree: a point only when both orders agree")
    p.add_argument("--judge_adapter", type=Path, default=None,
                   help="supervised judge's adapter folder (default <output>/judge_rm, made by train-judge)")
    p.add_argument("--labelled", type=Path, nargs="+", default=list(SHIPPED_LABELLED),
                   help="labelled pair files for judge-check / train-judge / RM accuracy (default: the shipped two)")
    p.add_argument("--check_max_pairs", type=int, default=None,
                   help="judge-check: at most N check pairs per labelled set (default all)")
    p.add_argument("--judge_rm_epochs", type=float, default=DEFAULT_JUDGE_RM.epochs,
                   help="supervised judge: epochs (default %(default)s)")
    p.add_argument("--judge_rm_lr", type=float, default=DEFAULT_JUDGE_RM.learning_rate,
                   help="supervised judge: learning rate (default %(default)s)")
    p.add_argument("--judge_rm_lora_r", type=int, default=DEFAULT_JUDGE_RM.lora_r,
                   help="supervised judge: LoRA rank under its linear score head, alpha = 2 x rank (default 16)")
    p.add_argument("--eval_reward_models", type=Path, default=None,
                   help="evaluate with these reward models (action/motivation/consequences adapters, or one adapter) "
                        "instead of those that trained PPO")
    p.add_argument("--eval_judge", default=None,
                   help="evaluate: this judge model also compares each model's answers with the base model's")
    p.add_argument("--prompts", type=Path, default=SHIPPED_PROMPTS,
                   help="JSONL or Parquet with a `prompt` column, optional `id` and `split` (default: the shipped set)")
    p.add_argument("--max_train_prompts", type=int, default=None, help="use the first N train prompts (default all)")
    p.add_argument("--max_heldout_prompts", type=int, default=None, help="use the first N held-out prompts (default all)")
    p.add_argument("--system_prompt", default=DEFAULT_SYSTEM, help="system message of every dialogue ('' for none)")
    p.add_argument("--max_tokens", type=int, nargs=3, default=[96, 64, 64], metavar=("ACTION", "MOTIVATION", "CONSEQ"),
                   help="token limit of each turn (default %(default)s; the report used 32)")
    p.add_argument("--temperature", type=float, default=0.7, help="curation and evaluation temperature (default 0.7)")
    p.add_argument("--chunk", type=int, default=16, help="prompts per engine call and per resumable part (default 16)")
    p.add_argument("--tie_margin", type=float, default=0.0,
                   help="a virtue verdict is a tie when |P(A better) - 0.5| <= this (default 0)")
    p.add_argument("--engine", choices=ENGINES, default="hf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lam", type=float, default=0.5, help="ensemble reward: mean - lam * std (default 0.5)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the evaluation (default 2000)")
    p.add_argument("--vr_check_orders", type=int, default=4,
                   help="vr-check: option orders per history, 5 histories (default %(default)s)")
    p.add_argument("--vr_check_samples", type=int, default=4,
                   help="vr-check: reasons per game prompt and move (default %(default)s)")

    rm = p.add_argument_group("reward models (defaults: the report's)")
    d = RewardModelConfig()
    rm.add_argument("--rm_max_length", type=int, default=d.max_length)
    rm.add_argument("--rm_epochs", type=float, default=d.epochs)
    rm.add_argument("--rm_lr", type=float, default=d.learning_rate)
    rm.add_argument("--rm_grad_accum", type=int, default=d.gradient_accumulation_steps)
    rm.add_argument("--rm_batch_size", type=int, default=d.batch_size)
    rm.add_argument("--rm_lora_r", type=int, default=d.lora_r)

    sft = p.add_argument_group("supervised fine-tuning on the chosen answers")
    s = SFTStageConfig()
    sft.add_argument("--sft", action=argparse.BooleanOptionalAction, default=True, help="run the SFT stage (default on)")
    sft.add_argument("--sft_epochs", type=float, default=s.epochs)
    sft.add_argument("--sft_lr", type=float, default=s.learning_rate)
    sft.add_argument("--sft_batch_size", type=int, default=s.batch_size)
    sft.add_argument("--sft_lora_r", type=int, default=s.lora_r)

    ppo = p.add_argument_group("PPO with the ensemble reward")
    q = PPOStageConfig()
    ppo.add_argument("--ppo_steps", type=int, default=q.steps)
    ppo.add_argument("--ppo_prompts_per_step", type=int, default=q.prompts_per_step)
    ppo.add_argument("--ppo_turns", type=_turns, default=q.turns, help="answers trained per dialogue (default all three)")
    ppo.add_argument("--ppo_lr", type=float, default=q.learning_rate)
    ppo.add_argument("--ppo_lora_r", type=int, default=q.lora_r)
    ppo.add_argument("--ppo_init_kl", type=float, default=q.init_kl_coef)
    return p


PRESETS: dict[str, dict[str, object]] = {
    "report": {},
    "cpu-demo": {"max_train_prompts": 24, "max_heldout_prompts": 12, "max_tokens": [64, 48, 48], "chunk": 36,
                 "rm_batch_size": 4, "rm_grad_accum": 1, "rm_lr": 1e-4, "rm_epochs": 3.0, "sft_epochs": 1.0,
                 "ppo_steps": 4, "ppo_prompts_per_step": 3},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse twice: the first pass reads --preset, whose values become the defaults of the second."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[first.preset])
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(
        output=args.output, model=args.model, judge_model=args.judge_model, prompts=args.prompts,
        max_train_prompts=args.max_train_prompts, max_heldout_prompts=args.max_heldout_prompts,
        system_prompt=args.system_prompt or None, max_tokens=tuple(args.max_tokens), temperature=args.temperature,
        chunk=args.chunk, tie_margin=args.tie_margin, engine=args.engine, device=args.device, seed=args.seed,
        lam=args.lam, bootstrap=args.bootstrap, judge_mode=args.judge_mode, judge_rule=args.judge_rule,
        judge_adapter=args.judge_adapter, labelled=tuple(args.labelled), check_max_pairs=args.check_max_pairs,
        judge_rm=replace(DEFAULT_JUDGE_RM, epochs=args.judge_rm_epochs, learning_rate=args.judge_rm_lr,
                         lora_r=args.judge_rm_lora_r, lora_alpha=2 * args.judge_rm_lora_r, seed=args.seed),
        vr_check_orders=args.vr_check_orders, vr_check_samples=args.vr_check_samples,
        eval_reward_models=args.eval_reward_models, eval_judge=args.eval_judge,
        rm=RewardModelConfig(max_length=args.rm_max_length, epochs=args.rm_epochs, learning_rate=args.rm_lr,
                             gradient_accumulation_steps=args.rm_grad_accum, batch_size=args.rm_batch_size,
                             lora_r=args.rm_lora_r, lora_alpha=2 * args.rm_lora_r, seed=args.seed),
        sft=SFTStageConfig(epochs=args.sft_epochs, learning_rate=args.sft_lr, batch_size=args.sft_batch_size,
                           lora_r=args.sft_lora_r, lora_alpha=2 * args.sft_lora_r, seed=args.seed) if args.sft else None,
        ppo=PPOStageConfig(steps=args.ppo_steps, prompts_per_step=args.ppo_prompts_per_step, turns=args.ppo_turns,
                           learning_rate=args.ppo_lr, lora_r=args.ppo_lora_r, lora_alpha=2 * args.ppo_lora_r,
                           init_kl_coef=args.ppo_init_kl, seed=args.seed),
    )


def main(argv: Sequence[str] | None = None) -> int:
    import json

    from scenarios.virtue_rlaif.pipeline import Layout, format_summary, run

    parser = build_parser()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        cfg = config_from_args(args)
        ran = run(cfg, list(STAGES) if "all" in args.stage else args.stage)
    except MoralsimError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    layout = Layout.of(cfg)
    if layout.eval_summary.exists() and "evaluate" in ran:
        rm = json.loads(layout.rm_metrics.read_text()) if layout.rm_metrics.exists() else None
        print(format_summary(json.loads(layout.eval_summary.read_text()), rm))
    log.info("%s finished in %.1f s (%s)", " ".join(args.stage), time.perf_counter() - t0,
             ", ".join(f"{k} {v:.0f} s" for k, v in ran.items()) or "nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
