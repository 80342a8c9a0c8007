"""Named, versioned experiments as TOML files: `python main.py --scenario iclr2025/de_vs_tft_smollm2`.

A scenario file's tables map onto the config dataclasses, key for field, and so onto the command line (flags given
there win). The keys a table takes are its dataclass's fields (scenarios/run.py; `python main.py --help` lists each
with its help text, under the table's name):

    description = "..."
    version = 1
    [run]          simulator.config.RunConfig: num_iterations, num_runs, game, seed, method, compat,
                   random_matching, output, log_to, protocol, episode_length, ..., and destination_folder,
                   reward_schedule = [["Game", 0.5, "De"]]   (switch Game to De after half the iterations)
    [llm]          actors.llm.config.LLMAgentConfig: model, engine, device, tokens, variant, selection, answer_mode, ...
    [llm.actors]   actors.llm.config.LLMActors: rollout_actors, learner_actors, rollout_gpus, overlap, ...
    [llm.virtue]   actors.llm.config.VirtueConfig: reward_models, weight, lam, reason_tokens, ...
    [ppo]          actors.llm.config.PPOConfig: batch_size, learning_rate, init_kl_coef, lora_r, ...
    [dqn]          actors.dqn.DQNConfig: hidden, lr, gamma, eps_dilemma, eps_selection, ...
    [tabular]      actors.tabular.TabularConfig: alpha, gamma, eps_dilemma, eps_selection

An unknown key is refused with the closest valid one and the list of valid keys.

A sweep runs several populations with the same [run] settings (one progress bar, one report); `[run]` then has no
destination_folder, and `[sweep]` lists the populations in one of two forms:

    [sweep] populations = ["1xS_2xUT", "2xS_1xUT"]                  explicit population strings, in this order
    [sweep] types = ["S", "UT", "DE"], majority = 8, minority = 1   one population per type: `majority` agents of it
                                                                    and `minority` of each other type, in types' order
            report = "my_sweep_report"                              report folder under --output (default <name>_report)
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError, PopulationSpecError, UnknownNameError, closest
from simulator.population import parse_population

ROOT = Path(__file__).resolve().parent
TABLES = ("description", "version", "run", "llm", "ppo", "dqn", "tabular", "sweep", "job")
SWEEP_KEYS = {"populations", "types", "majority", "minority", "report"}


@dataclass(frozen=True)
class Sweep:
    """Several populations run with the same settings as one job, compared in one report."""

    populations: tuple[str, ...]  # destination folders, in the order the report shows them
    report: str  # report folder, relative to --output


def majority_populations(types: Sequence[str], majority: int, minority: int = 1) -> tuple[str, ...]:
    """One population per type: `majority` agents of that type and `minority` of each other, types kept in order.
    The AIES 2024 sweep is majority_populations(["S", "UT", "aUT", "DE", "mDE", "VEe", "Vie", "VEk", "Vagg"], 8)."""
    return tuple(
        "_".join(f"{majority if t == lead else minority}x{t}" for t in types) for lead in types
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    sweep: Sweep | None = None  # None: a single population, [run] destination_folder
    path: Path | None = None
    tables: dict[str, Any] = field(default_factory=dict)  # every table of the file; keys checked in scenarios/run.py

    @property
    def run(self) -> dict[str, Any]:
        return dict(self.tables.get("run", {}))


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
    for key in doc:
        if key not in TABLES:
            hint = closest(key, TABLES)
            raise ConfigError(f"scenario {path}: unknown table {key!r}" + (f"; did you mean {hint!r}?" if hint else "")
                              + f" Valid: {', '.join(TABLES)}")
    sweep = _sweep(path, doc["sweep"], doc.get("run", {})) if "sweep" in doc else None
    return Scenario(name, str(doc.get("description", "")), sweep, path, doc)


def _sweep(path: Path, table: object, run: dict[str, Any]) -> Sweep:
    """Validate a [sweep] table and expand it to its population strings."""

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"scenario {path}: [sweep] {why}. A sweep takes either populations = [\"1xS_2xUT\", ...] or "
            f"types = [\"S\", \"UT\", ...] with majority = <n> (and minority = <m>, default 1), plus an optional report"
        )

    if not isinstance(table, dict):
        raise bad(f"must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - SWEEP_KEYS)
    if unknown:
        raise bad(f"has unknown keys {unknown}; valid: {sorted(SWEEP_KEYS)}")
    if "destination_folder" in run:
        raise bad("lists the populations, so [run] must not set destination_folder")
    if ("populations" in table) == ("types" in table):
        raise bad("needs exactly one of populations and types")
    if "populations" in table:
        if {"majority", "minority"} & set(table):
            raise bad("majority and minority go with types, not with populations")
        populations = table["populations"]
        if not isinstance(populations, list) or not populations or not all(isinstance(p, str) for p in populations):
            raise bad(f"populations must be a non-empty list of population strings, got {populations!r}")
    else:
        types = table["types"]
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and t for t in types):
            raise bad(f"types must be a non-empty list of type codes, got {types!r}")
        repeated = sorted({t for t in types if types.count(t) > 1})
        if repeated:
            raise bad(f"types lists {repeated} more than once")
        counts: dict[str, int] = {}
        for key, value in (("majority", table.get("majority")), ("minority", table.get("minority", 1))):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"{key} must be a positive integer, got {value!r}")
            counts[key] = value
        if counts["majority"] <= counts["minority"]:
            raise bad(f"majority ({counts['majority']}) must be larger than minority ({counts['minority']})")
        populations = list(majority_populations(types, counts["majority"], counts["minority"]))
    repeated = sorted({p for p in populations if populations.count(p) > 1})
    if repeated:
        raise bad(f"lists population {repeated[0]!r} more than once")
    for text in populations:
        try:
            parse_population(text)
        except PopulationSpecError as e:
            raise bad(str(e)) from None
    report = table.get("report", f"{path.stem}_report")
    if not isinstance(report, str) or not report.strip():
        raise bad(f"report must be a folder name, got {report!r}")
    return Sweep(tuple(populations), report)
