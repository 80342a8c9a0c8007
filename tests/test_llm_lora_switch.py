"""AdapterSwitch (actors/llm/lora_switch.py): switching adapters, disabling them and train/eval without walking the
model gives the forwards and gradients that peft's own set_adapter / disable_adapter / train give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import need


def _host(tiny_model_path: Path, names: tuple[str, ...] = ("p0", "p1", "p2")):  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    from actors.llm.learner import PolicyHost

    host = PolicyHost(tiny_model_path)
    for k, name in enumerate(names):
        host.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                          task_type="CAUSAL_LM"), seed=k)
    return host


def _logits(host, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return host.model(input_ids=ids).logits


def test_forwards_equal_peft_set_adapter_and_disable_adapter(tiny_model_path: Path) -> None:
    need("peft")
    host = _host(tiny_model_path)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    for name in ("p2", "p0", "p1", "p0"):
        host.switch.activate(name)
        fast = _logits(host, ids)
        host.model.set_adapter(name)
        assert torch.equal(fast, _logits(host, ids))
    others = {}
    for name in ("p0", "p1", "p2"):
        host.switch.activate(name)
        others[name] = _logits(host, ids)
    assert not torch.equal(others["p0"], others["p1"])  # the adapters differ, so the check above can fail
    with host.switch.disabled():
        base = _logits(host, ids)
    with host.model.disable_adapter():
        assert torch.equal(base, _logits(host, ids))
    assert torch.equal(_logits(host, ids), others["p2"])  # enabled again after the block, p2 still active
    with pytest.raises(KeyError, match="no adapter 'p3'"):
        host.switch.activate("p3")


def test_gradients_reach_only_the_active_adapter_as_with_peft(tiny_model_path: Path) -> None:
    need("peft")
    from actors.llm.learner import PPOConfig, PPOLearner

    host = _host(tiny_model_path, ())
    cfg = PPOConfig(lora_r=4, lora_alpha=8)
    learners = [PPOLearner(host, n, cfg) for n in ("p0", "p1", "p2")]  # adding p2 may freeze p1's weights (peft)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])

    def grads(learner, fast: bool) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
        host.model.zero_grad(set_to_none=True)
        if fast:
            learner._activate()
        else:
            host.model.set_adapter(learner.name)
        host.model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in host.model.named_parameters() if p.grad is not None}

    for learner in (learners[1], learners[0], learners[2]):
        fast, slow = grads(learner, True), grads(learner, False)
        assert fast.keys() == slow.keys() and fast  # the same weights get gradients ...
        assert all(f".{learner.name}." in n for n in fast)  # ... only the active adapter's
        assert all(torch.equal(fast[n], slow[n]) for n in fast)


def test_train_and_eval_set_every_module(tiny_model_path: Path) -> None:
    need("peft")
    host = _host(tiny_model_path)
    host.switch.train(True)
    assert all(m.training for m in host.model.modules())
    host.switch.train(False)
    assert not any(m.training for m in host.model.modules())
