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
from actors.llm.engine import BASE_ADAPTER, BASE_VERSION, AdapterWeights, GenerationRequest, GenerationResult, check_version
from simulator.errors import UnknownNameError

logger = logging.getLogger(__name__)

SHARED_KV_TOKENS = 8192  # tokens of KV cache a shared-prompt scoring group may copy (SmolLM2-135M: ~46 KB each)


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
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()  # type: ignore[arg-type]
        self._model = self._base  # becomes the PeftModel once the first adapter is loaded
        self._peft = None
        self._versions: dict[str, int] = {}
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_ids = eos_token_ids(self.tokenizer, model_dir)
        self.eos_id = self.eos_ids[0]
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id)

    # ── adapters ────────────────────────────────────────────────────────────────────────────────────────────────

    def load_adapter(self, weights: AdapterWeights, restore: bool = False) -> None:
        """Serve `weights` for `weights.name` from now on; creating the adapter on first sight.

        Raises StaleAdapterError unless the version is newer than the one served (`engine.check_version`).
        """
        from peft import get_peft_model, set_peft_model_state_dict

        name, served = weights.name, self._versions.get(weights.name)
        check_version(name, weights.version, served, restore)
        if self._peft is None:
            cfg = lora_config_from_dict(weights.peft_config, inference_mode=True)
            self._peft = get_peft_model(self._base, cfg, adapter_name=name)
            self._model = self._peft
        elif name not in self._peft.peft_config:
            self._peft.add_adapter(name, lora_config_from_dict(weights.peft_config, inference_mode=True))
        tensors = {k: v.to(self.device) for k, v in weights.tensors.items()}
        res: Any = set_peft_model_state_dict(self._peft, tensors, adapter_name=name)
        missing = [k for k in res.missing_keys if f".{name}." in k and "lora_" in k]
        if res.unexpected_keys or missing:
            raise ValueError(
                f"adapter {name!r} weights do not fit the served model: unexpected {res.unexpected_keys[:3]}, "
                f"missing {missing[:3]}"
            )
        self._model.eval()
        self._versions[name] = weights.version
        logger.debug("engine serves adapter %s version %d", name, weights.version)

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
        if names is not None:
            kwargs["adapter_names"] = names
        return self._model(**kwargs)

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
        """log pi(completion_t | prompt, completion_<t) per token for each row, one left-padded forward.

        Rows that repeat a (adapter, prompt) share one forward of that prompt (`_score_shared_prompts`).
        """
        if not (len(adapters) == len(prompts) == len(completions)):
            raise ValueError("adapters, prompts and completions must have the same length")
        if not prompts:
            return []
        names = self._names(adapters)
        keys = [(a, tuple(p)) for a, p in zip(adapters, prompts, strict=True)]
        if len(set(keys)) < len(keys) and all(len(c) for c in completions) and all(len(p) for p in prompts):
            return self._score_shared_prompts(keys, names, completions)
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

    def _score_shared_prompts(
        self,
        keys: Sequence[tuple[str | None, tuple[int, ...]]],
        names: list[str] | None,
        completions: Sequence[Sequence[int]],
    ) -> list[list[float]]:
        """score_batch when prompts repeat (a judge asking several questions about one text, C/D answers of one
        prompt): each distinct (adapter, prompt) is run once with the KV cache on, the cache is copied to its rows,
        and one more forward runs every row's completion on top of it. Same numbers as the one-forward path.
        Prompts go in groups whose copied cache holds at most SHARED_KV_TOKENS tokens (bounded memory)."""
        rows_of: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}
        for i, k in enumerate(keys):
            rows_of.setdefault(k, []).append(i)
        groups: list[list[tuple[str | None, tuple[int, ...]]]] = [[]]
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
            scored = self._score_on_cache(group, local, None if names is None else [names[i] for i in rows],
                                          [completions[i] for i in rows])
            for i, lp in zip(rows, scored, strict=True):
                out[i] = lp
        return out

    def _score_on_cache(
        self,
        prompts: Sequence[tuple[str | None, tuple[int, ...]]],
        row: torch.Tensor,
        names: list[str] | None,
        completions: Sequence[Sequence[int]],
    ) -> list[list[float]]:
        """One prompt forward for `prompts` (U), its cache copied to the rows (row[i] = the prompt of row i), then
        one forward of every row's completion."""
        u_names = None if names is None else [BASE_ADAPTER if a is None else a for a, _ in prompts]
        ids, mask = self._left_pad([p for _, p in prompts])
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._call(u_names, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[row]  # (B, V) predicts each completion's token 0
        cache = out.past_key_values
        cache.reorder_cache(row)  # (U, ...) -> (B, ...)
        width = max(len(c) for c in completions)
        comp = torch.full((len(completions), width), self.pad_id, dtype=torch.long)
        comp_mask = torch.zeros((len(completions), width), dtype=torch.long)
        for i, c in enumerate(completions):
            comp[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            comp_mask[i, : len(c)] = 1
        comp, comp_mask = comp.to(self.device), comp_mask.to(self.device)
        c_pos = mask.sum(1)[row][:, None] + torch.arange(width, device=self.device)  # (B, width) after each prompt
        logp = first.gather(1, comp[:, :1])  # (B, 1)
        if width > 1:
            logits = self._call(names, input_ids=comp[:, :-1], attention_mask=torch.cat([mask[row], comp_mask[:, :-1]], 1),
                                position_ids=c_pos[:, :-1], past_key_values=cache, use_cache=True).logits.float()
            rest = torch.log_softmax(logits, dim=-1).gather(2, comp[:, 1:, None]).squeeze(2)  # (B, width-1)
            logp = torch.cat([logp, rest], 1)
        return [[float(x) for x in logp[i, : len(c)].tolist()] for i, c in enumerate(completions)]

    def score(self, adapter: str | None, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        return self.score_batch([adapter], [prompt_ids], [completion_ids])[0]

    def close(self) -> None:
        return None  # the model goes with the object
