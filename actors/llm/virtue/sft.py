"""The SFT stage the report planned and never ran: TRL `SFTTrainer` with LoRA on the judge's `chosen` answers.

Each preference pair gives one prompt-completion example in TRL's conversational format:

    prompt      the user's prompt and, for the motivation and consequences turns, the chosen dialogue before the turn
    completion  [{role: assistant, content: the chosen answer of that turn}]      (loss on the completion only)

After training, the LoRA is merged into the base weights and the merged model is saved as a plain model folder
(`merged/`): PPO then trains a fresh LoRA on it, with the SFT model as its reference policy, and the engines load
it like any other model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.llm.virtue.trl_args import lora_config, trainer_kwargs
from simulator.errors import ConfigError, check_positive

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTStageConfig:
    epochs: float = 2.0
    learning_rate: float = 1e-4
    """LoRA fine-tuning rate (TRL's SFT default is 2e-5 for full fine-tuning)."""
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("SFTStageConfig", self, ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
                                                 "max_length", "lora_r", "lora_alpha"))


def sft_examples(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """prompt-completion examples from preference rows: the chosen side's last answer is the completion."""
    out = []
    for r in rows:
        chosen = list(r["chosen"])
        out.append({"prompt": [*r["prompt"], *chosen[:-1]], "completion": [chosen[-1]]})
    return out


def train_sft(
    model_dir: str | os.PathLike[str],
    examples: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    config: SFTStageConfig | None = None,
    device: str = "cpu",
) -> Path:
    """Train a LoRA with SFTTrainer, merge it, save the merged model (and tokenizer) to `out_dir/merged`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg = config or SFTStageConfig()
    if not examples:
        raise ConfigError("no chosen answers to fine-tune on (every pair tied, or no train prompts)")
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(**trainer_kwargs(cfg, out, device))
    lora = lora_config(cfg, "CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(list(examples)), processing_class=tok,
                         peft_config=lora)
    result = trainer.train()
    trainer.save_model(str(out / "adapter"))
    peft_model: Any = trainer.model
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    logger.info("SFT on %d examples (%d optimizer steps, loss %.4f) -> %s", len(examples), result.global_step,
                result.training_loss, out / "merged")
    return out / "merged"
