"""Weight sync: how a PPO update reaches the rollout engine. This module owns the three parts: export (learner ->
plain tensors), transport (in process, or `AdapterRef` through Ray's object store), and load (a peft folder per
version for vLLM; `HFEngine.load_adapter` copies the tensors into its named adapter). One version rule: an engine
serves strictly increasing versions of an adapter (StaleAdapterError otherwise).

Only the LoRA adapters move. The base model is frozen and loaded once by every engine, so a sync is a few MB
per agent (rank 64 on all-linear modules of SmolLM2-135M: 19.5M parameters, 78 MB in float32), not the whole model.

    learner (torch + peft, one adapter per agent)
        │  adapter_weights_from_model(peft_model, name, version)
        ▼
    AdapterWeights(name, version, tensors, peft_config)       plain data; crosses a Ray boundary unchanged
        │  engine.load_adapter(weights)
        ▼
    VLLMEngine ─ adapter_to_peft_dir ─► <adapter_root>/<name>/v<version>/
        │                                  adapter_model.safetensors   peft state-dict names
        │                                  adapter_config.json         LoraConfig.to_dict(), JSON-safe
        │  LoRARequest(lora_name="<name>@v<version>", lora_int_id=<fresh id>, lora_path=that dir)
        │  llm.llm_engine.add_lora(request)   loads it now, so a bad adapter fails at sync time
        │  llm.llm_engine.remove_lora(<previous id>)   old version out of the LoRA cache; its dir deleted
        ▼
    vllm.LLM  (one base model; LoRA slots filled per batch, requests for different adapters mixed)

Why a fresh id and name per version: vLLM caches a loaded adapter by `lora_int_id`, and compares and hashes
`LoRARequest`s by `lora_name` (the prefix cache keys on name and path too). Reusing either would serve old weights.
Every result carries `adapter_version`, and the engine refuses to go backwards (`StaleAdapterError`).

Why a directory: vLLM 0.32's `LoRARequest` only takes a `lora_path`; there is no public call that takes tensors.
(`LoRAModel.from_lora_tensors` exists inside the worker and could be reached through a worker extension plus
`collective_rpc`, which would skip the disk round trip; the write is milliseconds for our adapter sizes, so the
public path wins.) `adapter_root` can point at /dev/shm to keep the write off disk.

Full-weight sync (not used here, kept for reference; the learner never changes base weights):
    - `LLM.collective_rpc(method, args=...)` calls a method on every worker; with
      `LLM(..., worker_extension_cls="pkg.mod.Cls")` that method can be ours, e.g. one that receives tensors and
      calls `self.model_runner.model.load_weights([(name, tensor), ...])` (OpenRLHF's and TRL's pattern).
    - vLLM's GPU worker also has `start_weight_update` / `update_weights` / `finish_weight_update`, a transfer
      engine for NCCL or IPC; the CPU worker (0.32) does not set one up.
    - `LLM.apply_model(fn)` runs `fn(model)` on the worker's `nn.Module` (only for in-process engines).
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.llm.engine import AdapterWeights
from simulator.errors import CorruptDataError

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def _json_safe(value: Any) -> Any:
    """LoraConfig.to_dict() holds sets (resolved target_modules) and enums; peft and vLLM read lists and strings."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


def adapter_to_peft_dir(weights: AdapterWeights, path: str | os.PathLike[str]) -> Path:
    """Write `weights` as a peft adapter folder (what `PeftModel.from_pretrained` and vLLM's LoRARequest read).

    The folder appears atomically (written beside it, then renamed), so a reader never sees half an adapter.
    An existing folder at `path` is replaced.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not weights.tensors:
        raise ValueError(f"adapter {weights.name!r} v{weights.version} has no tensors; expected peft LoRA A/B matrices")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: t.detach().to("cpu").contiguous() for k, t in weights.tensors.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        config = _json_safe(dict(weights.peft_config))
        config.setdefault("peft_type", "LORA")
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def peft_dir_to_adapter(path: str | os.PathLike[str], name: str, version: int) -> AdapterWeights:
    """Read a peft adapter folder back into plain tensors (the reverse of `adapter_to_peft_dir`)."""
    from safetensors.torch import load_file

    path = Path(path)
    weights_file, config_file = path / ADAPTER_WEIGHTS_FILE, path / ADAPTER_CONFIG_FILE
    if not weights_file.is_file() or not config_file.is_file():
        raise CorruptDataError(
            f"peft adapter folder {path} must hold {ADAPTER_WEIGHTS_FILE} and {ADAPTER_CONFIG_FILE}; "
            f"found {sorted(p.name for p in path.iterdir()) if path.is_dir() else 'no folder'}"
        )
    try:
        tensors = load_file(str(weights_file))
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptDataError(f"cannot read peft adapter at {path}: {exc}") from exc
    return AdapterWeights(name=name, version=version, tensors=tensors, peft_config=config)


def adapter_weights_from_model(model: torch.nn.Module, name: str, version: int, adapter_name: str = "default",
                               switch: Any = None) -> AdapterWeights:
    """Export: one adapter of a peft model as `AdapterWeights` (CPU copies, so later optimiser steps do not leak in).
    `switch`: the model's AdapterSwitch, which reads the adapter without building the model's state dict.

    peft resolves "all-linear" to full module paths; adapter_config.json files (and vLLM) use leaf names, so
    `target_modules` is written as leaf names."""
    from actors.llm.lora_switch import AdapterSwitch

    tensors = (switch or AdapterSwitch(model, fast=False)).export(adapter_name)  # fast=False: peft's state dict
    config = _json_safe(model.peft_config[adapter_name].to_dict())  # type: ignore[index,operator,union-attr]
    modules = config.get("target_modules")
    if isinstance(modules, list):
        config["target_modules"] = sorted({str(m).rsplit(".", 1)[-1] for m in modules})
    return AdapterWeights(name=name, version=version, tensors=tensors, peft_config=config)


# ── transport ───────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class AdapterRef:
    """An adapter on its way between processes: the Ray ObjectRef of its `AdapterWeights`, with the name and
    version a router needs. The driver passes the ref on; the tensors go from the learner actor to the engine actor
    through the object store (to an engine-local folder there), never through the driver."""

    name: str
    version: int
    ref: Any  # ray.ObjectRef[AdapterWeights]


def fetch(weights: AdapterWeights | AdapterRef) -> AdapterWeights:
    """The tensors themselves, wherever they are (a saved adapter needs them in this process)."""
    if isinstance(weights, AdapterRef):
        import ray

        got = ray.get(weights.ref)
        assert isinstance(got, AdapterWeights)
        return got
    return weights
