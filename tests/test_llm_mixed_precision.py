"""bf16-mixed (actors/llm/models.py): a float32 model whose matmuls run in bf16 under torch.autocast, with the linear
weights stored in bf16 once. It must compute what autocast over the float32 model computes, keep LoRA weights,
value heads and Adam in float32 on the learner, and keep the weight-sync proof: after a sync, the engine's log pi
equal the learner's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.llm import prompts as P
from tests.helpers import need


def test_bf16_matmul_weights_compute_what_autocast_over_float32_computes(tiny_model_path: Path) -> None:
    torch = need("torch")
    from actors.llm.models import compute, load_causal_lm

    plain = load_causal_lm(tiny_model_path, dtype=torch.float32).eval()
    mixed = load_causal_lm(tiny_model_path, dtype=torch.float32, mixed=True).eval()
    linears = [m for m in mixed.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert mixed.get_input_embeddings().weight.dtype == torch.float32  # the residual stream starts in float32
    assert mixed.get_output_embeddings().weight is not mixed.get_input_embeddings().weight  # a bf16 copy, untied
    norms = [p for n, p in mixed.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with compute("cpu", True):
            out = mixed(input_ids=ids, output_hidden_states=True)
            b = plain(input_ids=ids).logits
        f32 = plain(input_ids=ids).logits
    a = out.logits
    assert torch.equal(a, b)  # the same numbers as autocast over the float32 model ...
    assert 0 < (a.float() - f32).abs().max() < 0.5  # ... which are bf16's, not float32's
    assert all(h.dtype == torch.float32 for h in out.hidden_states)  # the residual stream stays float32


def test_mixed_learner_trains_float32_adapters_and_the_synced_engine_matches_it(tiny_model_path: Path) -> None:
    torch = need("torch")
    from actors.llm.hf_engine import HFEngine
    from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
    from tests.test_llm_hf_engine import _prompts

    learners, engines = {}, {}
    for mixed in (False, True):
        host = PolicyHost(tiny_model_path, mixed=mixed)
        learners[mixed] = PPOLearner(host, "agent-0", PPOConfig(learning_rate=5e-3))
        engines[mixed] = HFEngine(tiny_model_path, mixed=mixed)
        engines[mixed].load_adapter(learners[mixed].export_adapter())
    learner, engine = learners[True], engines[True]
    base = learner.host.base  # still untied after peft wrapped it: bf16 output layer, float32 embeddings
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.get_input_embeddings().weight.dtype == torch.float32
    assert {p.dtype for p in learner._lora} == {torch.float32}  # LoRA, value head and Adam stay float32
    assert learner.value_head.weight.dtype == torch.float32
    served = [p for n, p in engine._peft.named_parameters() if "lora_" in n]
    assert {p.dtype for p in served} == {torch.bfloat16}  # what autocast rounds them to at every matmul
    tok = engine.tokenizer
    q = _prompts(tok, 5)
    c, d = P.answer_ids(tok, "action1"), P.answer_ids(tok, "action2")
    before = {m: np.array(learners[m].logprobs(q[1], c)) for m in (False, True)}
    for m in (False, True):
        learners[m].step(q, [c, c, d, d, c], [3.0, 3.0, 0.0, 0.0, 3.0])
        engines[m].load_adapter(learners[m].export_adapter())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in learner._lora)
    after = np.array(learner.logprobs(q[1], c))
    assert np.abs(after - before[True]).max() > 1e-3  # the step moved the mixed policy
    for p in q:  # the sync proof: after the sync the engine scores what the learner computes (bf16 paths: 1e-2)
        for a in (c, d):
            np.testing.assert_allclose(engine.score("agent-0", p, a), learner.logprobs(p, a), atol=1e-2, rtol=0)
    # bf16 against float32 on the same prompts: close, not equal
    gap = max(np.abs(np.array(learner.logprobs(p, a)) - np.array(learners[False].logprobs(p, a))).max()
              for p in q for a in (c, d))
    assert 0 < gap < 0.3


def test_dtype_names_the_valid_choices() -> None:
    from actors.llm.config import LLMAgentConfig
    from actors.llm.models import weights_dtype
    from simulator.errors import ConfigError

    torch = need("torch")
    assert LLMAgentConfig(dtype="bf16-mixed").dtype == "bf16-mixed"
    assert weights_dtype("bf16-mixed") == (torch.float32, True)
    assert weights_dtype("bfloat16") == (torch.bfloat16, False)
    with pytest.raises(ConfigError, match="valid: float32, bfloat16, bf16-mixed"):
        LLMAgentConfig(dtype="fp16")
    with pytest.raises(ConfigError, match="valid: float32, bfloat16, bf16-mixed"):
        weights_dtype("half")
