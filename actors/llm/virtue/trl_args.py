"""What the two TRL training stages (reward models: RewardTrainer, SFT: SFTTrainer) configure alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Schedule(Protocol):
    """The fields RewardModelConfig and SFTStageConfig share (read-only: both are frozen dataclasses)."""

    @property
    def epochs(self) -> float: ...

    @property
    def learning_rate(self) -> float: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def gradient_accumulation_steps(self) -> int: ...

    @property
    def max_length(self) -> int: ...

    @property
    def lora_r(self) -> int: ...

    @property
    def lora_alpha(self) -> int: ...

    @property
    def lora_dropout(self) -> float: ...

    @property
    def seed(self) -> int: ...


def trainer_kwargs(cfg: Schedule, out: Path, device: str) -> dict[str, Any]:
    """TrainingArguments of a stage: cfg's schedule, float32 on device, no checkpoints, no trackers, one process."""
    return dict(
        output_dir=str(out / "trainer"),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # the default recomputes every forward; the models are small
        save_strategy="no",
        report_to="none",
        logging_strategy="epoch",
        dataloader_num_workers=0,
    )


def lora_config(cfg: Schedule, task_type: str) -> Any:  # peft.LoraConfig
    """A LoRA on every linear layer with cfg's rank, alpha and dropout."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear")
