"""The one resolved job: the command line and the scenario file, parsed once into frozen, typed objects.

    argv ──► parse once (flags from the config fields, scenarios/options.py)
    scenario file ──► its tables ([run] [llm] [llm.actors] [llm.virtue] [ppo] [dqn] [tabular] [sweep])
          defaults  <  scenario file  <  flags given on the command line
                                   │
                                   ▼
    Job ── runs: one RunConfig per population (a sweep has several), each holding its parsed Population, game,
       │         seed, matching, protocol and AgentConfigs (dqn, tabular, llm with its ppo / actors / virtue)
       ├── launch: how to run it (backend, cluster, progress, report), not part of what the records are
       └── sweep: the sweep's report, or None

Everything downstream receives the Job or the part of it it needs; nothing parses the command line again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from actors.dqn import DQNConfig
from actors.llm.config import LLMActors, LLMAgentConfig, PPOConfig, VirtueConfig
from actors.tabular import TabularConfig
from scenarios.jobs import JobGroup, parse_groups, select
from scenarios.options import Table, add_table, check_keys, given
from scenarios.scenario import Scenario, Sweep, load_scenario
from simulator.config import RunConfig
from simulator.errors import ConfigError, GameSpecError
from simulator.games import GAMES, Game, get_game
from simulator.population import STATIC_CODES, Population, parse_population
from simulator.rewards import MORAL_TYPES
from simulator.storage import is_uri

log = logging.getLogger("moralsim")

DEFAULT_POPULATION = "1xUT_1xaUT_1xDE"
LLM_CHECKPOINT_EVERY = 25  # iterations: at most ~2 minutes of the CPU demo lost to a crash
_METHODS = {"dqn": "dqn", "tabularq": "tabularQ", "llm": "llm"}


@dataclass(frozen=True)
class AgentConfigs:
    """Every learner's typed settings; each group takes its own (scenarios/factory.py)."""

    dqn: DQNConfig = field(default_factory=DQNConfig)
    tabular: TabularConfig = field(default_factory=TabularConfig)
    llm: LLMAgentConfig | None = None
    """None when the population has no LLM agent (then nothing of the LLM stack is imported)"""

    def identity(self, population: Population) -> dict[str, Any]:
        """The manifest's "agent_options": the settings of the learner kinds the population has. DQN and tabular
        settings are listed where they differ from the defaults (so datasets written before they were options
        still resume); the LLM settings are listed whole."""
        kinds = {a.learner for a in population.agents}
        out: dict[str, Any] = {}
        for kind, name, cfg in (("dqn", "dqn", self.dqn), ("tabularQ", "tabular", self.tabular)):
            default = type(cfg)()
            changed = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                       if getattr(cfg, f.name) != getattr(default, f.name)}
            if kind in kinds and changed:
                out[name] = changed
        if "llm" in kinds and self.llm is not None:
            llm = _plain(self.llm)
            out["ppo"] = llm.pop("ppo")
            out["llm"] = llm
        return out


