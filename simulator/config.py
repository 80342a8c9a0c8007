"""Run configuration: frozen dataclasses composed into one RunConfig. The CLI and scenario files fill it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError
from simulator.games import Game
from simulator.population import FIXED_LAST_MOVE, Population, parse_population
from simulator.rewards import DEFAULT_R_ILLEGAL, check_compat, check_r_illegal, get_moral_type
from simulator.seeding import check_seed
from simulator.storage import is_uri
from simulator.tracking import check_tracker


@dataclass(frozen=True)
class RunConfig:
    """One population's runs, resolved once (scenarios/run.py builds it from the command line and the scenario file):
    the parsed population, game, seed, matching, protocol and the typed learner settings. Everything downstream
    receives it, or the part it needs; `identity()` is its serialisation in the manifest, which resume compares."""

    destination_folder: str
    """population as <count>x<code> joined by '_' (e.g. 1xUT_1xaUT_1xDE), also the dataset's folder name"""
    num_iterations: int = 30000
    """iterations (the anchor's episodes) per run"""
    num_runs: int = 20
    """independent seeded runs"""
    seed: int = 0
    """root seed; run k uses SeedSequence(seed, spawn_key=(k,))"""
    game: Game = field(default_factory=lambda: _default_game())
    """the dilemma every pair plays (a game id, or a .toml/.json file with id, CC, CD, DC, DD)"""
    method: str = "dqn"
    """learner for the moral types without an @kind: dqn, tabularQ or llm"""
    compat: str = "none"
    """none, or aies2024: reproduce the anchor's reward defects (DE/mDE as the selected player, VM beta)"""
    random_matching: bool = False
    """partners are assigned uniformly at random instead of learned selection"""
    output: Path | str = Path("results")
    """root of the datasets: a folder (on a cluster, one every node mounts) or a pyarrow filesystem URI (s3://...)"""
    flush_rows: int = 1 << 18
    """rows per run buffered before a Parquet part is written"""
    log_to: str = "none"
    """stream reward, cooperation, KL and losses while the run runs: none, tensorboard or wandb (offline)"""
    checkpoint_every: int = 0
    """iterations between checkpoints of a batch's whole state; a re-run continues from the last one (0 = none:
    classic runs resume run by run; the command line's default is 25 for runs with LLM agents)"""
    agents: Any = None
    """the learners' typed settings (scenarios.run.AgentConfigs: dqn, tabular, llm); None = every default"""
    reward_schedule: tuple[tuple[str, float, str], ...] = ()
    """phased rewards: (type code, fraction of the iterations after which it switches, new code), e.g.
    ("Game", 0.5, "De") = the ICLR "Game, then De" schedule"""
    protocol: str = "population"
    """population (AIES: every agent selects, N games an iteration) or pair (ICLR fine-tuning: two agents, one
    game an iteration, slot 0 the row player); see simulator/engine.py"""
    episode_length: int = 0
    """pair protocol: games per episode (the paper: the PPO batch size), after which the state is drawn afresh;
    0 = one episode"""
    run_ids: tuple[int, ...] = ()
    """explicit run indices (a job file's seeds, e.g. 1, 2, 3, 5, 6); () = 0 .. num_runs - 1"""
    r_illegal: float = DEFAULT_R_ILLEGAL
    """an LLM answer that is not a legal action token learns -r_illegal (the paper's --r_illegal: 6; the job file's
    extra groups 100 and 15)"""
    population: Population = field(init=False, repr=False, compare=False)
    """the parsed population, each moral-type slot with its learner kind (parsed once, in __post_init__)"""

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise ConfigError(f"--num_iterations must be at least 1, got {self.num_iterations}")
        if self.num_runs < 1:
            raise ConfigError(f"--num_runs must be at least 1, got {self.num_runs}")
        if self.flush_rows < 1:
            raise ConfigError(f"flush_rows must be at least 1, got {self.flush_rows}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (0 = no checkpoints), got {self.checkpoint_every}")
        if self.run_ids:
            ids = tuple(int(k) for k in self.run_ids)
            if len(set(ids)) != len(ids) or min(ids) < 0 or len(ids) != self.num_runs:
                raise ConfigError(f"run_ids must be {self.num_runs} distinct indices >= 0, got {list(self.run_ids)}")
            object.__setattr__(self, "run_ids", ids)
        check_seed(self.seed)
        check_compat(self.compat)
        object.__setattr__(self, "r_illegal", check_r_illegal(self.r_illegal))
        check_tracker(self.log_to)
        # parsed once; resolving validates the learner kinds (and that reason types have LLM learners)
        object.__setattr__(self, "population", parse_population(self.destination_folder).resolved(self.method))
        pop = self.population
        if self.protocol not in ("population", "pair"):
            raise ConfigError(f"unknown protocol {self.protocol!r}; valid: population, pair")
        if self.protocol == "pair" and pop.size != 2:
            raise ConfigError(f"the pair protocol plays two agents; {self.destination_folder!r} has {pop.size}")
        if self.episode_length < 0 or (self.episode_length and self.protocol != "pair"):
            raise ConfigError(f"episode_length ({self.episode_length}) needs protocol = 'pair' and must be >= 0")
        for entry in self.reward_schedule:
            if len(entry) != 3 or not 0 < float(entry[1]) < 1:
                raise ConfigError(f"a reward_schedule entry is (code, fraction in (0, 1), new code), got {entry!r}")
            get_moral_type(entry[0])
            get_moral_type(entry[2])

    @property
    def run_indices(self) -> tuple[int, ...]:
        """The runs of this dataset: run_ids, or 0 .. num_runs - 1."""
        return self.run_ids or tuple(range(self.num_runs))

    @property
    def learns_selection(self) -> bool:
        """Whether learners choose their partners: not under random matching, and not in the pair protocol (two
        agents: the only partner is the other one)."""
        return not (self.random_matching or self.protocol == "pair")

    def reward_phases(self) -> list[tuple[int, list[str | None]]]:
        """The reward_schedule as (first iteration, moral type per slot) switches for the engine."""
        codes = list(self.population.moral_codes)
        phases = []
        for code, fraction, new in sorted(self.reward_schedule, key=lambda e: e[1]):
            codes = [new if c == code else c for c in codes]
            phases.append((round(fraction * self.num_iterations), list(codes)))
        return phases

    def episode_moves(self) -> list[int]:
        """Each slot's move in a fresh episode state: fixed for AC/AD, -1 (random) for everyone else."""
        return [FIXED_LAST_MOVE.get(code, -1) for code in self.population.codes]

    @property
    def games_per_iteration(self) -> int:
        return self.population.size if self.protocol == "population" else 1

    @property
    def dataset_dir(self) -> Path:
        """The dataset's local folder (an --output URI has none: see dataset_location)."""
        if is_uri(self.output):
            raise ConfigError(f"the dataset is at {self.dataset_location}, not in a local folder")
        return Path(self.output) / self.destination_folder

    @property
    def dataset_location(self) -> str:
        """Where the dataset is, as the user would write it: a local path or <output URI>/<folder>."""
        if is_uri(self.output):
            base, _, query = str(self.output).partition("?")
            return f"{base.rstrip('/')}/{self.destination_folder}" + (f"?{query}" if query else "")
        return str(Path(self.output) / self.destination_folder)

    def identity(self) -> dict[str, Any]:
        """What must match for a resumed run to continue an existing dataset (everything but how and where it is
        written): the manifest's "config". Learner settings are under "agent_options" (see scenarios.run)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IDENTITY}
        d["game"] = {"id": self.game.id, "cells": [list(c) for c in self.game.cells]}
        d["reward_schedule"] = [list(e) for e in self.reward_schedule]
        d["agent_options"] = self.agents.identity(self.population) if self.agents is not None else {}
        for k, default in (("protocol", "population"), ("episode_length", 0), ("r_illegal", DEFAULT_R_ILLEGAL)):
            if d[k] == default:  # datasets written before these options existed still resume
                d.pop(k)
        return d


# where and how results are written, not what they are; and the parsed forms of other fields
_NOT_IDENTITY = ("num_runs", "run_ids", "output", "flush_rows", "log_to", "checkpoint_every", "agents", "population")


def _default_game() -> Game:
    from simulator.games import GAMES

    return GAMES["IPD"]
