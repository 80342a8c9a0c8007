"""Session fixtures for the LLM tests: a tiny model folder and one shared in-process vLLM engine.

Import into tests/conftest.py (`from tests.llm_fixtures import *  # noqa: F403`). The vLLM engine starts once
per session (about 10-20 s on 2 CPU cores); tests share it and use their own adapter names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.llm.engine import AdapterWeights
from tests.helpers import need

TINY_MAX_LORAS = 3


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_path: Path) -> Iterator[object]:
    need("vllm")
    from actors.llm.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_model_path, max_loras=TINY_MAX_LORAS, seed=0, dtype="float32", max_model_len=512)
    yield engine
    engine.close()


def random_lora_model(model_path: Path, seed: int, rank: int = 8) -> Any:  # peft.PeftModel
    """A peft LoRA (all-linear) on the tiny model with random A *and* B, so it visibly changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    generator = torch.Generator().manual_seed(seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def lora_weights(model: torch.nn.Module, name: str, version: int) -> AdapterWeights:
    from actors.llm.weight_sync import adapter_weights_from_model

    return adapter_weights_from_model(model, name, version)


def hf_logprobs(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """Reference log pi(completion_t | ...) from one HF forward pass in float32."""
    ids = torch.tensor([[*prompt_ids, *completion_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].tolist()


class ScriptedEngine:
    """A RolloutEngine that answers from a fixed script, cycling (Concordia's mock model): LLMGroup tests that need
    legal AND illegal answers in a known pattern run without depending on what a random tiny model samples."""

    def __init__(self, tokenizer: Any, answers: list[str]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = (int(tokenizer.eos_token_id),)
        self.answers = answers
        self.calls = 0
        self.versions: dict[str, int] = {}

    def load_adapter(self, weights: AdapterWeights, restore: bool = False) -> None:
        self.versions[weights.name] = weights.version

    def adapter_version(self, adapter: str) -> int:
        return self.versions[adapter]

    def generate(self, requests: Any) -> list[Any]:
        from actors.llm.engine import GenerationResult

        out = []
        for r in requests:
            text = self.answers[self.calls % len(self.answers)]
            self.calls += 1
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            out.append(GenerationResult(ids, tuple([-0.5] * len(ids)), text, r.adapter, self.versions[r.adapter]))
        return out

    def score_batch(self, adapters: Any, prompts: Any, completions: Any) -> list[list[float]]:
        return [[-0.7] * len(c) for c in completions]

    def score(self, adapter: Any, prompt_ids: Any, completion_ids: Any) -> list[float]:
        return self.score_batch([adapter], [prompt_ids], [completion_ids])[0]

    def close(self) -> None:
        return None