def _plain(cfg: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready data (nested configs as tables)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = _plain(v) if hasattr(v, "__dataclass_fields__") else v
    return out


@dataclass(frozen=True)
class Launch:
    """How the job runs: none of it changes what the records are."""

    scenario: str | None = None
    """a named experiment (e.g. iclr2025/de_vs_tft_smollm2) or a .toml file; flags given too win"""
    only: tuple[str, ...] = ()
    """a job scenario's groups to run, by name (repeat the flag for several); default all"""
    backend: str = "ray"
    """ray (runs batches as Ray tasks) or inline (in this process)"""
    ray_address: str | None = None
    """join a running Ray cluster (auto, host:6379 or ray://host:10001; refused within 30 s when none answers
    there); without it a local Ray is started"""
    num_cpus: int | None = None
    """CPUs for the local Ray (default: all)"""
    runs_per_batch: int | None = None
    """runs stacked in one engine (default: spread the runs evenly over the CPUs)"""
    report: bool | None = None
    """write the HTML report at the end (<output>/<folder>/report/index.html); default: yes for a single
    population, the comparison report for a sweep"""
    no_progress: bool = False
    """hide the progress bar"""
    verbose: bool = False
    """debug logging"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "only", tuple(self.only))
        if self.backend not in ("ray", "inline"):
            raise ConfigError(f"unknown backend {self.backend!r}; valid: ray, inline")
        for name in ("num_cpus", "runs_per_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")

    @property
    def show_progress(self) -> bool | None:
        return False if self.no_progress else None


@dataclass(frozen=True)
class Job:
    """The resolved command: every population's RunConfig, how to launch them, and the sweep (or None)."""

    runs: tuple[RunConfig, ...]
    launch: Launch
    sweep: Sweep | None = None
    jobs: tuple[JobGroup, ...] = ()  # a job scenario's groups, one per run config, in the same order
    jobs_root: Path | str | None = None  # where the job scenario's groups and their comparison report go

    @property
    def has_llm(self) -> bool:
        return any(a.learner == "llm" for c in self.runs for a in c.population.agents)

    @property
    def output(self) -> Path | str:
        return self.runs[0].output


def _method(text: str) -> str:
    try:
        return _METHODS[str(text).lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; valid: DQN, tabularQ, llm") from None


def output_arg(text: str) -> Path | str:
    """--output: a URI stays text (Path would fold its '//'), a folder becomes a Path."""
    return text if is_uri(text) else Path(text)


def load_game(spec: str | Game) -> Game:
    """A game id (IPD, ISH, ...) or a path to a TOML/JSON file holding one custom payoff table."""
    if isinstance(spec, Game):
        return spec
    path = Path(spec)
    if path.suffix in (".toml", ".json") and path.exists():
        try:
            data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise GameSpecError(f"cannot parse game file {path}: {e}") from e
        return Game.from_mapping(data.get("game", data))
    return get_game(spec)


RUN = Table("run", RunConfig, "", "what to run (the [run] table of a scenario file)",
            skip=frozenset({"agents", "reward_schedule", "destination_folder"}),
            special={"method": {"aliases": ["--learner"], "type": _method, "metavar": "METHOD"},
                     "game": {"type": str, "metavar": "GAME", "default_text": "IPD; ids: " + ", ".join(GAMES)},
                     "output": {"type": output_arg, "default_text": "results"},
                     "compat": {"choices": ("none", "aies2024")},
                     "log_to": {"choices": ("none", "tensorboard", "wandb")},
                     "protocol": {"choices": ("population", "pair")},
                     "checkpoint_every": {"default_text": f"{LLM_CHECKPOINT_EVERY} with LLM agents, else 0"}})
LAUNCH = Table("launch", Launch, "", "how to run it", flags_only=True,
               special={"backend": {"choices": ("ray", "inline")}, "only": {"action": "append", "type": str},
                        "report": {"action": argparse.BooleanOptionalAction},
                        "verbose": {"aliases": ["-v"]}})
LLM = Table("llm", LLMAgentConfig, "llm_", "LLM agents (--learner llm or <code>@llm entries; [llm] of a scenario)",
            skip=frozenset({"virtue"}))
ACTORS = Table("llm.actors", LLMActors, "llm_", "LLM Ray actors ([llm.actors])")
VIRTUE = Table("llm.virtue", VirtueConfig, "llm_virtue_", "virtue reward models of VR / Game+VR agents ([llm.virtue])")
PPO = Table("ppo", PPOConfig, "ppo_", "PPO learner of LLM agents ([ppo])", skip=frozenset({"seed"}),
            special={"mini_batch_size": {"default_text": "batch_size"}})
DQN = Table("dqn", DQNConfig, "dqn_", "DQN learners ([dqn])", skip=frozenset({"learn_selection", "learn_dilemma"}))
TABULAR = Table("tabular", TabularConfig, "tabular_", "tabular Q learners ([tabular])",
                skip=frozenset({"learn_selection"}))
TABLES = (RUN, LAUNCH, LLM, ACTORS, VIRTUE, PPO, DQN, TABULAR)


def build_parser() -> argparse.ArgumentParser:
    codes = ", ".join(f"{c} ({t.name})" for c, t in MORAL_TYPES.items() if t.family == "aies")
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Population simulator for moral learning agents in social dilemmas (AIES 2024 protocol).",
        epilog=(
            f"Moral types: {codes}. Static strategies: {', '.join(STATIC_CODES)}. "
            "Mixed learners: append @<kind> to an entry, e.g. 2xUT@llm_1xDE@dqn_1xTFT. "
            "Records: <output>/<destination_folder>/run=<k>/part-*.parquet; re-running the same command resumes. "
            "Every flag but those of 'how to run it' is also a key of a scenario file's table (named in its group)."
        ),
    )
    p.add_argument("--destination_folder", dest="run:destination_folder", default=argparse.SUPPRESS, metavar="POPULATION",
                   help=f"population as <count>x<code> joined by '_' (default {DEFAULT_POPULATION}); also the "
                        "output folder name")
    for table in TABLES:
        add_table(p, table)
    return p


def resolve(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> Job:
    """The command line (parsed once) and its scenario file, as one Job. ConfigError & co. on bad input."""
    ns = (parser or build_parser()).parse_args(list(argv))
    flags = {t.key: given(ns, t) for t in TABLES}
    launch = Launch(**flags["launch"])
    scenario = load_scenario(launch.scenario) if launch.scenario else None
    tables = _tables(scenario)
    run_values = {**tables["run"], **flags["run"]}
    sweep = scenario.sweep if scenario else None
    if sweep is not None and "destination_folder" in flags["run"]:
        raise ConfigError(
            f"--destination_folder cannot be combined with the sweep scenario {launch.scenario!r}, which runs "
            f"{len(sweep.populations)} populations: {', '.join(sweep.populations)}"
        )
    populations = sweep.populations if sweep else (str(run_values.pop("destination_folder", DEFAULT_POPULATION)),)
    run_values.pop("destination_folder", None)
    if "method" in run_values:
        run_values["method"] = _method(str(run_values["method"]))
    if "output" in run_values:
        run_values["output"] = output_arg(str(run_values["output"]))
    run_values["game"] = load_game(run_values.get("game", "IPD"))
    run_values["reward_schedule"] = tuple(tuple(e) for e in run_values.get("reward_schedule", ()))
    if scenario is not None and "job" in scenario.tables:
        return _job_groups(scenario, launch, tables, flags, run_values)
    method = run_values.get("method", "dqn")
    has_llm = any(a.learner == "llm" for p in populations for a in parse_population(p).resolved(method).agents)
    run_values.setdefault("checkpoint_every", LLM_CHECKPOINT_EVERY if has_llm else 0)
    protocol = run_values.get("protocol", "population")
    agents = AgentConfigs(
        dqn=DQNConfig(**{**tables["dqn"], **flags["dqn"]}),
        tabular=TabularConfig(**{**tables["tabular"], **flags["tabular"]}),
        llm=_llm(tables, flags, protocol) if has_llm else None,
    )
    if launch.only:
        raise ConfigError(f"--only picks groups of a job scenario (such as iclr2025/jobs); {launch.scenario!r} has none")
    runs = tuple(RunConfig(destination_folder=p, agents=agents, **run_values) for p in populations)
    for cfg in runs:
        _check_episodes(cfg)
    return Job(runs, launch, sweep)


def _check_episodes(cfg: RunConfig) -> None:
    """The paper's pair protocol plays batch_size games per episode and updates once per episode."""
    llm = cfg.agents.llm if cfg.agents is not None else None
    if cfg.protocol == "pair" and llm is not None and cfg.episode_length and cfg.episode_length != llm.ppo.batch_size:
        raise ConfigError(f"the pair protocol plays one PPO batch per episode: episode_length ({cfg.episode_length}) "
                          f"must equal the PPO batch size ({llm.ppo.batch_size}); set both, e.g. --episode_length "
                          f"{llm.ppo.batch_size}")


def _job_groups(scenario: Scenario, launch: Launch, tables: dict[str, dict[str, Any]],
                flags: dict[str, dict[str, Any]], run_values: dict[str, Any]) -> Job:
    """A job scenario: one RunConfig per selected [[job]] group, each its own dataset under <output>/<scenario>/."""
    groups = select(parse_groups(f"scenario {scenario.path}", scenario.tables["job"]), launch.only)
    for g in groups:
        if g.needs:
            log.warning("skipping job group %r: it needs %s", g.name, g.needs)
    groups = tuple(g for g in groups if not g.needs and not _lacks_bitsandbytes(g, flags))
    if not groups:
        raise ConfigError("none of the selected job groups can run here (each needs a setting not built yet)")
    root = _join(run_values.get("output", RunConfig.output), scenario.name.replace("/", "_"))
    runs = []
    for g in groups:
        values = dict(run_values)
        seeds = g.seeds[: flags["run"]["num_runs"]] if "num_runs" in flags["run"] else g.seeds
        values.update(output=_join(root, g.slug), run_ids=seeds, num_runs=len(seeds), protocol="pair",
                      episode_length=g.batch_size, reward_schedule=g.reward_schedule)
        values["num_iterations"] = flags["run"].get("num_iterations", g.num_iterations)
        if g.r_illegal is not None and "r_illegal" not in flags["run"]:
            values["r_illegal"] = g.r_illegal
        values.setdefault("checkpoint_every", LLM_CHECKPOINT_EVERY)
        ppo = {"batch_size": g.batch_size, **tables["ppo"], **g.ppo}
        llm = _llm({**tables, "ppo": ppo, "llm": {**tables["llm"], **g.llm}}, flags, "pair")
        runs.append(RunConfig(destination_folder=g.population, agents=AgentConfigs(llm=llm), **values))
    return Job(tuple(runs), launch, None, groups, root)


def _lacks_bitsandbytes(g: JobGroup, flags: dict[str, dict[str, Any]]) -> bool:
    """A group whose own [llm] asks for a 4-bit base (the QLoRA group) where bitsandbytes is not installed: it is
    skipped with a warning, so the other groups still run (a --llm_quantize flag for every group fails them all)."""
    if g.llm.get("quantize", "none") == "none" or "quantize" in flags["llm"]:
        return False
    if importlib.util.find_spec("bitsandbytes") is not None:
        return False
    log.warning("skipping job group %r: quantize = %s needs bitsandbytes (pip install 'moralsim[nf4]')", g.name,
                g.llm["quantize"])
    return True


def _join(base: Path | str, *parts: str) -> Path | str:
    if is_uri(base):
        text, _, query = str(base).partition("?")
        return "/".join([text.rstrip("/"), *parts]) + (f"?{query}" if query else "")
    return Path(base).joinpath(*parts)


def _tables(scenario: Scenario | None) -> dict[str, dict[str, Any]]:
    """The scenario file's tables, every key checked against its dataclass (did-you-mean on a typo)."""
    doc: dict[str, Any] = dict(scenario.tables) if scenario else {}
    where = f"scenario {scenario.path}" if scenario else ""
    llm = dict(doc.get("llm", {}))
    out = {"run": dict(doc.get("run", {})), "llm": llm, "llm.actors": dict(llm.pop("actors", {}) or {}),
           "llm.virtue": dict(llm.pop("virtue", {}) or {}), "ppo": dict(doc.get("ppo", {})),
           "dqn": dict(doc.get("dqn", {})), "tabular": dict(doc.get("tabular", {}))}
    for table in TABLES:
        if table.flags_only:
            continue
        values = out[table.key]
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{table.key}] must be a table of {[f.name for f in table.options()]}")
        extra = ("destination_folder", "reward_schedule") if table is RUN else ()
        check_keys(where, table, values, nested=extra)
    return out


def _llm(tables: dict[str, dict[str, Any]], flags: dict[str, dict[str, Any]], protocol: str) -> LLMAgentConfig:
    ppo = {**tables["ppo"], **flags["ppo"]}
    batch = ppo.get("batch_size", PPOConfig.batch_size)
    ppo["mini_batch_size"] = min(ppo.get("mini_batch_size", batch), batch)  # default: one mini-batch per update
    llm = {**tables["llm"], **flags["llm"]}
    if protocol == "pair":  # two agents: the only partner is the other one, nothing to select
        llm["selection"] = "random"
    virtue = {**tables["llm.virtue"], **flags["llm.virtue"]}
    return LLMAgentConfig(**llm, ppo=PPOConfig(**ppo), actors=LLMActors(**{**tables["llm.actors"], **flags["llm.actors"]}),
                          virtue=VirtueConfig(**virtue) if virtue else None)


def with_agents(cfg: RunConfig, **agents: Any) -> RunConfig:
    """cfg with some learner settings replaced (tests, benchmarks): with_agents(cfg, llm=LLMAgentConfig(...))."""
    return replace(cfg, agents=replace(cfg.agents or AgentConfigs(), **agents))
