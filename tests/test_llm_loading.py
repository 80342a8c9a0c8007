"""Loading a base as the paper did (actors/llm/models.py): eager attention for Gemma-2 (its attention-logit
soft-capping), 4-bit NF4 through bitsandbytes (`--llm_quantize nf4`), and the checks before any model loads."""

from __future__ import annotations

import pytest

from actors.llm.config import LLMAgentConfig
from actors.llm.models import load_causal_lm, load_kwargs
from simulator.errors import ConfigError
from tests.helpers import need


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny random Gemma-2 with a small attention soft-cap, so that capping changes the logits."""
    torch = need("torch")
    need("transformers")
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, attn_logit_softcapping=0.5, final_logit_softcapping=None,
                       sliding_window=8, max_position_embeddings=64, initializer_range=0.5)
    path = tmp_path_factory.mktemp("gemma2")
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    from transformers import AutoTokenizer

    from tests.tiny_model import tiny_model_dir

    AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(path)  # the engines load a tokenizer beside it
    return path


def test_gemma2_loads_with_eager_attention_so_its_soft_capping_acts(tiny_gemma2):
    torch = need("torch")
    from transformers import AutoModelForCausalLM

    assert load_kwargs(tiny_gemma2)["attn_implementation"] == "eager"
    eager = load_causal_lm(tiny_gemma2).eval()
    assert eager.config._attn_implementation == "eager"
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_gemma2, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        capped, uncapped = eager(ids).logits, sdpa(ids).logits
    # SDPA silently skips the soft-cap: with a cap of 0.5 the two paths give different logits
    assert (capped - uncapped).abs().max() > 1e-3
    # and the eager path is exactly what the soft-cap changes: without it, both agree
    eager.config.attn_logit_softcapping = None
    for layer in eager.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with torch.no_grad():
        assert torch.allclose(eager(ids).logits, uncapped, atol=1e-5)


def test_other_model_types_get_sdpa_with_grouped_heads_and_the_same_numbers(tiny_model_path):
    """SDPA_GQA: transformers' SDPA attention, with grouped key/value heads passed to torch as they are (enable_gqa)
    where transformers copies them per query head whenever a mask is given; identical outputs, left padding and a
    KV cache included."""
    torch = need("torch")
    from transformers import AutoModelForCausalLM

    from actors.llm.models import SDPA_GQA

    assert load_kwargs(tiny_model_path)["attn_implementation"] == SDPA_GQA
    assert "quantization_config" not in load_kwargs(tiny_model_path)
    gqa = load_causal_lm(tiny_model_path).eval()
    assert gqa.config._attn_implementation == SDPA_GQA
    assert gqa.config.num_key_value_heads < gqa.config.num_attention_heads  # heads are grouped: the path is used
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = gqa(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        b = sdpa(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        assert torch.equal(a.logits, b.logits)
        more = torch.randint(5, 200, (3, 2), generator=torch.Generator().manual_seed(1))
        mask2 = torch.cat([mask, torch.ones_like(more)], 1)
        pos2 = pos[:, -1:] + 1 + torch.arange(2)
        a2 = gqa(input_ids=more, attention_mask=mask2, position_ids=pos2, past_key_values=a.past_key_values)
        b2 = sdpa(input_ids=more, attention_mask=mask2, position_ids=pos2, past_key_values=b.past_key_values)
        assert torch.equal(a2.logits, b2.logits)


@pytest.mark.parametrize("mode", ["nf4", "nf4_double"])
def test_nf4_loads_the_base_in_4_bits_and_trains_a_lora_on_it(tiny_model_path, mode):
    torch = need("torch")
    need("bitsandbytes")
    need("peft")
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm(tiny_model_path, quantize=mode)
    linear = model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit)
    assert linear.weight.quant_state.quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant is (mode == "nf4_double")
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    logits = peft(torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    logits.float().sum().backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_quantize_is_checked_before_any_model_loads(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown LLM quantize 'int8'; valid: none, nf4, nf4_double"):
        LLMAgentConfig(quantize="int8")
    with pytest.raises(ConfigError, match="valid with engine = hf"):
        LLMAgentConfig(quantize="nf4", engine="vllm")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'moralsim\[nf4\]'"):
        LLMAgentConfig(quantize="nf4")


def test_quantize_is_a_flag(monkeypatch):
    need("bitsandbytes")
    from scenarios.run import resolve

    job = resolve(["--destination_folder", "1xGame@llm_1xTFT", "--llm_quantize", "nf4_double"])
    assert job.runs[0].agents.llm.quantize == "nf4_double"


# The HF engine and the learners load their base through models.load_causal_lm.


def test_the_engine_and_the_learners_load_gemma2_eagerly(tiny_gemma2):
    need("peft")
    from actors.llm.hf_engine import HFEngine
    from actors.llm.learner import PolicyHost

    assert HFEngine(tiny_gemma2)._base.config._attn_implementation == "eager"
    assert PolicyHost(tiny_gemma2).base.config._attn_implementation == "eager"


def test_the_engine_and_the_learners_load_nf4(tiny_model_path):
    need("bitsandbytes")
    need("peft")
    import bitsandbytes as bnb

    from actors.llm.hf_engine import HFEngine
    from actors.llm.learner import PolicyHost

    engine = HFEngine(tiny_model_path, quantize="nf4")
    host = PolicyHost(tiny_model_path, quantize="nf4")
    for model in (engine._base, host.base):
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
