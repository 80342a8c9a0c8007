"""Named, versioned experiments as TOML files: `python main.py --scenario iclr2025/de_vs_tft_smollm2`.

A scenario file has three optional tables, each mapping onto the command line (explicit flags win):

    description = "..."
    version = 1
    [run]   destination_folder, num_iterations, num_runs, game, seed, method, compat, random_matching,
            reward_schedule = [["Game", 0.5, "De"]]   (switch Game to De after half the iterations)
    [llm]   model, engine, device, tokens, variant, selection, max_new_tokens, temperature, train, p_cooperate
    [ppo]   any actors.llm.learner.PPOConfig field (batch_size, learning_rate, init_kl_coef, lora_r, ...)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError, UnknownNameError

ROOT = Path(__file__).resolve().parent
RUN_KEYS = {"destination_folder", "num_iterations", "num_runs", "game", "seed", "method", "compat", "random_matching",
            "reward_schedule", "output"}
LLM_KEYS = {"model", "engine", "device", "tokens", "variant", "selection", "max_new_tokens", "temperature", "train",
            "p_cooperate"}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    ppo: dict[str, Any] = field(default_factory=dict)


def available() -> list[str]:
    return sorted(str(p.relative_to(ROOT).with_suffix("")) for p in ROOT.glob("*/*.toml"))


def load_scenario(name: str) -> Scenario:
    """A scenario by name (`iclr2025/de_vs_tft_smollm2`) or by path to a .toml file."""
    path = Path(name)
    if not (path.suffix == ".toml" and path.exists()):
        path = ROOT / f"{name}.toml"
        if not path.exists():
            raise UnknownNameError("scenario", name, available())
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot parse scenario {path}: {e}") from e
    unknown = set(doc) - {"description", "version", "run", "llm", "ppo"}
    bad_run = set(doc.get("run", {})) - RUN_KEYS
    bad_llm = set(doc.get("llm", {})) - LLM_KEYS
    if unknown or bad_run or bad_llm:
        raise ConfigError(
            f"scenario {path}: unknown keys {sorted(unknown | bad_run | bad_llm)}; "
            f"[run] takes {sorted(RUN_KEYS)}, [llm] takes {sorted(LLM_KEYS)}"
        )
    return Scenario(name, str(doc.get("description", "")), dict(doc.get("run", {})), dict(doc.get("llm", {})),
                    dict(doc.get("ppo", {})))
