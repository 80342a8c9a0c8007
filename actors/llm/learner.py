"""`PPOLearner`: PPO + LoRA for one LLM agent, with TRL 0.x `PPOTrainer.step` semantics (ICLR 2025 settings).

    PolicyHost  (one base model, frozen)
      ├── LoRA "agent-0" ── PPOLearner("agent-0"): value head, Adam, KL controller, score moments
      └── LoRA "agent-1" ── PPOLearner("agent-1"): ...
    reference policy = the same base with the adapter disabled (AdapterSwitch.disabled(), lora_switch.py)

Several learners may share one `PolicyHost` (peft named adapters on one PeftModel): each learner activates its
adapter before every forward, and its optimizer holds only its own LoRA tensors and value head, so one base copy
serves N agents. Learners on one host must run one at a time (one Ray actor hosts them sequentially). A learner
given a model folder instead builds a private host.

step(queries, responses, scores, behaviour_logprobs=, versions=, allowed=), batch of `batch_size` samples:
    1. scores -> running mean/std normalisation (use_score_scaling + use_score_norm)
    2. old log pi, V (adapter on) and log pi_ref (adapter off) of every response token, no grad
    3. r_t = -beta (log pi - log pi_ref)_t, + score on the last token; GAE(gamma, lambda); whiten advantages
    4. ppo_epochs x shuffled mini-batches of `mini_batch_size`: loss = pg_loss + vf_coef * vf_loss, divided by
       gradient_accumulation_steps; Adam steps once every gradient_accumulation_steps mini-batches
    5. beta <- adaptive KL update with the batch's mean sequence KL, n_steps = batch_size; version += 1

Step 4 reproduces what the paper's run actually did: its script set `mini_batch_size = batch_size = 5` and raised
`gradient_accumulation_steps` to 4 after PPOConfig was built, so accelerate's counter (which persists across
steps) made the 4 epochs' mini-batches one accumulated Adam step per PPO step. The counter here persists too.

Identical passes. With mini_batch_size = batch_size and no dropout, the passes between two Adam steps see the same
weights and the same samples, so they compute the same gradient (and a ratio of exactly 1 on the first window).
`merge_identical_passes` computes each such window once and scales its loss by the number of passes it stands for;
the first window's forward also provides old log pi and V (no separate no-grad forward). With the paper's settings a
PPO step is then one forward/backward plus the reference forward instead of 2 forwards + 4 forward/backwards;
`tests/test_llm_ppo_passes.py` shows the update is unchanged, and benchmarks/llm_throughput.py measures the gain.

Off-policy samples. Each sample may carry the adapter version and the behaviour log pi that produced it. A sample
from an older version than the learner's is trained with the importance ratio pi_theta / pi_behaviour (its
behaviour log pi is its "old" log pi in the clipped objective) and counted in `stale_samples`; it is never
silently treated as on-policy. (The group can also drop them: actors/llm/agent.py, `off_policy = "drop"`.)

Masked answers (actors/llm/answers.py): `allowed[i][t]` lists the tokens the answer mask allowed at response
position t of sample i; log pi, the reference log pi (so the KL) and the entropy are then those of the masked,
renormalised policy that produced the sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from actors.llm.config import PPOConfig
from actors.llm.engine import AdapterWeights, common_prefix
from actors.llm.lora_switch import AdapterSwitch
from actors.llm.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
    normalise_scores,
    policy_loss,
    value_loss,
)
from simulator.errors import ConfigError

logger = logging.getLogger(__name__)




MASKED_LOGIT = -1e9  # logit of a token an answer mask forbids: exp() is exactly 0, and 0 * it stays finite


_Forward = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor]  # PPOLearner._forward's result


@dataclass(frozen=True)
class _Batch:
    """One PPO step's samples, as `_forward` reads them."""

    queries: Sequence[Sequence[int]]
    responses: Sequence[Sequence[int]]
    width: int  # the longest response, in tokens
    allowed: Sequence[Sequence[Sequence[int]] | None] | None  # per sample its answer mask, None = free


