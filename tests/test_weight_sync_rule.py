"""The one weight-sync version rule (actors/llm/engine.py check_version), applied by both engines and the Ray proxy.

Versions of an adapter strictly increase: an older or an equal version is a replayed or reordered sync and is
refused; `restore` (a run rolled back to its checkpoint) may go back. The base adapter name is reserved everywhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from actors.llm.engine import BASE_ADAPTER, check_version, make_engine
from simulator.errors import ConfigError, StaleAdapterError
from tests.helpers import need
from tests.llm_fixtures import lora_weights, random_lora_model


@pytest.mark.parametrize(("version", "served", "restore", "ok"), [
    (0, None, False, True),  # first sight
    (2, 1, False, True),  # newer
    (1, 1, False, False),  # equal: a replayed sync
    (0, 1, False, False),  # older: a reordered sync
    (0, 1, True, True),  # a checkpoint restore may go back
    (1, 1, True, True),
])
def test_the_version_rule_as_a_table(version, served, restore, ok):
    if ok:
        check_version("agent", version, served, restore)
    else:
        with pytest.raises(StaleAdapterError, match=f"newer than the served v{served}, got v{version}"):
            check_version("agent", version, served, restore)


class _FakeActor:
    """A rollout actor's handle as RemoteEngine sees it: load_adapter.remote(payload, restore) -> a ref."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.load_adapter = SimpleNamespace(remote=lambda w, restore: self.sent.append((w.version, restore)))


def _engine(kind: str, tiny_model_path):  # type: ignore[no-untyped-def]
    if kind == "proxy":
        from actors.llm.remote import RemoteEngine

        return RemoteEngine([_FakeActor()], {}, tokenizer=None, eos_ids=[0])
    need("vllm" if kind == "vllm" else "peft")
    return make_engine(kind, tiny_model_path, seed=0, max_lora_rank=8)


@pytest.mark.parametrize("kind", ["hf", "vllm", "proxy"])
def test_every_engine_and_the_proxy_apply_the_one_rule(kind, tiny_model_path):
    engine = _engine(kind, tiny_model_path)
    model = random_lora_model(tiny_model_path, seed=1)
    try:
        engine.load_adapter(lora_weights(model, "a", 1))
        for stale in (1, 0):
            with pytest.raises(StaleAdapterError, match="newer than the served v1"):
                engine.load_adapter(lora_weights(model, "a", stale))
        assert engine.adapter_version("a") == 1
        engine.load_adapter(lora_weights(model, "a", 2))
        engine.load_adapter(lora_weights(model, "a", 0), restore=True)  # back to a checkpoint
        assert engine.adapter_version("a") == 0
        with pytest.raises(ConfigError, match="reserved"):
            engine.load_adapter(lora_weights(model, BASE_ADAPTER, 5))
        if kind == "proxy":
            assert engine.actors[0].sent == [(1, False), (2, False), (0, True)]
    finally:
        engine.close()


def test_the_one_factory_names_the_valid_engines(tiny_model_path):
    with pytest.raises(ConfigError, match="valid: hf, vllm"):
        make_engine("tgi", tiny_model_path)
