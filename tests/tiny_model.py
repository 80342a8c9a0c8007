"""Tiny randomly initialised Llama-family chat models, built in code for tests (no hub download).

    build_tiny_model_dir(path, seed)  ──►  path/
                                            config.json, model.safetensors      LlamaForCausalLM (hidden 64, 2 layers)
                                            tokenizer.json, tokenizer_config.json, chat_template.jinja

The folder loads with `AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)` and
with vLLM's `LLM(model=str(path))`, so both engines serve the same weights and the same chat template.

Architecture follows SmolLM2 (Llama, grouped-query attention, tied embeddings) at toy size. The head size is 32
because vLLM's CPU attention supports head sizes {32, 64, 80, ...} only. The tokenizer is a byte-level BPE (the
GPT-2 / SmolLM2 scheme, so any text round-trips) trained in code on the game-prompt vocabulary; every
action token of `actors.llm.prompts.TOKEN_PAIRS` (action1 ... action4, A/B, X/Y, 0/1) is one token, with or without
a leading space. The chat template is ChatML, as in SmolLM2-Instruct:

    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_VERSION = 3  # bump when the built folder changes; part of the cache key

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words the game prompts use; the BPE merges them into whole tokens so tiny prompts stay short.
_ACTION_WORDS = ("action1", "action2", "action3", "action4", "A", "B", "X", "Y", "0", "1")
_CORPUS = """
You are playing a game with another agent. You must choose either action action1 or action action2.
Depending on your action and the other agent's action, you each get a certain number of points.
The points are awarded as follows (you are the row player, the other agent is the column player).
This is the first round. You have played with this opponent before. Last time, you played action1 and they
played action2, so you got 0 points and they got 4 points. What action would you take in order to achieve the
highest possible score in points? Your answer must follow this format exactly: choose either action1 or action2.
Do not explain your reasoning. Your answer: Answer with exactly one of the options.
Imagine a game between you and a partner. If you both cooperate you both gain; if one defects the other loses.
What would you do to maximise the total points of both players, the collective welfare of everyone?
Act according to your duty never to betray a partner who trusted you; keeping promises is a moral rule.
A poem: two travellers meet upon the road, each may share or keep the load, what will you choose, friend?
Choose a partner to play with next. The candidates are: agent 1 last played action1; agent 2 last played action2.
Answer with the number of the agent you choose. What is the capital of France? How many legs does a spider have?
What colour is the sky on a clear day? Name a fruit that is yellow. What is two plus two?
the a an and or of to in on is are you your they their it its with for by as at from that this which what
game games round rounds player players points point payoff payoffs table row column option options
partner opponent agent agents cooperate defect choose choice move moves last first previous next score
user assistant system user assistant system
"""


_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"


def _corpus_lines() -> list[str]:
    lines = [ln.strip() for ln in _CORPUS.strip().splitlines() if ln.strip()]
    # action tokens alone, after a space, after a newline and next to punctuation, so each becomes one token
    drill = []
    for w in _ACTION_WORDS:
        drill += [w, f" {w}", f"{w}.", f"({w})", f"| {w} |", f"either {w} or {w}"]
    roles = ["user\n", "assistant\n", "system\n"] * 20
    return lines * 3 + drill * 40 + roles + [str(n) for n in range(0, 101)] * 3


def _build_tokenizer(vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # GPT-2's split, except that letters and digits stay together, so "action1" can merge into one token
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None, padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    for w in _ACTION_WORDS:
        for text in (w, f" {w}"):
            ids = fast.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise RuntimeError(f"tiny tokenizer splits action token {text!r} into {ids}; raise vocab_size")
    return fast


def build_tiny_model_dir(
    path: str | os.PathLike[str],
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.2,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random Llama chat model (float32 safetensors + tokenizer) to `path` and return it.

    `initializer_range` 0.2 (real checkpoints: 0.02) makes the tied embeddings long enough that a LoRA can push one
    token's probability near 1 (logit gap up to about |h| |e| = 8 * 1.6); at 0.02 the tiny model's output
    stays near uniform whatever the adapter. Same arguments give bit-identical weights (torch seeded with `seed`
    inside a forked RNG). An existing complete folder is
    reused unless `overwrite`; the folder appears atomically (built in a sibling temp dir, then renamed), so
    concurrent test workers never see half a model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if path.joinpath("config.json").exists() and path.joinpath("tokenizer.json").exists() and not overwrite:
        return path
    if hidden_size % num_heads or (hidden_size // num_heads) not in (32, 64, 80, 96, 112, 128, 256):
        raise ValueError(
            f"head size hidden_size/num_heads = {hidden_size}/{num_heads} must be one vLLM's CPU backend supports "
            "(32, 64, 80, 96, 112, 128, 256)"
        )
    tokenizer = _build_tokenizer(vocab_size)
    padded_vocab = len(tokenizer)  # no unused ids: a sampled id always decodes
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=padded_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # _init_weights draws from the global generator; leave it untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "moralsim_tiny.json").write_text(json.dumps({"seed": seed, "version": TINY_VERSION}))
        if overwrite and path.exists():
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep theirs
            if not path.joinpath("config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny model (hidden %d, %d layers, vocab %d) at %s", hidden_size, num_layers, padded_vocab, path)
    return path


def tiny_model_dir(seed: int = 0, cache_root: str | os.PathLike[str] | None = None, **kwargs: int) -> Path:
    """`build_tiny_model_dir` under a cache folder keyed by the arguments (default $MORALSIM_CACHE or the tmp dir)."""
    root = Path(cache_root or os.environ.get("MORALSIM_CACHE") or Path(tempfile.gettempdir()) / "moralsim-cache")
    recipe = hashlib.sha256((_CORPUS + _SPLIT + CHAT_TEMPLATE).encode()).hexdigest()[:8]
    key = json.dumps({"seed": seed, "v": TINY_VERSION, "recipe": recipe, **kwargs}, sort_keys=True)
    name = "tiny-llama-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return build_tiny_model_dir(root / name, seed=seed, **kwargs)  # type: ignore[arg-type]
