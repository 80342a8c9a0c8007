"""Every setting of an LLM agent, as frozen dataclasses that import no framework (no torch, transformers or vLLM).

    LLMAgentConfig                      [llm] of a scenario file, --llm_* flags
    ├── ppo: PPOConfig                  [ppo]: the PPO learner (actors/llm/learner.py)
    ├── actors: LLMActors               [llm.actors]: Ray actors for engines and learners (actors/llm/resources.py)
    └── virtue: VirtueConfig | None     [llm.virtue]: reward models of VR / Game+VR agents (actors/llm/virtue/dilemma.py)

The command line and scenario files are built from these fields (scenarios/options.py): a new option is one field,
its docstring is the --help text.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from actors.llm.answers import ANSWER_MODES, STOP_MODES
from actors.llm.prompts import STRUCTURED, check_variant
from simulator.errors import ConfigError, check_positive

SELECTION_MODES = ("random", "dqn", "prompt")
ENGINES = ("hf", "vllm")
ADAPTER_MODES = ("per_agent", "per_type", "shared")
COMPUTE_DTYPES = ("float32", "bfloat16", "bf16-mixed")  # actors/llm/models.py DTYPES
QUANTIZE_MODES = ("none", "nf4", "nf4_double")  # actors/llm/models.py load_kwargs
MAX_MASKED_CANDIDATES = 64  # masked selection scores one answer row per candidate per decision
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PIPELINE_COMMAND = "python -m scenarios.virtue_rlaif all --output {root}"  # its train-rm stage writes the models
DEFAULT_REWARD_MODELS = "results/virtue_rlaif/reward_models"  # the pipeline's default --output, stage train-rm


@dataclass(frozen=True)
class PPOConfig:
    """Defaults are the ICLR 2025 paper's (DESIGN section 4): its explicit settings, else TRL 0.x PPOConfig's."""

    learning_rate: float = 1.41e-5
    """Adam learning rate (TRL default, kept by the paper)."""
    batch_size: int = 5
    """samples per PPO step = games per episode (the job file: 5 against a static opponent, 3 for two LLM learners)."""
    mini_batch_size: int = 5
    """samples per forward/backward; the paper's script set it equal to batch_size."""
    gradient_accumulation_steps: int = 4
    """mini-batches accumulated per Adam step (paper: 4)."""
    ppo_epochs: int = 4
    """passes over each batch per PPO update (TRL default)"""
    gamma: float = 1.0
    """discount of the per-token rewards (one-shot answers: 1)"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """PPO policy clip range"""
    cliprange_value: float = 0.2
    """value-function clip range"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    adap_kl_ctrl: bool = True
    """adaptive KL coefficient (TRL AdaptiveKLController) instead of a fixed one"""
    init_kl_coef: float = 0.2
    """initial KL-penalty coefficient"""
    target: float = 6.0
    """adaptive KL: target KL to the reference model"""
    horizon: float = 10000.0
    """adaptive KL: horizon of the coefficient update"""
    use_score_scaling: bool = True
    """divide scores by their running standard deviation (TRL)"""
    use_score_norm: bool = True
    """with use_score_scaling: also subtract the running mean (TRL)"""
    score_clip: float | None = None
    """the paper's script meant 0.5 but wrote `configscore_clip=0.5`, which set nothing; None reproduces the run."""
    whiten_rewards: bool = False
    """whiten the per-token rewards before GAE (TRL)"""
    ratio_threshold: float = 10.0
    """skip a mini-batch whose mean ratio exceeds this (TRL's guard against a diverged policy)."""
    max_grad_norm: float | None = None
    """clip the gradient norm to this; None = no clipping"""
    lora_r: int = 64
    """LoRA rank (the paper: 64)"""
    lora_alpha: int = 32
    """the paper's script default (its jobs never override it); scaling alpha / r = 0.5."""
    lora_dropout: float = 0.0
    """the paper's script used 0.05, which acted in its rollouts only (TRL ran every PPO forward pass in eval mode and
    left the model in train mode for the next rollout); 0 samples from the policy PPO trains, keeps the first
    epoch's ratio exactly 1 and the learner deterministic (README, the ICLR protocol table)."""
    lora_target_modules: str = "all-linear"
    """modules that get a LoRA (peft target_modules)"""
    seed: int = 0
    """LoRA A and value-head init, and the mini-batch shuffle."""
    merge_identical_passes: bool = True
    """compute passes that see the same weights and samples once (see the module docstring); False = every pass"""
    share_prefix: bool = False
    """compute the prompt prefix that all samples of a PPO step share (chat template and game text) once, its
    keys and values broadcast to every sample, gradients included; and take the frozen reference policy's log pi of a
    (prompt, answer, mask) seen before from the host's memo. The same numbers up to float rounding"""
    fused_adam: bool = False
    """Adam as torch's one fused kernel over all of the learner's tensors (fused=True) instead of its per-tensor
    loop: ~2x faster on this CPU for LoRA r64 (19.5M weights a SmolLM2 adapter); the same update up to float
    rounding (last bits), so False keeps the records of the default path"""

    def __post_init__(self) -> None:
        positive = ("learning_rate", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                    "target", "horizon", "lora_r", "lora_alpha")
        check_positive("PPOConfig", self, positive)
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.mini_batch_size > self.batch_size:
            raise ConfigError(f"mini_batch_size {self.mini_batch_size} exceeds batch_size {self.batch_size}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


@dataclass(frozen=True)
class LLMActors:
    """How many Ray actors host the LLM agents, and what each one asks of the cluster."""

    rollout_actors: int = 0
    """rollout engines, each in its own actor; 0 = engine and learners in the driver's process (no Ray)"""
    learner_actors: int = 1
    """learner actors (each holds one frozen base and the learners of its agents); used when rollout_actors > 0"""
    rollout_cpus: float = 1.0
    """CPUs per rollout actor"""
    rollout_gpus: float = 1.0
    """GPUs per rollout actor when device = "cuda" (fractions allowed); ignored on CPU"""
    learner_cpus: float = 1.0
    """CPUs per learner actor"""
    learner_gpus: float = 1.0
    """GPUs per learner actor when device = "cuda"; ignored on CPU"""
    gpu_memory_utilization: float = 0.4
    """vLLM's share of its GPU's memory (KV cache + weights); leave room for a learner on the same GPU"""
    placement: str = "PACK"
    """placement-group strategy: PACK (fill one node first), SPREAD (across nodes), or their STRICT_ forms"""
    placement_timeout_s: float = 120.0
    """how long to wait for the cluster to fit every bundle; a bundle that cannot fit would otherwise wait forever"""
    overlap: bool = False
    """train iteration t while iteration t+1 rolls out: one version off-policy at most, with the importance ratio"""
    gpu_memory_gib: float = 80.0
    """memory of one GPU (device = cuda), for the estimate that fails a population that cannot fit before any model
    loads (actors/llm/budget.py)"""

    def __post_init__(self) -> None:
        if self.rollout_actors < 0 or self.learner_actors < 1:
            raise ConfigError(
                f"rollout_actors must be >= 0 and learner_actors >= 1, got {self.rollout_actors} and {self.learner_actors}"
            )
        check_positive("llm.actors", self, ("rollout_cpus", "learner_cpus"))  # every bundle needs a resource, torch a thread
        for name in ("rollout_gpus", "learner_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"llm.actors.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.placement not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"unknown placement {self.placement!r}; valid: {', '.join(PLACEMENT_STRATEGIES)}")
        if self.placement_timeout_s <= 0:
            raise ConfigError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.overlap and self.rollout_actors == 0:
            raise ConfigError("overlap needs the learners on their own actors: set llm.actors.rollout_actors >= 1")

    @property
    def enabled(self) -> bool:
        return self.rollout_actors > 0


@dataclass(frozen=True)
class VirtueConfig:
    """`[llm.virtue]` of a scenario file: where the reward models are and how their score enters the reward."""

    reward_models: str = DEFAULT_REWARD_MODELS
    """the pipeline's reward_models/ folder (action/, motivation/, consequences/), or its output folder"""
    weight: float = 1.0
    """moral reward: VR = weight * ensemble; Game+VR = R_M + weight * ensemble"""
    lam: float = 0.5
    """ensemble = mean - lam * std over the three reward models (the report's 0.5)"""
    reason_tokens: int = 32
    """token limit of the stated reason (the report cut every turn at 32); a reason cut there is flagged"""
    temperature: float | None = None
    """sampling temperature of the reason; None = the agent's [llm] temperature"""
    device: str | None = None
    """torch device of the reward models; None = the agent's [llm] device"""
    base_model: str | None = None
    """the reward models' base; None = the pipeline's config.json `model` beside reward_models/, else the base
    folder the adapters were trained on (adapter_config.json)"""
    max_length: int | None = None
    """tokens a reward model reads (cut from the left); None = the pipeline's config.json rm.max_length, else 100"""
    batch_size: int = 16
    """conversations per reward-model forward pass"""

    def __post_init__(self) -> None:
        if not isinstance(self.reward_models, str) or not self.reward_models.strip():
            raise ConfigError(f"[llm.virtue] reward_models must be a folder, got {self.reward_models!r}")
        if self.lam < 0:
            raise ConfigError(f"[llm.virtue] lam must be >= 0, got {self.lam!r}")
        if self.reason_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"[llm.virtue] reason_tokens and batch_size must be >= 1, got {self.reason_tokens}, "
                              f"{self.batch_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"[llm.virtue] max_length must be >= 1, got {self.max_length}")

    @classmethod
    def from_value(cls, value: object) -> VirtueConfig | None:
        """A VirtueConfig, a mapping of its fields (a TOML table) or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"[llm.virtue] must be a table of {[f.name for f in fields(cls)]}, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown [llm.virtue] keys {unknown}; valid: {[f.name for f in fields(cls)]}")
        return cls(**dict(value))


@dataclass(frozen=True)
class LLMAgentConfig:
    model: str = "smollm2-135m-instruct"
    """a local Hugging Face folder, a hub id, or the embedded smollm2-135m-instruct"""
    engine: str = "hf"
    """rollout engine: hf (transformers, CPU or GPU) or vllm"""
    device: str = "cpu"
    """torch device of the HF engine and the learners (cpu, cuda, cuda:1, ...)"""
    tokens: str = "action12"
    """action-token pair (actors.llm.prompts.TOKEN_PAIRS) or random:<length>"""
    variant: str = STRUCTURED
    """game-prompt variant (actors.llm.prompts.PROMPT_VARIANTS); the training prompt is structured"""
    selection: str = "random"
    """partner selection: random, dqn or prompt"""
    max_new_tokens: int | None = None
    """tokens generated per answer; None = the longest action token's length (the paper's gen_len)"""
    stop: str = "length"
    """length: exactly max_new_tokens (the paper); eos: stop at an end-of-turn token (actors/llm/answers.py)"""
    answer_mode: str = "free"
    """free: sample freely (the paper); mask: only the two legal answers (a logit mask, for tiny models)"""
    off_policy: str = "ratio"
    """a sample from an older adapter version: ratio (importance ratio in PPO) or drop (discard and count)"""
    temperature: float = 1.0
    """sampling temperature of every answer"""
    train: bool = True
    """update the LoRA adapters with PPO (False: play the current adapters, frozen)"""
    p_cooperate: bool = True
    """record P(C token) / (P(C) + P(D)) per decision (one extra scoring pass; free in mask mode)"""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    actors: LLMActors = field(default_factory=LLMActors)
    """Ray actors for engines and learners (actors/llm/resources.py); the default runs everything in process"""
    virtue: VirtueConfig | None = None
    """[llm.virtue]: the reward models that score the stated reasons of VR / Game+VR agents (a table is converted);
    None = VirtueConfig's defaults (the pipeline's default output, results/virtue_rlaif/reward_models)"""
    adapters: str = "per_agent"
    """LoRA adapters: per_agent (the paper: one per agent), per_type (one per moral type, trained on the samples of
    all its agents), shared (one for the run); every agent keeps its own identity, partner memory and records"""
    dtype: str = "float32"
    """how the HF engine and the learners compute: float32; bfloat16 (every base weight in bf16); or bf16-mixed
    (float32 model and activations, matmuls in bf16 under torch.autocast with the linear weights kept in bf16: the
    fast path on CPUs with AMX-BF16 and on GPUs; actors/llm/models.py). LoRA weights, value heads and Adam state
    stay float32 in every mode"""
    answer_period: bool = True
    """accept one trailing period after an action token ("action1."); False parses as the paper, which stripped
    whitespace only (actors/llm/prompts.py)"""
    quantize: str = "none"
    """base weights of the policy and its reference in 4-bit NF4 through bitsandbytes, bfloat16 compute, as the
    paper loaded Gemma: none, nf4, or nf4_double (QLoRA's double quantisation, the job file's --QLoRA group); the
    HF engine and the learners (actors/llm/models.py)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "virtue", VirtueConfig.from_value(self.virtue))
        if self.answer_mode not in ANSWER_MODES:
            raise ConfigError(f"unknown answer_mode {self.answer_mode!r}; valid: {', '.join(ANSWER_MODES)}")
        if self.stop not in STOP_MODES:
            raise ConfigError(f"unknown stop {self.stop!r}; valid: {', '.join(STOP_MODES)}")
        if self.off_policy not in ("ratio", "drop"):
            raise ConfigError(f"unknown off_policy {self.off_policy!r}; valid: ratio, drop")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown LLM engine {self.engine!r}; valid: {', '.join(ENGINES)}")
        if self.selection not in SELECTION_MODES:
            raise ConfigError(f"unknown LLM partner selection {self.selection!r}; valid: {', '.join(SELECTION_MODES)}")
        check_variant(self.variant)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.adapters not in ADAPTER_MODES:
            raise ConfigError(f"unknown LLM adapters mode {self.adapters!r}; valid: {', '.join(ADAPTER_MODES)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"unknown LLM dtype {self.dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}")
        self._check_quantize()

    def _check_quantize(self) -> None:
        """Before any model loads: a known mode, an engine that loads through transformers, bitsandbytes present."""
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"unknown LLM quantize {self.quantize!r}; valid: {', '.join(QUANTIZE_MODES)}")
        if self.quantize == "none":
            return
        if self.engine != "hf":
            raise ConfigError(f"quantize = {self.quantize} loads the base through transformers + bitsandbytes; "
                              f"valid with engine = hf (got {self.engine})")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"quantize = {self.quantize} needs bitsandbytes: pip install 'moralsim[nf4]' "
                              "(bitsandbytes 0.50 runs NF4 on CPU and CUDA)")

    def check_population(self, num_agents: int) -> None:
        """Settings that depend on the population size, checked before any model loads (ConfigError naming the
        valid choices). Masked partner selection answers with a candidate's id (id_width digits, at least one token
        each on the tokenizers we ship) and scores one row per candidate per decision."""
        if self.selection != "prompt" or self.answer_mode != "mask":
            return
        others, digits = num_agents - 1, id_width(num_agents)
        if others > MAX_MASKED_CANDIDATES:
            raise ConfigError(
                f"masked partner selection among {others} candidates (more than {MAX_MASKED_CANDIDATES}: one scoring "
                f"row per candidate per decision); valid: selection = dqn or random, or answer_mode = free")
        if self.max_new_tokens is not None and digits > self.max_new_tokens:
            raise ConfigError(
                f"masked partner selection answers with a {digits}-digit agent id, more than max_new_tokens = "
                f"{self.max_new_tokens}; valid: max_new_tokens >= {digits} (or unset), or selection = dqn or random")


def id_width(num_agents: int) -> int:
    """Digits of an agent id in a selection prompt: every id has this width (zero-padded), so none is a prefix of
    another and a masked answer can tell them apart."""
    return len(str(max(0, num_agents - 1)))
