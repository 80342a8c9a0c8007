"""`HFEngine`: the transformers rollout engine (CPU or GPU), every agent's LoRA adapter on one shared base.

    requests ──► left-pad ──► prefill ──► decode loop (KV cache) ──► results
                              one forward per step for the whole batch; peft routes each row through its own
                              adapter (`adapter_names=[...]`, "__base__" = adapter disabled)

Sampling: a request with a `seed` samples from its own generator seeded with it (the agent's stream provides it),
so its tokens do not depend on what else is in the batch; without one, rows draw from the engine's seeded
`torch.Generator`. Never from the global torch RNG. Stopping: `stop_at_eos` requests stop at any of `eos_ids`
(tokenizer EOS + generation-config EOS, the set vLLM stops at); the others generate exactly max_new_tokens.
`logprobs` are log pi(token) of the raw model distribution (temperature 1) whatever the sampling temperature,
i.e. the numbers PPO needs and the ones `score()` returns.

Prefix cache (scoring): the prompts of one agent share a long head (the game's rules and payoffs, the chat template),
and an adapter's key/value cache of that head does not change until its weights do. `score_batch` keeps, per adapter
and version, the KV cache of the longest head its prompts shared the first time (`PrefixCache`, at most
PREFIX_KV_BYTES); a later call whose prompts share at least PREFIX_MIN_TOKENS tokens with it runs only the rest of
each prompt on top of that slice. A new version of the adapter drops its entry. Same numbers as one forward of the
whole prompt, to float rounding (tests/test_llm_hf_engine.py).

Weight sync: `load_adapter(AdapterWeights)` writes the learner's LoRA tensors into the named adapter and records
its version; results carry the version that produced them, so a caller can reject stale rollouts with
`actors.llm.engine.check_fresh` (raises StaleAdapterError).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from actors.llm.answers import eos_token_ids
from actors.llm.engine import (
    BASE_ADAPTER,
    BASE_VERSION,
    AdapterWeights,
    GenerationRequest,
    GenerationResult,
    check_version,
    common_prefix,
)
from actors.llm.lora_switch import AdapterSwitch
from actors.llm.models import forward
from simulator.errors import UnknownNameError

logger = logging.getLogger(__name__)

SHARED_KV_TOKENS = 8192  # tokens of KV cache a shared-prompt scoring group may copy (SmolLM2-135M: ~46 KB each)
PREFIX_MIN_TOKENS = 16  # a shorter shared head is not worth a cached forward of its own
PREFIX_KV_BYTES = 512 * 2**20  # cached prompt heads, all adapters together (SmolLM2-135M: ~4 MB per 90-token head)


class PrefixCache:
    """Per (adapter, version): the prompt head and its KV cache (one row per layer: keys and values (1, H, P, D)),
    least recently used first out beyond `budget` bytes. Pure bookkeeping; the engine computes the tensors."""

    def __init__(self, budget: int = PREFIX_KV_BYTES) -> None:
        self.budget = budget
        self._entries: dict[tuple[str, int], tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.hits = self.misses = 0

    def lookup(self, name: str, version: int, head: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(k, kv): the cached head's first k tokens equal head's (k = 0: no usable entry)."""
        entry = self._entries.pop((name, version), None)
        if entry is None:
            self.misses += 1
            return 0, []
        self._entries[(name, version)] = entry  # most recently used last
        k = common_prefix([entry[0], head], min(len(entry[0]), len(head)))
        if k < PREFIX_MIN_TOKENS:
            self.misses += 1
            return 0, []
        self.hits += 1
        return k, entry[1]

    def store(self, name: str, version: int, head: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._entries.pop((name, version), None)
        self._entries[(name, version)] = (tuple(head), kv)
        while self.nbytes() > self.budget and len(self._entries) > 1:
            del self._entries[next(iter(self._entries))]

    def drop(self, name: str) -> None:
        for key in [k for k in self._entries if k[0] == name]:
            del self._entries[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, kv in self._entries.values() for pair in kv for t in pair)


def lora_config_from_dict(cfg: Mapping[str, object], inference_mode: bool):  # type: ignore[no-untyped-def]
    from peft import PeftConfig

    kwargs = dict(cfg)
    kwargs["inference_mode"] = inference_mode
    return PeftConfig.from_peft_type(**kwargs)


class HFEngine:
    """Plain-class rollout engine over transformers + peft (see module docstring)."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        prefix_cache: bool = True,
        quantize: str = "none",
        mixed: bool = False,
    ) -> None:
        """prefix_cache: keep adapters' prompt heads for later scoring calls (module docstring); False = each call
        on its own, as before the cache existed (benchmarks/llm_population.py's "today" path). quantize: nf4 /
        nf4_double loads a 4-bit base (actors/llm/models.py, load_causal_lm: also eager attention for Gemma-2).
        mixed: bf16-mixed (float32 `dtype`, bf16 matmuls; actors/llm/models.py); the served adapters' LoRA weights
        are then kept in bf16, the precision autocast would compute them in anyway."""
        from transformers import AutoTokenizer

        from actors.llm.models import load_causal_lm

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.mixed = mixed
        self._base = load_causal_lm(model_dir, dtype=dtype, device=str(self.device), quantize=quantize,
                                    mixed=mixed).eval()
        self._model = self._base  # becomes the PeftModel once the first adapter is loaded
        self._peft = None
        self._switch: Any = None  # the peft model's AdapterSwitch, once the first adapter is loaded
        self.fast_switch = True  # False: peft's own adapter switching (the plain path; benchmarks' "today")
        self._versions: dict[str, int] = {}
        self.prefix_cache = prefix_cache
        self.prefixes = PrefixCache()
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_ids = eos_token_ids(self.tokenizer, model_dir)
        self.eos_id = self.eos_ids[0]
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id)

    # ── adapters ────────────────────────────────────────────────────────────────────────────────────────────────

    def load_adapter(self, weights: AdapterWeights, restore: bool = False) -> None:
        """Serve `weights` for `weights.name` from now on; creating the adapter on first sight.

        Raises StaleAdapterError unless the version is newer than the one served (`engine.check_version`).
        """
        from peft import get_peft_model

        name, served = weights.name, self._versions.get(weights.name)
        check_version(name, weights.version, served, restore)
        if self._peft is None:
            cfg = lora_config_from_dict(weights.peft_config, inference_mode=True)
            self._peft = get_peft_model(self._base, cfg, adapter_name=name)
            self._model = self._peft
            self._switch = AdapterSwitch(self._peft, fast=self.fast_switch)
            self._lora_precision(name)
        elif name not in self._peft.peft_config:
            self._peft.add_adapter(name, lora_config_from_dict(weights.peft_config, inference_mode=True))
            self._lora_precision(name)
        missing, unexpected = self._switch.load(name, dict(weights.tensors))  # copies to the device
        if unexpected or missing:
            raise ValueError(
                f"adapter {name!r} weights do not fit the served model: unexpected {unexpected[:3]}, "
                f"missing {missing[:3]}"
            )
        self._switch.train(False)
        self._versions[name] = weights.version
        self.prefixes.drop(name)  # its cached prompt heads belong to the old weights
        logger.debug("engine serves adapter %s version %d", name, weights.version)

    def _lora_precision(self, name: str) -> None:
        """bf16-mixed: a new adapter's LoRA weights in bf16 (inference only; autocast rounds them so at every
        matmul, so the engine computes what the float32 learner's adapter computes under autocast)."""
        if not self.mixed:
            return
        for p in self._switch.parameters(name):
            p.data = p.data.to(torch.bfloat16)

    def adapter_version(self, adapter: str) -> int:
        try:
            return self._versions[adapter]
        except KeyError:
            raise UnknownNameError("adapter", adapter, self._versions) from None

    def _names(self, adapters: Sequence[str | None]) -> list[str] | None:
        for a in adapters:
            if a is not None and a not in self._versions:
                raise UnknownNameError("adapter", a, self._versions)
        if self._peft is None:
            return None  # no adapter exists yet: every row is the base model
        return [BASE_ADAPTER if a is None else a for a in adapters]

    def _version(self, adapter: str | None) -> int:
        return BASE_VERSION if adapter is None else self._versions[adapter]

    # ── forward passes ──────────────────────────────────────────────────────────────────────────────────────────

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if len(s):
                ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
                mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _call(self, names: list[str] | None, **kwargs):  # type: ignore[no-untyped-def]
        """One forward (actors/llm/models.py `forward`), each row through its adapter. Rows of one adapter take
        peft's plain path (the adapter made active), rows of several its mixed-batch path (a sub-batch per adapter
        in every LoRA layer)."""
        if names is None:
            return forward(self._model, self.mixed, **kwargs)
        if len(set(names)) > 1:
            with self._switch.rows(names):  # each row through its adapter (lora_switch.py; peft's adapter_names)
                return forward(self._model, self.mixed, **kwargs)
        assert self._peft is not None  # names are given once an adapter exists
        if names[0] == BASE_ADAPTER:
            with self._switch.disabled():
                return forward(self._model, self.mixed, **kwargs)
        self._switch.activate(names[0])  # peft's set_adapter without walking the model (lora_switch.py)
        return forward(self._model, self.mixed, **kwargs)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One batch: left-padded prefill, then one forward per new token until every row ended or hit its limit."""
        if not requests:
            return []
        if any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("every request needs a non-empty prompt")
        names = self._names([r.adapter for r in requests])
        B = len(requests)
        ids, mask = self._left_pad([r.prompt_ids for r in requests])
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, P) position ids that ignore the left padding
        temps = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=self.device)
        limits = torch.tensor([r.max_new_tokens for r in requests], device=self.device)
        steps = int(limits.max())
        out_tok = torch.full((B, steps), self.pad_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros((B, steps), dtype=torch.float32, device=self.device)
        alive = limits > 0  # (B,) still generating
        lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        stops = torch.tensor([r.stop_at_eos for r in requests], device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        own = [
            None if r.seed is None else torch.Generator(device=self.device).manual_seed(int(r.seed)) for r in requests
        ]

        out = self._call(names, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        for t in range(steps):
            logits = out.logits[:, -1].float()  # (B, V)
            logp = torch.log_softmax(logits, dim=-1)  # (B, V) log pi under the serving weights
            greedy = logits.argmax(-1)
            probs = torch.softmax(logits / temps.clamp(min=1e-6)[:, None], dim=-1)
            sampled = self._sample(probs, own)
            tok = torch.where(temps > 0, sampled, greedy)  # (B,)
            tok = torch.where(alive, tok, torch.full_like(tok, self.pad_id))
            out_tok[:, t] = tok
            out_lp[:, t] = logp.gather(1, tok[:, None]).squeeze(1)
            lengths += alive.long()
            ended = stops & torch.isin(tok, eos)
            alive = alive & ~ended & (limits > t + 1)
            if not alive.any():
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], 1)
            pos = pos[:, -1:] + 1
            out = self._call(
                names, input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                past_key_values=out.past_key_values, use_cache=True,
            )
        results = []
        for i, r in enumerate(requests):
            n = int(lengths[i])
            toks = tuple(int(x) for x in out_tok[i, :n].tolist())
            results.append(
                GenerationResult(
                    token_ids=toks,
                    logprobs=tuple(float(x) for x in out_lp[i, :n].tolist()),
                    text=str(self.tokenizer.decode(list(toks), skip_special_tokens=True)),
                    adapter=r.adapter,
                    adapter_version=self._version(r.adapter),
                )
            )
        return results

    def _sample(self, probs: torch.Tensor, own: list[torch.Generator | None]) -> torch.Tensor:
        """(B,) one token per row: rows with their own generator draw alone, the rest together from the engine's."""
        out = torch.empty(probs.shape[0], dtype=torch.long, device=self.device)
        shared = [i for i, g in enumerate(own) if g is None]
        if shared:
            out[shared] = torch.multinomial(probs[shared], 1, generator=self._gen).squeeze(1)
        for i, g in enumerate(own):
            if g is not None:
                out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
        return out

    @torch.no_grad()
    def score_batch(
        self,
        adapters: Sequence[str | None],
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
    ) -> list[list[float]]:
        """log pi(completion_t | prompt, completion_<t) per token for each row.

        Rows that repeat an (adapter, prompt) share one forward of that prompt, and an adapter's prompts share its
        cached prompt head (`_score_on_heads`); otherwise one left-padded forward.
        """
        if not (len(adapters) == len(prompts) == len(completions)):
            raise ValueError("adapters, prompts and completions must have the same length")
        if not prompts:
            return []
        names = self._names(adapters)
        if all(len(c) for c in completions) and all(len(p) for p in prompts):
            keys = [(BASE_ADAPTER if a is None else a, tuple(p)) for a, p in zip(adapters, prompts, strict=True)]
            heads = self._heads(keys, names is not None)
            if len(set(keys)) < len(keys) or any(k for k, _ in heads.values()):
                return self._score_on_heads(keys, heads, names, completions)
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
        ids, mask = self._left_pad(seqs)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        # rows are left-padded, so every completion ends at the last position: the output layer only needs the last
        # k = longest completion + 1 positions (the vocabulary projection of a 200-token prompt is ~20% of a forward)
        k = max(len(c) for c in completions) + 1
        if k == 1:
            return [[] for _ in completions]
        logits = self._call(names, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=k).logits.float()
        # (B, k-1): log pi of the last k-1 tokens, each predicted by the position before it
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, -(k - 1) :, None]).squeeze(2)
        out = []
        for i, c in enumerate(completions):
            n = len(c)
            out.append([float(x) for x in logp[i, k - 1 - n :].tolist()] if n else [])
        return out

    def _heads(self, keys: Sequence[tuple[str, tuple[int, ...]]], adapted: bool) -> dict[str, tuple[int, Any]]:
        """Per served adapter of the call: (k, kv), its prompts' first k tokens served from the prefix cache (k = 0:
        none). A head the prompts share that is not cached yet (at least PREFIX_MIN_TOKENS, leaving each prompt a
        token of its own) is computed now, all adapters' in one forward, and stored."""
        prompts_of: dict[str, list[tuple[int, ...]]] = {}
        for name, p in keys:
            prompts_of.setdefault(name, []).append(p)
        heads: dict[str, tuple[int, Any]] = dict.fromkeys(prompts_of, (0, None))
        if not self.prefix_cache:
            return heads
        missing: list[tuple[str, tuple[int, ...]]] = []
        for name, ps in prompts_of.items():
            shared = common_prefix(ps, min(len(p) for p in ps) - 1)
            k, kv = self.prefixes.lookup(name, self._served_version(name), ps[0][:shared])
            heads[name] = (k, kv)
            if not k and shared >= PREFIX_MIN_TOKENS:
                missing.append((name, ps[0][:shared]))
        if missing:
            ids, mask = self._left_pad([h for _, h in missing])
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            cache = self._call([n for n, _ in missing] if adapted else None, input_ids=ids, attention_mask=mask,
                               position_ids=pos, use_cache=True, logits_to_keep=1).past_key_values
            for j, (name, head) in enumerate(missing):
                pad = ids.shape[1] - len(head)  # left padding of this row: not part of its head
                kv = [(layer.keys[j : j + 1, :, pad:].clone(), layer.values[j : j + 1, :, pad:].clone())
                      for layer in cache.layers]
                self.prefixes.store(name, self._served_version(name), head, kv)
                heads[name] = (len(head), kv)
        return heads

    def _served_version(self, name: str) -> int:
        return BASE_VERSION if name == BASE_ADAPTER else self._versions[name]

    def _score_on_heads(
        self,
        keys: Sequence[tuple[str, tuple[int, ...]]],
        heads: dict[str, tuple[int, Any]],
        names: list[str] | None,
        completions: Sequence[Sequence[int]],
    ) -> list[list[float]]:
        """score_batch on shared work: each distinct (adapter, prompt) is run once, on top of its adapter's cached
        head, with the KV cache on; the cache is copied to its rows, and one more forward runs every row's
        completion on top of it. Same numbers as the one-forward path, to float rounding.
        Prompts go in groups whose copied cache holds at most SHARED_KV_TOKENS tokens (bounded memory)."""
        rows_of: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for i, k in enumerate(keys):
            rows_of.setdefault(k, []).append(i)
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for k, rows in rows_of.items():
            need = sum(len(k[1]) + len(completions[i]) for i in rows)
            if groups[-1] and size + need > SHARED_KV_TOKENS:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += need
        out: list[list[float]] = [[] for _ in keys]
        for group in groups:
            rows = [i for k in group for i in rows_of[k]]
            local = torch.tensor([u for u, k in enumerate(group) for _ in rows_of[k]], device=self.device)  # row -> prompt
            scored = self._score_on_cache(group, [heads[name] for name, _ in group], local, names is not None,
                                          [completions[i] for i in rows])
            for i, lp in zip(rows, scored, strict=True):
                out[i] = lp
        return out

    def _head_cache(self, heads: Sequence[tuple[int, Any]]) -> tuple[Any, torch.Tensor]:
        """The cached heads of U prompts as one (U, ..., width) KV cache, shorter heads left-padded with zeros, and
        its (U, width) attention mask. (None, (U, 0)) when no prompt has a head."""
        width = max(k for k, _ in heads)
        mask = torch.zeros((len(heads), width), dtype=torch.long)
        if width == 0:
            return None, mask.to(self.device)
        donor = next(kv for k, kv in heads if k)  # its tensors give the shapes of the heads of length 0
        layers = []
        for li in range(len(donor)):
            ks, vs = [], []
            for k, kv in heads:
                key, val = kv[li] if k else donor[li]
                pad = (0, 0, width - k, 0)  # (D, positions): zeros on the left of the positions
                ks.append(torch.nn.functional.pad(key[:, :, :k], pad))
                vs.append(torch.nn.functional.pad(val[:, :, :k], pad))
            layers.append((torch.cat(ks), torch.cat(vs)))
        for u, (k, _) in enumerate(heads):
            mask[u, width - k :] = 1  # (k = 0: an empty slice)
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers, config=self._base.config), mask.to(self.device)

    def _score_on_cache(
        self,
        prompts: Sequence[tuple[str, tuple[int, ...]]],
        heads: Sequence[tuple[int, Any]],
        row: torch.Tensor,
        adapted: bool,
        completions: Sequence[Sequence[int]],
    ) -> list[list[float]]:
        """One forward of the U prompts' rests (each after its cached head), then one forward of the completions on
        its cache, once per distinct stem (row[i] = the prompt of row i)."""
        u_names = [name for name, _ in prompts] if adapted else None
        cache, head_mask = self._head_cache(heads)
        ids, rest_mask = self._left_pad([p[k:] for (_, p), (k, _) in zip(prompts, heads, strict=True)])
        starts = torch.tensor([k for k, _ in heads], device=self.device)[:, None]
        pos = starts + (rest_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([head_mask, rest_mask], 1)
        out = self._call(u_names, input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[row]  # (B, V) predicts each completion's token 0
        width = max(len(c) for c in completions)
        comp = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        for i, c in enumerate(completions):
            comp[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        comp = comp.to(self.device)
        logp = first.gather(1, comp[:, :1])  # (B, 1)
        if width > 1:
            # the completion forward runs once per distinct stem (prompt, completion without its last token): rows
            # whose answers differ only in their last token (a masked answer's C and D rows) share it
            stem_of: dict[tuple[int, tuple[int, ...]], int] = {}
            stem: list[int] = []  # each row's stem
            first_rows: list[int] = []  # the first row of each stem
            for i, (u, c) in enumerate(zip(row.tolist(), completions, strict=True)):
                key = (int(u), tuple(c[:-1]))
                if key not in stem_of:
                    stem_of[key] = len(first_rows)
                    first_rows.append(i)
                stem.append(stem_of[key])
            reps = torch.tensor(first_rows, device=self.device)
            s_row = row[reps]  # (S,) the prompt of each stem
            cache = out.past_key_values
            if not torch.equal(s_row, torch.arange(len(prompts), device=self.device)):
                cache.reorder_cache(s_row)  # (U, ...) -> (S, ...); skipped when the stems are the prompts in order
            s_comp = comp[reps, :-1]
            s_mask = torch.zeros_like(s_comp)
            for j, r in enumerate(reps.tolist()):
                s_mask[j, : len(completions[r]) - 1] = 1
            lengths = torch.tensor([len(p) for _, p in prompts], device=self.device)
            s_pos = lengths[s_row][:, None] + torch.arange(width - 1, device=self.device)  # after each prompt
            s_names = [u_names[int(u)] for u in s_row] if u_names is not None else None
            logits = self._call(s_names, input_ids=s_comp, attention_mask=torch.cat([mask[s_row], s_mask], 1),
                                position_ids=s_pos, past_key_values=cache, use_cache=True).logits.float()
            stems = torch.tensor(stem, device=self.device)
            rest = torch.log_softmax(logits, dim=-1)[stems].gather(2, comp[:, 1:, None]).squeeze(2)  # (B, width-1)
            logp = torch.cat([logp, rest], 1)
        return [[float(x) for x in logp[i, : len(c)].tolist()] for i, c in enumerate(completions)]

    def score(self, adapter: str | None, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        return self.score_batch([adapter], [prompt_ids], [completion_ids])[0]

    def close(self) -> None:
        return None  # the model goes with the object
