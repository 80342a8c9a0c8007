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


def test_export_and_load_match_peft_state_dict_calls(tiny_model_path: Path) -> None:
    need("peft")
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    host = _host(tiny_model_path)
    for name in ("p1", "p0"):
        fast = host.switch.export(name)
        slow = get_peft_model_state_dict(host.model, adapter_name=name)
        assert fast.keys() == slow.keys() and fast
        assert all(torch.equal(fast[k], slow[k]) for k in fast)
        assert all(fast[k].data_ptr() != slow[k].data_ptr() for k in fast)  # copies, not the live weights
    assert not torch.equal(host.switch.export("p0")[next(iter(fast))], host.switch.export("p1")[next(iter(fast))])

    # loading p0's weights into p2: the same model as peft's set_peft_model_state_dict gives
    other = _host(tiny_model_path)
    weights = host.switch.export("p0")
    assert host.switch.load("p2", weights) == ([], [])
    set_peft_model_state_dict(other.model, weights, adapter_name="p2")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    for h in (host, other):
        h.switch.activate("p2")
    assert torch.equal(_logits(host, ids), _logits(other, ids))
    host.switch.activate("p0")
    assert torch.equal(_logits(host, ids), _logits(other, ids))  # p2 now computes what p0 computes

    # names that do not fit are reported (as peft's missing / unexpected keys) and nothing is written
    before = host.switch.export("p1")
    key = next(iter(weights))
    broken = dict(weights)
    broken["base_model.model.no_such.lora_A.weight"] = broken.pop(key)
    missing, unexpected = host.switch.load("p1", broken)
    assert missing == [key] and unexpected == ["base_model.model.no_such.lora_A.weight"]
    after = host.switch.export("p1")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(KeyError, match="no adapter 'p9'"):
        host.switch.export("p9")


def test_mixed_rows_equal_peft_adapter_names(tiny_model_path: Path) -> None:
    need("peft")
    from actors.llm.engine import BASE_ADAPTER

    host = _host(tiny_model_path)
    host.switch.train(False)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7], [2, 6, 1, 8, 8, 3], [4, 4, 9, 2, 11, 5], [7, 1, 3, 3, 6, 2]])
    for names in (["p0", "p1", "p0", BASE_ADAPTER],  # rows of one adapter apart: index tensors
                  ["p2", "p2", "p1", "p1"],  # contiguous: slices
                  [BASE_ADAPTER, "p0", "p0", "p2"]):
        with host.switch.rows(names):
            fast = _logits(host, ids)
        with torch.no_grad():
            slow = host.model(input_ids=ids, adapter_names=names).logits
        assert torch.equal(fast, slow), names
        for i, name in enumerate(names):  # and each row is what its adapter alone computes
            if name == BASE_ADAPTER:
                with host.switch.disabled():
                    alone = _logits(host, ids[i : i + 1])
            else:
                host.switch.activate(name)
                alone = _logits(host, ids[i : i + 1])
            assert torch.allclose(fast[i : i + 1], alone, atol=1e-5)
    host.switch.activate("p2")
    assert not torch.allclose(fast[1], _logits(host, ids)[1], atol=1e-3)  # row 1 is p0's, not p2's: they differ
    plain = _logits(host, ids)
    with host.switch.rows(["p0"] * 4):
        assert not torch.equal(_logits(host, ids), plain)
    assert torch.equal(_logits(host, ids), plain)  # the layers' own forward is back after the block
    with pytest.raises(KeyError, match="no adapter 'p7'"), host.switch.rows(["p0", "p7"]):
        pass
