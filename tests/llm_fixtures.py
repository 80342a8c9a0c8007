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
    from actors.llm.tiny import build_tiny_model_dir

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