def _allowed_mask(allowed: Sequence[Sequence[Sequence[int]] | None], b: int, width: int, vocab: int) -> torch.Tensor:
    """(b, width, V) bool: True where a token may be produced; rows or positions without a mask allow everything."""
    m = torch.ones((b, width, vocab), dtype=torch.bool)
    for i, per_pos in enumerate(allowed):
        for t, ids in enumerate(per_pos or ()):
            m[i, t] = False
            m[i, t, list(ids)] = True
    return m


REFERENCE_HEAD_MIN = 16  # tokens a cached reference head must share with a batch's head to be used
REFERENCE_HEADS = 8  # reference heads a host keeps (SmolLM2-135M: ~4 MB per 90-token head)
REFERENCE_MEMO = 100_000  # reference log pi rows a host keeps (a few tokens each)


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_cpu(v) for v in x)
    return x


class PolicyHost:
    """One frozen base causal LM that carries the LoRA adapters of any number of learners."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "cpu", dtype: torch.dtype = torch.float32,
                 quantize: str = "none", mixed: bool = False):
        """quantize: nf4 / nf4_double, the paper's 4-bit base for the policy and the reference (load_causal_lm);
        mixed: bf16-mixed, float32 `dtype` with bf16 matmuls (actors/llm/models.py); LoRA weights stay float32."""
        from transformers import AutoTokenizer

        from actors.llm.models import load_causal_lm

        self.device = torch.device(device)
        self.mixed = mixed
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = load_causal_lm(model_dir, dtype=dtype, device=str(self.device), quantize=quantize, mixed=mixed)
        self.base.requires_grad_(False)
        self.model: Any = None  # the PeftModel, once the first adapter exists
        self.switch: Any = None  # its AdapterSwitch (actors/llm/lora_switch.py)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else self.tokenizer.eos_token_id)
        # the frozen base's KV cache of prompt heads (the reference policy's: it never changes), most recent last
        self.reference_heads: list[tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]] = []
        # the frozen base's log pi per (prompt, answer, mask): a population's prompts repeat (a few histories, two
        # option orders), and the reference policy never changes
        self.reference_memo: dict[tuple[Any, ...], torch.Tensor] = {}

    def add_adapter(self, name: str, lora_config, seed: int) -> None:  # type: ignore[no-untyped-def]
        from peft import get_peft_model

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # LoRA A init draws from the global RNG
            torch.manual_seed(seed)
            if self.model is None:
                self.model = get_peft_model(self.base, lora_config, adapter_name=name)
                self.switch = AdapterSwitch(self.model)
            elif name in self.model.peft_config:
                raise ConfigError(f"adapter {name!r} already exists on this host")
            else:
                self.model.add_adapter(name, lora_config)

    @property
    def hidden_size(self) -> int:
        return int(self.base.config.hidden_size)

    def forward(self, **kwargs: Any) -> Any:
        """The adapted model's forward as every learner runs it (actors/llm/models.py `forward`: bf16 autocast
        for bf16-mixed)."""
        from actors.llm.models import forward

        return forward(self.model, self.mixed, **kwargs)


class PPOLearner:
    """PPO + LoRA + value head for one agent (see module docstring)."""

    def __init__(
        self,
        model: str | os.PathLike[str] | PolicyHost,
        name: str = "agent-0",
        config: PPOConfig | None = None,
        device: str = "cpu",
    ) -> None:
        from peft import LoraConfig

        self.config = cfg = config or PPOConfig()
        self.host = model if isinstance(model, PolicyHost) else PolicyHost(model, device=device)
        self.name = name
        self.device = self.host.device
        self.lora_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, bias="none", task_type="CAUSAL_LM",
        )
        self.host.add_adapter(name, self.lora_config, cfg.seed)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            self.value_head = torch.nn.Linear(self.host.hidden_size, 1).to(self.device, torch.float32)
        lora = [p for n, p in self.host.model.named_parameters() if f".{name}." in n and "lora_" in n]
        if not lora:
            raise RuntimeError(f"no LoRA parameters found for adapter {name!r}")
        self._lora = lora
        self._activate()
        self._params = [*lora, *self.value_head.parameters()]
        self.optimizer = torch.optim.Adam(self._params, lr=cfg.learning_rate, fused=True if cfg.fused_adam else None)
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target, cfg.horizon) if cfg.adap_kl_ctrl
                       else FixedKLController(cfg.init_kl_coef))
        self.running = RunningMoments()
        self.version = 0  # number of completed step() calls; exported with the adapter
        self._accum = 0  # mini-batches since the last Adam step (persists across steps, like accelerate's)
        self._rng = np.random.default_rng(cfg.seed)

    @property
    def tokenizer(self):  # type: ignore[no-untyped-def]
        return self.host.tokenizer

    def _activate(self) -> None:
        """This learner's adapter is the one the host's forwards apply, and its weights are trainable (peft may
        have frozen them when another learner's adapter was added: lora_switch.py)."""
        self.host.switch.activate(self.name)
        for p in self._lora:
            if not p.requires_grad:
                p.requires_grad_(True)

    # ── forward ─────────────────────────────────────────────────────────────────────────────────────────────────

    def _forward(
        self,
        queries: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        width: int,
        values: bool = True,
        allowed: Sequence[Sequence[Sequence[int]] | None] | None = None,
        reference: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Right-padded forward of query + response rows (`reference`: the caller disabled the adapter, so the
        shared prompt head comes from the base's cached heads).

        Returns logp (b, width) log pi(response_t), values (b, width) V(state before response_t) or None,
        mask (b, width), logits (b, width, V) at the positions that predict the response tokens.
        allowed[i]: per response position the tokens an answer mask allowed (None = free); logits outside them are
        set to MASKED_LOGIT, so logp and the entropy are those of the renormalised, masked policy.
        """
        shared = self._shared_prefix(queries) if self.config.share_prefix else 0
        if shared and reference:
            shared, cache = self._reference_cache(queries[0][:shared], len(queries))
        elif shared:
            cache = self._prefix_cache(queries[0][:shared], len(queries))
        if shared:
            queries = [q[shared:] for q in queries]
        seqs = [list(q) + list(r) for q, r in zip(queries, responses, strict=True)]
        L = max(len(s) for s in seqs)
        b = len(seqs)
        ids = torch.full((b, L), self.host.pad_id, dtype=torch.long)
        attn = torch.zeros((b, L), dtype=torch.long)
        pos = torch.full((b, width), L - 1, dtype=torch.long)  # (b, width) position predicting response_t
        tgt = torch.full((b, width), self.host.pad_id, dtype=torch.long)  # (b, width) response_t
        mask = torch.zeros((b, width), dtype=torch.float32)
        for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
            ids[i, : len(seqs[i])] = torch.as_tensor(seqs[i])
            attn[i, : len(seqs[i])] = 1
            pos[i, : len(r)] = torch.arange(len(q) - 1, len(q) - 1 + len(r))
            tgt[i, : len(r)] = torch.as_tensor(list(r))
            mask[i, : len(r)] = 1.0
        ids, attn, pos, tgt, mask = (x.to(self.device) for x in (ids, attn, pos, tgt, mask))
        # the output layer only at the positions that predict response tokens (the union over rows, a few dozen of
        # a few hundred): the model's own head, so logit soft-capping (Gemma-2) and the like still apply
        keep = torch.unique(pos)  # (K,) sorted
        if shared:  # the suffixes continue the shared prefix's cache: positions and mask start after it
            attn = torch.cat([torch.ones((b, shared), dtype=attn.dtype, device=self.device), attn], 1)
            out = self.host.forward(input_ids=ids, attention_mask=attn, output_hidden_states=values,
                                    logits_to_keep=keep, past_key_values=cache, use_cache=True,
                                    position_ids=torch.arange(shared, shared + L, device=self.device).expand(b, L))
        else:
            out = self.host.forward(input_ids=ids, attention_mask=attn, output_hidden_states=values, logits_to_keep=keep)
        rows = torch.arange(b, device=self.device)[:, None]
        logits = out.logits[rows, torch.searchsorted(keep, pos)].float()  # (b, width, V)
        if allowed is not None and any(a is not None for a in allowed):
            logits = logits.masked_fill(~_allowed_mask(allowed, b, width, logits.shape[-1]).to(self.device), MASKED_LOGIT)
        logp = torch.log_softmax(logits, -1).gather(2, tgt[..., None]).squeeze(2)  # (b, width)
        v = None
        if values:
            hidden = out.hidden_states[-1][rows, pos].float()  # (b, width, H) last layer, after the final norm
            v = self.value_head(hidden).squeeze(-1)  # (b, width)
        return logp, v, mask, logits

    @staticmethod
    def _shared_prefix(queries: Sequence[Sequence[int]]) -> int:
        """Tokens every query starts with, leaving each query at least one token of its own (the position that
        predicts its first answer token must be in the suffix); 0 when there is nothing worth sharing."""
        n = common_prefix(queries, min(len(q) for q in queries) - 1)
        return n if n >= 8 and len(queries) > 1 else 0

    def _prefix_cache(self, prefix: Sequence[int], rows: int) -> Any:
        """The KV cache of `prefix` under the current weights (one row, with its autograd graph), repeated to rows."""
        ids = torch.as_tensor([list(prefix)], device=self.device)
        cache = self.host.forward(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(rows)
        return cache

    def _reference_cache(self, prefix: Sequence[int], rows: int) -> tuple[int, Any]:
        """(k, cache): the frozen base's KV cache of the first k tokens of `prefix`, repeated to rows. Served from
        the host's cached heads when one shares at least REFERENCE_HEAD_MIN tokens with `prefix` (the base never
        changes, so a head stays valid for good); otherwise `prefix` is computed and kept (the last
        REFERENCE_HEADS of them)."""
        from transformers import DynamicCache

        heads = self.host.reference_heads
        best, kv = 0, None
        for head, head_kv in heads:
            k = common_prefix([head, prefix], min(len(head), len(prefix)))
            if k > best:
                best, kv = k, head_kv
        if best < REFERENCE_HEAD_MIN or kv is None:
            ids = torch.as_tensor([list(prefix)], device=self.device)
            cache = self.host.forward(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            heads.append((tuple(prefix), kv))
            del heads[:-REFERENCE_HEADS]
            best = len(prefix)
        data = [(key[:, :, :best].expand(rows, -1, -1, -1).contiguous(),
                 val[:, :, :best].expand(rows, -1, -1, -1).contiguous()) for key, val in kv]
        return best, DynamicCache(ddp_cache_data=data, config=self.host.base.config)

    @torch.no_grad()
    def logprobs(
        self, prompt_ids: Sequence[int], completion_ids: Sequence[int], allowed: Sequence[Sequence[int]] | None = None
    ) -> list[float]:
        """log pi(completion_t | prompt, completion_<t) under the current adapter (one unpadded forward)."""
        if not completion_ids:
            return []
        self._activate()
        self.host.switch.train(False)
        logp, _, _, _ = self._forward([prompt_ids], [completion_ids], len(completion_ids), values=False,
                                      allowed=[allowed])
        return [float(x) for x in logp[0].tolist()]

    # ── PPO step ────────────────────────────────────────────────────────────────────────────────────────────────

    def step(
        self,
        queries: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        scores: Sequence[float],
        *,
        behaviour_logprobs: Sequence[Sequence[float]] | None = None,
        versions: Sequence[int] | None = None,
        allowed: Sequence[Sequence[Sequence[int]] | None] | None = None,
    ) -> dict[str, float]:
        """One PPO update on `batch_size` (query ids, response ids, score) samples; returns scalar statistics.

        behaviour_logprobs[i], versions[i]: the log pi per response token and the adapter version that produced
        sample i; a sample older than this learner is trained with the importance ratio (module docstring).
        allowed[i]: the answer mask of sample i, or None for a freely generated answer.
        """
        B = self._check_batch(queries, responses, scores)
        stale = self._stale_rows(B, versions, behaviour_logprobs, responses)
        raw = torch.tensor([float(s) for s in scores], dtype=torch.float32, device=self.device)
        cfg = self.config
        score_t = normalise_scores(raw, self.running, cfg.use_score_scaling, cfg.use_score_norm, cfg.score_clip)
        batch = _Batch(queries, responses, max(len(r) for r in responses), allowed)
        self._activate()
        windows = self._pass_windows() if self._merge_passes(B) else []
        merged = 0 < len(windows) < cfg.ppo_epochs  # some passes stand for others (with GA = 1 none do)
        first, old_logp, old_values, mask = self._old_policy(batch, merged)
        ref_logp = self._reference_logprobs(batch)
        if stale.any():
            old_logp = self._behaviour_logprobs(old_logp, stale, behaviour_logprobs, responses)
        kl_coef = self.kl_ctl.value
        rewards, non_score, kl = kl_shaped_rewards(score_t, old_logp, ref_logp, mask, kl_coef)
        old_values = old_values * mask
        adv, returns = self._advantages(rewards, old_values, mask)
        acc, optimizer_steps = self._optimise(batch, first, windows if merged else None, old_logp, old_values, adv,
                                              returns)
        mean_kl = float(kl.sum(1).mean())  # mean over the batch of the sequence KL, TRL's objective/kl
        self.kl_ctl.update(mean_kl, B)
        self.version += 1
        return {k: float(np.mean(v)) for k, v in acc.items()} | dict(
            kl=mean_kl,
            kl_coef=kl_coef,
            next_kl_coef=self.kl_ctl.value,
            mean_score=float(raw.mean()),
            mean_scaled_score=float(score_t.mean()),
            non_score_reward=float(non_score.sum(1).mean()),
            returns_mean=float(masked_mean(returns, mask)),
            values_mean=float(masked_mean(old_values, mask)),
            advantages_mean=float(masked_mean(adv, mask)),
            optimizer_steps=float(optimizer_steps),
            forward_backward_passes=float(len(windows) if merged else cfg.ppo_epochs * self._minibatches(B)),
            stale_samples=float(stale.sum()),
            version=float(self.version),
        )

    def _advantages(
        self, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages (whitened) and returns of the KL-shaped rewards."""
        cfg = self.config
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(values, rewards, mask, cfg.gamma, cfg.lam)
        return masked_whiten(adv, mask), returns

    def _check_batch(
        self, queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], scores: Sequence[float]
    ) -> int:
        B = len(queries)
        if not (B == len(responses) == len(scores) == self.config.batch_size):
            raise ValueError(
                f"step needs batch_size={self.config.batch_size} queries, responses and scores; "
                f"got {B}, {len(responses)}, {len(scores)}"
            )
        if any(len(r) == 0 for r in responses) or any(len(q) == 0 for q in queries):
            raise ValueError("every query and every response needs at least one token")
        return B

    def _old_policy(self, batch: _Batch, merged: bool) -> tuple[_Forward | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(first training forward or None, old log pi, old V, mask) under the step's starting weights. Merged passes
        take them from the first window's training forward, which sees exactly those weights."""
        if merged:
            self.host.switch.train(True)
            first = self._forward(batch.queries, batch.responses, batch.width, allowed=batch.allowed)
            assert first[1] is not None  # values=True
            return first, first[0].detach(), first[1].detach(), first[2]
        self.host.switch.train(False)
        with torch.no_grad():
            old_logp, old_values, mask, _ = self._forward(batch.queries, batch.responses, batch.width,
                                                          allowed=batch.allowed)
        assert old_values is not None  # values=True
        return None, old_logp, old_values, mask

    def _reference_logprobs(self, batch: _Batch) -> torch.Tensor:
        """log pi_ref: the frozen base (adapter disabled), under the same answer mask. With share_prefix, samples
        seen before come from the host's memo (REFERENCE_MEMO entries at most) and only the others run."""
        memo = self.host.reference_memo if self.config.share_prefix else None
        B = len(batch.queries)
        masks = batch.allowed if batch.allowed is not None else [None] * B
        keys = [(tuple(q), tuple(r), None if m is None else tuple(tuple(a) for a in m))
                for q, r, m in zip(batch.queries, batch.responses, masks, strict=True)]
        todo = list(range(B)) if memo is None else [i for i, k in enumerate(keys) if k not in memo]
        ref_logp = torch.zeros((B, batch.width), dtype=torch.float32, device=self.device)
        if todo:
            with torch.no_grad():
                self.host.switch.train(False)
                with self.host.switch.disabled():
                    part, _, _, _ = self._forward(
                        [batch.queries[i] for i in todo], [batch.responses[i] for i in todo], batch.width,
                        values=False, allowed=None if batch.allowed is None else [batch.allowed[i] for i in todo],
                        reference=True)
            ref_logp[todo] = part
            if memo is not None:
                for j, i in enumerate(todo):
                    memo[keys[i]] = part[j, : len(batch.responses[i])].clone()
                while len(memo) > REFERENCE_MEMO:
                    del memo[next(iter(memo))]
        if memo is not None:
            for i in set(range(B)) - set(todo):
                n = len(batch.responses[i])
                ref_logp[i, :n] = memo[keys[i]]
        return ref_logp

    def _behaviour_logprobs(
        self, old_logp: torch.Tensor, stale: np.ndarray, behaviour: Sequence[Sequence[float]] | None,
        responses: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Stale rows take their behaviour log pi as the old policy (the importance ratio, module docstring)."""
        assert behaviour is not None  # checked by _stale_rows
        old_logp = old_logp.clone()
        for i in np.flatnonzero(stale):
            n = len(responses[i])
            old_logp[i, :n] = torch.as_tensor(list(behaviour[i]), dtype=old_logp.dtype, device=self.device)
        return old_logp

    def _optimise(
        self, batch: _Batch, first: _Forward | None, windows: list[int] | None, old_logp: torch.Tensor,
        old_values: torch.Tensor, adv: torch.Tensor, returns: torch.Tensor,
    ) -> tuple[dict[str, list[float]], int]:
        """Epochs x mini-batches, or (windows given) one forward/backward per window of identical passes."""
        cfg, B = self.config, len(batch.queries)
        self.host.switch.train(True)
        acc: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clipfrac",
                                                       "approxkl", "ratio", "vf_clipfrac")}
        steps = 0
        if windows is not None:
            for w, passes in enumerate(windows):
                for _ in range(passes):  # the shuffle the unmerged passes would draw, so later steps match
                    self._rng.permutation(B)
                fwd = first if w == 0 else self._forward(batch.queries, batch.responses, batch.width,
                                                         allowed=batch.allowed)
                assert fwd is not None
                steps += self._train_pass(fwd, old_logp, old_values, adv, returns, passes, acc)
        else:
            for _ in range(cfg.ppo_epochs):
                perm = self._rng.permutation(B)
                for start in range(0, B, cfg.mini_batch_size):
                    idx = perm[start : start + cfg.mini_batch_size]
                    t = torch.as_tensor(idx, device=self.device)
                    fwd = self._forward([batch.queries[i] for i in idx], [batch.responses[i] for i in idx], batch.width,
                                        allowed=None if batch.allowed is None else [batch.allowed[i] for i in idx])
                    steps += self._train_pass(fwd, old_logp[t], old_values[t], adv[t], returns[t], 1, acc)
        self.host.switch.train(False)
        return acc, steps

    def _minibatches(self, B: int) -> int:
        return -(-B // self.config.mini_batch_size)

    def _merge_passes(self, B: int) -> bool:
        """Whether every pass of this step sees the full batch, deterministically (see the module docstring)."""
        cfg = self.config
        return cfg.merge_identical_passes and cfg.mini_batch_size >= B and cfg.lora_dropout == 0.0

    def _pass_windows(self) -> list[int]:
        """The step's ppo_epochs passes grouped by the Adam steps between them: [4] for the paper's settings."""
        ga, windows, run = self.config.gradient_accumulation_steps, [], 0
        for p in range(self.config.ppo_epochs):
            run += 1
            if (self._accum + p + 1) % ga == 0:
                windows.append(run)
                run = 0
        return windows + ([run] if run else [])

    def _stale_rows(
        self,
        B: int,
        versions: Sequence[int] | None,
        behaviour: Sequence[Sequence[float]] | None,
        responses: Sequence[Sequence[int]],
    ) -> np.ndarray:
        """(B,) bool: samples produced by an older adapter version than this learner's."""
        if versions is None:
            return np.zeros(B, dtype=bool)
        v = np.asarray(versions)
        if len(v) != B:
            raise ValueError(f"versions has {len(v)} entries for {B} samples")
        if (v > self.version).any():
            raise ValueError(f"samples from version {int(v.max())} are newer than the learner's v{self.version}")
        stale = v < self.version
        if stale.any():
            if behaviour is None:
                raise ValueError(
                    f"{int(stale.sum())} samples come from an older adapter version; training them needs their "
                    "behaviour log pi (behaviour_logprobs) for the importance ratio"
                )
            for i in np.flatnonzero(stale):
                if len(behaviour[i]) != len(responses[i]):
                    raise ValueError(f"sample {i}: {len(behaviour[i])} behaviour log pi for {len(responses[i])} tokens")
        return stale

    def _train_pass(
        self,
        fwd: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
        old_logp: torch.Tensor,
        old_values: torch.Tensor,
        adv: torch.Tensor,
        returns: torch.Tensor,
        passes: int,
        acc: dict[str, list[float]],
    ) -> int:
        """Backward of `passes` identical mini-batch passes; an Adam step when the accumulation window closes."""
        cfg = self.config
        logp, vpred, m, logits = fwd
        assert vpred is not None
        pg, pg_stats = policy_loss(logp, old_logp, adv, m, cfg.cliprange)
        vf, vf_stats = value_loss(vpred, old_values, returns, m, cfg.cliprange_value)
        loss = pg + cfg.vf_coef * vf
        if pg_stats["ratio"] > cfg.ratio_threshold:
            logger.warning("%s: mean ratio %.2f > %.2f, skipping mini-batch", self.name, float(pg_stats["ratio"]),
                           cfg.ratio_threshold)
            loss = loss * 0.0
        (loss * (passes / cfg.gradient_accumulation_steps)).backward()
        steps = 0
        for _ in range(passes):
            self._accum += 1
            if self._accum % cfg.gradient_accumulation_steps == 0:
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self._params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                steps += 1
        with torch.no_grad():
            entropy = float(masked_mean(entropy_from_logits(logits), m))
            for _ in range(passes):
                acc["policy_loss"].append(float(pg))
                acc["value_loss"].append(float(vf))
                acc["entropy"].append(entropy)
                acc["clipfrac"].append(float(pg_stats["clipfrac"]))
                acc["approxkl"].append(float(pg_stats["approxkl"]))
                acc["ratio"].append(float(pg_stats["ratio"]))
                acc["vf_clipfrac"].append(float(vf_stats["clipfrac"]))
        return steps

    # ── weight sync ─────────────────────────────────────────────────────────────────────────────────────────────

    # ── checkpoint ──────────────────────────────────────────────────────────────────────────────────────────────

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed learner needs to continue exactly: LoRA and value head, Adam, KL coefficient, score
        moments, version, the accumulation counter and the shuffle RNG (CPU tensors and plain values; picklable)."""
        return {
            "lora": self.host.switch.export(self.name),
            "value_head": {k: v.detach().to("cpu", copy=True) for k, v in self.value_head.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "kl_coef": self.kl_ctl.value,
            "running": asdict(self.running),
            "version": self.version,
            "accum": self._accum,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.host.switch.load(self.name, dict(state["lora"]))
        if unexpected or missing:
            raise ValueError(f"checkpoint of {self.name!r} does not fit: unexpected {unexpected[:3]}, "
                             f"missing {missing[:3]}")
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        self.kl_ctl.value = float(state["kl_coef"])
        self.running = RunningMoments(**state["running"])
        self.version = int(state["version"])
        self._accum = int(state["accum"])
        self._rng.bit_generator.state = state["rng"]

    def export_adapter(self) -> AdapterWeights:
        """The current LoRA weights as plain CPU tensors (peft state-dict names) with this learner's version."""
        from actors.llm.weight_sync import adapter_weights_from_model

        return adapter_weights_from_model(self.host.model, self.name, self.version, adapter_name=self.name,
                                          switch=self.host.switch)

    def config_dict(self) -> dict[str, object]:
        return asdict(self.config)
