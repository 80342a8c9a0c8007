"""Run configuration: frozen dataclasses composed into one RunConfig. The CLI and scenario files fill it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import ConfigError
from simulator.games import Game
from simulator.population import FIXED_LAST_MOVE, Population, parse_population
from simulator.rewards import check_compat, get_moral_type
from simulator.seeding import check_seed
from simulator.storage import is_uri
from simulator.tracking import check_tracker


@dataclass(frozen=True)
class RunConfig:
    destination_folder: str  # the population string, also the dataset folder name
    num_iterations: int = 30000
    num_runs: int = 20
    seed: int = 0
    game: Game = field(default_factory=lambda: _default_game())
    method: str = "dqn"  # default learner kind for moral types: dqn | tabularQ | llm
    compat: str = "none"  # "aies2024" reproduces the anchor's reward defects
    random_matching: bool = False
    output: Path | str = Path("results")  # a local folder, or a pyarrow filesystem URI (simulator/storage.py)
    flush_rows: int = 1 << 18  # rows per run buffered before a part file is written
    log_to: str = "none"  # live metrics: none | tensorboard | wandb (offline); see simulator/tracking.py
    checkpoint_every: int = 0  # iterations between checkpoints of a batch's whole state (0 = none); see driver.py
    agent_options: dict[str, Any] = field(default_factory=dict)  # learner settings, recorded in the manifest
    # phased rewards: (type code, fraction of the iterations after which it switches, new code),
    # e.g. ("Game", 0.5, "De") = the ICLR "Game, then De" schedule
    reward_schedule: tuple[tuple[str, float, str], ...] = ()
    protocol: str = "population"
    """population (AIES: every agent selects, N games an iteration) or pair (ICLR fine-tuning: two agents, one
    game an iteration, slot 0 the row player); see simulator/engine.py"""
    episode_length: int = 0
    """pair protocol: iterations per episode (the paper's batch_size games, one PPO update); env_state is drawn
    afresh at each episode start. 0 = one episode."""

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise ConfigError(f"--num_iterations must be at least 1, got {self.num_iterations}")
        if self.num_runs < 1:
            raise ConfigError(f"--num_runs must be at least 1, got {self.num_runs}")
        if self.flush_rows < 1:
            raise ConfigError(f"flush_rows must be at least 1, got {self.flush_rows}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (0 = no checkpoints), got {self.checkpoint_every}")
        check_seed(self.seed)
        check_compat(self.compat)
        check_tracker(self.log_to)
        pop = self.population.resolved(self.method)  # validates the learner kind
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
    def population(self) -> Population:
        return parse_population(self.destination_folder)

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
        """What must match for a resumed run to continue an existing dataset (everything but num_runs)."""
        d = asdict(self)
        d["game"] = {"id": self.game.id, "cells": [list(c) for c in self.game.cells]}
        # where and how results are written, not what they are
        for k in ("num_runs", "output", "flush_rows", "log_to", "checkpoint_every"):
            d.pop(k)
        for k, default in (("protocol", "population"), ("episode_length", 0)):
            if d[k] == default:  # datasets written before these options existed still resume
                d.pop(k)
        return d


def _default_game() -> Game:
    from simulator.games import GAMES

    return GAMES["IPD"]
