"""Reward models (TRL `RewardTrainer` + LoRA) and the ensemble reward built from them.

    preferences/<turn>.parquet ──► rm_input_ids: chat template, keep the LAST max_length tokens ──► RewardTrainer
                                   (LoRA on a sequence-classification head over the base model)  ──► adapter folder

Truncation. TRL's `max_length` drops a pair whose chosen or rejected sequence is longer; the report truncated its
inputs at 100 tokens instead. A three-turn conversation is longer than 100 tokens, so the pairs are tokenized here
and cut from the left: the turn being judged ends the sequence, and the score head reads the last token. Scoring
(`RewardModels.score`) uses the same function, so a model sees at inference exactly what it was trained on.

    EnsembleReward(models, lam).score(conversations) -> (reward (B,), per-model scores (B, M))
        every model scores every conversation; reward = mean - lam * std over the models (scoring.ensemble_reward)
    EnsembleReward.turn_scores(dialogues) -> (n, M)
        model k scores turn k of each dialogue (the report's evaluation: RM_action on the action, ...)

All reward models are LoRA adapters on one base model (peft named adapters, each with its own score head), so the
ensemble holds one copy of the base weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.llm.virtue.dialogue import Message, template_ids
from actors.llm.virtue.scoring import TURNS, ensemble_reward
from actors.llm.virtue.trl_args import lora_config, trainer_kwargs
from simulator.errors import ConfigError, check_positive

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardModelConfig:
    """Defaults are the report's settings (seed 004, section 2.3.3), except LoRA's own, which it does not give."""

    max_length: int = 100
    """tokens per input; longer conversations keep their last max_length tokens."""
    epochs: float = 2.0
    learning_rate: float = 1.41e-5
    gradient_accumulation_steps: int = 16
    batch_size: int = 20
    """per-device train batch (pairs)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("RewardModelConfig", self, ("max_length", "epochs", "learning_rate",
                                                    "gradient_accumulation_steps", "batch_size", "lora_r", "lora_alpha"))


def turn_adapters(folder: Path) -> dict[str, Path] | None:
    """The reward-model adapter of each turn in `folder`: its action/motivation/consequences adapter folders, or the
    folder itself when it is one adapter (e.g. the supervised judge), which then scores every turn; None if neither."""
    if all((folder / t / "adapter_config.json").is_file() for t in TURNS):
        return {t: folder / t for t in TURNS}
    if (folder / "adapter_config.json").is_file():
        return dict.fromkeys(TURNS, folder)
    return None


def rm_input_ids(tokenizer: Any, messages: Sequence[Message], max_length: int) -> list[int]:
    """The chat-templated conversation, cut from the left to its last `max_length` tokens."""
    ids = template_ids(tokenizer, messages, add_generation_prompt=False)
    return ids[-max_length:]


def _load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_reward_model(
    model_dir: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    config: RewardModelConfig | None = None,
    device: str = "cpu",
) -> Path:
    """Train one reward model on preference rows (prompt / chosen / rejected messages); save its adapter to out_dir."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    cfg = config or RewardModelConfig()
    if not rows:
        raise ConfigError("no preference pairs to train a reward model on (every pair tied, or no prompts)")
    tok = _load_tokenizer(model_dir)
    data = Dataset.from_list([
        {"chosen_ids": rm_input_ids(tok, [*r["prompt"], *r["chosen"]], cfg.max_length),
         "rejected_ids": rm_input_ids(tok, [*r["prompt"], *r["rejected"]], cfg.max_length)}
        for r in rows
    ])
    out = Path(out_dir)
    args = RewardConfig(**trainer_kwargs(cfg, out, device), optim="adamw_torch")
    lora = lora_config(cfg, "SEQ_CLS")
    trainer = RewardTrainer(model=str(model_dir), args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    result = trainer.train()
    trainer.save_model(str(out))
    logger.info("reward model trained on %d pairs (%d optimizer steps, loss %.4f) -> %s", len(rows),
                result.global_step, result.training_loss, out)
    return out


class RewardModels:
    """Several reward-model adapters on one sequence-classification base; `score(name, conversations)`."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        adapters: Mapping[str, str | os.PathLike[str]],
        max_length: int = 100,
        device: str = "cpu",
        batch_size: int = 16,
    ) -> None:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        if not adapters:
            raise ConfigError("RewardModels needs at least one adapter folder")
        self.names = tuple(adapters)
        self.max_length, self.batch_size = max_length, batch_size
        self.device = torch.device(device)
        self.tokenizer = _load_tokenizer(base_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new score head is reported missing; the adapters bring theirs
        try:
            base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        base.config.pad_token_id = self.tokenizer.pad_token_id
        first, *rest = self.names
        model = PeftModel.from_pretrained(base, str(adapters[first]), adapter_name=first)
        for name in rest:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model = model.to(self.device).eval()
        self.pad_id = int(self.tokenizer.pad_token_id)

    @torch.no_grad()
    def score(self, name: str, conversations: Sequence[Sequence[Message]]) -> np.ndarray:
        """(B,) scalar reward of each conversation under reward model `name`."""
        if name not in self.names:
            raise ConfigError(f"unknown reward model {name!r}; loaded: {', '.join(self.names)}")
        self.model.set_adapter(name)
        seqs = [rm_input_ids(self.tokenizer, c, self.max_length) for c in conversations]
        out = np.zeros(len(seqs), dtype=np.float64)
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):  # right padding, as TRL's preference collator trained it
                ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[start : start + len(chunk)] = logits[:, 0].float().cpu().numpy()
        return out


class EnsembleReward:
    """mean - lam * std over reward models (module docstring). A plain object: any trainer can call it."""

    def __init__(self, models: RewardModels, lam: float = 0.5) -> None:
        if lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {lam!r}")
        self.models, self.lam = models, lam

    @property
    def names(self) -> tuple[str, ...]:
        return self.models.names

    def score(self, conversations: Sequence[Sequence[Message]]) -> tuple[np.ndarray, np.ndarray]:
        """(reward (B,), per-model scores (B, M)): every model scores every conversation."""
        per_model = np.stack([self.models.score(n, conversations) for n in self.names], axis=1)
        return ensemble_reward(per_model, self.lam), per_model

    def turn_scores(self, dialogues: Sequence[Sequence[Sequence[Message]]]) -> np.ndarray:
        """(n, M): model k scores the k-th conversation of each dialogue (one conversation per model)."""
        if any(len(d) != len(self.names) for d in dialogues):
            raise ValueError(f"each dialogue needs one conversation per model ({len(self.names)})")
        return np.stack([self.models.score(n, [d[k] for d in dialogues]) for k, n in enumerate(self.names)], axis=1)


def preference_accuracy(models: RewardModels, name: str, rows: Sequence[Mapping[str, Any]]) -> float:
    """Share of pairs where the model scores `chosen` above `rejected` (a tie counts half)."""
    if not rows:
        return float("nan")
    chosen = models.score(name, [[*r["prompt"], *r["chosen"]] for r in rows])
    rejected = models.score(name, [[*r["prompt"], *r["rejected"]] for r in rows])
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))
