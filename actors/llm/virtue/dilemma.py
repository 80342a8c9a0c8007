"""The learned virtue ensemble as a moral type for dilemma agents (moral types VR and Game+VR).

After its move, an LLM agent of such a type is asked why, and the three reward models of the virtue pipeline
(`python -m scenarios.virtue_rlaif`, stage train-rm) score its answer:

    user       <the game prompt the agent acted on>                              ┐ the move: what PPO trains
    assistant  <its move answer, as generated>                                   ┘
    user       What is the motivation behind the answer? Answer in one sentence.   the reason's generation context
    assistant  <reason>   at most reason_tokens tokens, the agent's own adapter; cut off at the limit -> flagged

    scored:    [user prompt, assistant move, user "What is the motivation behind the answer?", assistant reason]
               = the pipeline's *motivation* turn, with the pipeline's exact follow-up question; every reward model
               scores this one conversation (EnsembleReward.score, as the pipeline's PPO stage scores a motivation
               answer), inputs cut from the left at the models' max_length, so the reason always ends the input.
    virtue     = mean - lam * std over (action, motivation, consequences) scores
    moral reward: VR = weight * virtue;  Game+VR = R_M + weight * virtue   (the registry gives R_M or 0, the group
               adds the rest through Decisions.reward_term); an illegal move still learns R_illegal.

Why this conversation: the agent states a move and its motivation, which is exactly the pipeline's first two turns;
there is no consequences turn to give the consequences model, and scoring the conversation that ends in the
reason with all three models is the reward the pipeline's own PPO stage gives a motivation answer. The generation
context adds "Answer in one sentence." so the reason is short; the scored conversation keeps the question the models
were trained on. No system message: the game prompt is the agent's whole context (the models keep only the last
max_length tokens, so a system message before a ~200-token game prompt would be cut off anyway).

The reward models are frozen and loaded once per LLM group; nothing of them enters a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.llm.config import DEFAULT_REWARD_MODELS, PIPELINE_COMMAND, VirtueConfig
from actors.llm.virtue.dialogue import FOLLOW_UPS, Message
from actors.llm.virtue.scoring import TURNS
from simulator.errors import ConfigError

SCORED_QUESTION = FOLLOW_UPS["motivation"]  # the question the motivation reward model was trained on
REASON_QUESTION = f"{SCORED_QUESTION} Answer in one sentence."  # what the agent is asked




@dataclass(frozen=True)
class RewardModelFiles:
    base: Path
    adapters: dict[str, Path]  # turn -> adapter folder, in TURNS order; or one adapter scoring every turn
    max_length: int


def locate_reward_models(cfg: VirtueConfig) -> RewardModelFiles:
    """The three adapter folders, their base model and max_length; ConfigError naming what is expected. A folder
    that is itself one adapter (e.g. the pipeline's supervised judge, <output>/judge_rm) scores alone: the ensemble
    of one model is its score (std 0)."""
    from actors.llm.virtue.reward import turn_adapters

    given = Path(cfg.reward_models).expanduser()
    folder = given / "reward_models" if (given / "reward_models").is_dir() else given
    adapters = turn_adapters(folder)
    if adapters is None:
        missing = [t for t in TURNS if not (folder / t / "adapter_config.json").is_file()]
        root = folder.parent if folder.name == "reward_models" else folder
        raise ConfigError(
            f"the virtue reward models are not in {str(given)!r}: expected "
            f"{', '.join(str(folder / t / 'adapter_config.json') for t in TURNS)} (missing: {', '.join(missing)}). "
            f"They are made by the virtue pipeline's train-rm stage: `{PIPELINE_COMMAND.format(root=root)}` (or its "
            f"stages curate judge train-rm); [llm.virtue] reward_models names the folder (default {DEFAULT_REWARD_MODELS})"
        )
    pipeline: dict[str, Any] = {}
    config_json = folder.parent / "config.json"
    if config_json.is_file():
        try:
            pipeline = json.loads(config_json.read_text())
        except (OSError, json.JSONDecodeError):
            pipeline = {}
    single = adapters[TURNS[0]] == folder  # one model for every turn
    if single:  # the pipeline's supervised judge (<output>/judge_rm) was trained on its judge_rm settings
        judge = folder.name == "judge_rm"
        base = cfg.base_model or pipeline.get("judge_model" if judge else "model") or pipeline.get("model")
        trained = pipeline.get("judge_rm" if judge else "rm") or {}
    else:
        base, trained = cfg.base_model or pipeline.get("model"), pipeline.get("rm") or {}
    if base is None:
        adapter_cfg = json.loads((adapters[TURNS[0]] / "adapter_config.json").read_text())
        base = adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"cannot tell the base model of the reward models in {folder}: set [llm.virtue] base_model")
    from actors.llm.models import resolve_model

    max_length = cfg.max_length or int(trained.get("max_length") or 100)
    # one adapter stands in for each turn's model, so the records' virtue_<turn> columns stay as they are
    return RewardModelFiles(resolve_model(str(base)), adapters, max_length)


def reason_context(prompt_text: str, answer: str) -> list[Message]:
    """What the agent is asked after its move (its generation context, ends with the question)."""
    return [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": answer},
            {"role": "user", "content": REASON_QUESTION}]


def scored_conversation(prompt_text: str, answer: str, reason: str) -> list[Message]:
    """What the reward models score: the pipeline's motivation turn (module docstring)."""
    return [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": answer},
            {"role": "user", "content": SCORED_QUESTION}, {"role": "assistant", "content": reason}]


class VirtueScorer:
    """The three frozen reward models on one base (loaded once): conversations -> (ensemble (B,), scores (B, 3))."""

    def __init__(self, cfg: VirtueConfig, device: str = "cpu") -> None:
        from actors.llm.virtue.reward import EnsembleReward, RewardModels

        files = locate_reward_models(cfg)
        self.cfg = cfg
        self.models = RewardModels(files.base, files.adapters, files.max_length, cfg.device or device, cfg.batch_size)
        self.ensemble = EnsembleReward(self.models, cfg.lam)

    @property
    def names(self) -> tuple[str, ...]:
        return self.ensemble.names

    def score(self, conversations: Sequence[Sequence[Message]]) -> tuple[np.ndarray, np.ndarray]:
        if not conversations:
            return np.zeros(0), np.zeros((0, len(self.names)))
        return self.ensemble.score(conversations)



def stated_reasons(
    rollouts: Any, scorer: VirtueScorer | None, vc: VirtueConfig, temperature: float, bs: Sequence[int],
    texts: Sequence[str], answers: Sequence[str], reasoned: np.ndarray,
) -> dict[str, np.ndarray]:
    """Ask the reasoned decisions why (one generate call through `rollouts`, actors/llm/rollouts.py), score the
    conversations with `scorer`: the virtue columns of every decision (null where not reasoned) and, under "_term",
    each reasoned decision's reward term weight * ensemble (NaN elsewhere)."""
    from actors.llm.engine import GenerationRequest
    from actors.llm.virtue.dialogue import template_ids

    n = len(bs)
    out: dict[str, np.ndarray] = {
        "stated_reason": np.full(n, None, dtype=object),
        "stated_reason_cut": np.full(n, np.nan, dtype=np.float32),
        **{f"virtue_{t}": np.full(n, np.nan, dtype=np.float32) for t in TURNS},
        "virtue_score": np.full(n, np.nan, dtype=np.float32),
    }
    term = np.full(n, np.nan)
    ks = np.flatnonzero(reasoned).tolist()
    if not ks:
        return out | {"_term": term}
    if scorer is None:
        raise ValueError("reasoned decisions need the virtue scorer")
    limit = vc.reason_tokens
    temp = temperature if vc.temperature is None else vc.temperature
    requests = [
        GenerationRequest(
            tuple(template_ids(rollouts.tokenizer, reason_context(texts[k], answers[k]), add_generation_prompt=True)),
            rollouts.serving.adapter_of[bs[k]], limit, temp, stop_at_eos=True,
            seed=int(rollouts.rngs[bs[k]].integers(2**63)))
        for k in ks
    ]
    results = rollouts.run(requests, [bs[k] for k in ks], "scoring")
    eos = set(rollouts.engine.eos_ids)
    reasons = [res.text.strip() for res in results]
    with rollouts.clock("scoring"):
        virtue, per_model = scorer.score(
            [scored_conversation(texts[k], answers[k], r) for k, r in zip(ks, reasons, strict=True)])
    for j, (k, res) in enumerate(zip(ks, results, strict=True)):
        ids = res.token_ids
        out["stated_reason"][k] = reasons[j]
        out["stated_reason_cut"][k] = float(len(ids) >= limit and (not ids or ids[-1] not in eos))
        for m, name in enumerate(scorer.names):
            out[f"virtue_{name}"][k] = per_model[j, m]
        out["virtue_score"][k] = virtue[j]
        term[k] = vc.weight * float(np.float32(virtue[j]))  # the recorded (float32) score, so records add up
    return out | {"_term": term}
