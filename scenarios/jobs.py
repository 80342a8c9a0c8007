"""A job file as data: `[[job]]` groups of a scenario file, each a reward x opponent with its seeds, expanded into one
RunConfig per group (`python main.py --scenario iclr2025/jobs`, `--only "<group>"` for a subset).

    [[job]]                                   ->  RunConfig(destination_folder = population,
    name = "Game then De vs TFT"                            output = <output>/<jobs>/game_then_de_vs_tft,
    population = "1xGame@llm_1xTFT"                         run_ids = seeds, protocol = "pair",
    seeds = [1, 2, 3, 4, 5, 6]                              num_iterations = episodes x batch_size,
    episodes = 1000                                         episode_length = batch_size,
    batch_size = 5            (default 5)                   reward_schedule = ...,
    reward_schedule = [["Game", 0.5, "De"]]                 agents.llm.ppo = [ppo] + ppo + batch_size)
    ppo = { lora_r = 4 }      (optional)                      r_illegal = the group's, else [run]'s,
    llm = { quantize = "nf4" } (optional)                    agents.llm = [llm] + llm
    r_illegal = 100           (optional)
    needs = "..."             (optional: a setting not built yet; the group is listed and skipped)

Every group is its own dataset, so groups that share a population (Game vs TFT, Game then De vs TFT) never share a
folder, and each resumes on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulator.errors import ConfigError, UnknownNameError

GROUP_KEYS = ("name", "population", "seeds", "episodes", "batch_size", "reward_schedule", "ppo", "llm", "r_illegal",
              "needs")


@dataclass(frozen=True)
class JobGroup:
    """One reward x opponent of a job file, with its seeds."""

    name: str
    population: str
    seeds: tuple[int, ...]
    episodes: int  # PPO updates per run (the paper's num_episodes; both phases of a schedule together)
    batch_size: int = 5  # games per episode = samples per PPO update (5 against a static opponent, 3 for two learners)
    reward_schedule: tuple[tuple[str, float, str], ...] = ()
    ppo: Mapping[str, Any] = field(default_factory=dict)  # [ppo] overrides of this group
    llm: Mapping[str, Any] = field(default_factory=dict)  # [llm] overrides of this group (e.g. quantize)
    r_illegal: float | None = None  # the illegal-answer penalty's magnitude; None = the [run] table's
    needs: str = ""  # a setting this repository does not have yet: the group is skipped

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower().replace("+", " plus ")).strip("_")

    @property
    def num_iterations(self) -> int:
        return self.episodes * self.batch_size


def parse_groups(where: str, entries: object) -> tuple[JobGroup, ...]:
    """The `[[job]]` entries of a scenario file, checked: ConfigError naming the entry and the valid keys."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: [[job]] must be a non-empty array of tables")
    groups: list[JobGroup] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: [[job]] entry {i} must be a table")
        unknown = sorted(set(entry) - set(GROUP_KEYS))
        missing = [k for k in ("name", "population", "seeds", "episodes") if k not in entry]
        if unknown or missing:
            raise ConfigError(f"{where}: [[job]] entry {entry.get('name', i)!r} has unknown keys {unknown} or lacks "
                              f"{missing}; valid keys: {', '.join(GROUP_KEYS)}")
        seeds = entry["seeds"]
        if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
                and len(set(seeds)) == len(seeds)):
            raise ConfigError(f"{where}: [[job]] {entry['name']!r}: seeds must be distinct integers >= 0, got {seeds!r}")
        groups.append(JobGroup(
            name=str(entry["name"]), population=str(entry["population"]), seeds=tuple(seeds),
            episodes=int(entry["episodes"]), batch_size=int(entry.get("batch_size", 5)),
            reward_schedule=tuple(tuple(e) for e in entry.get("reward_schedule", ())),
            ppo=dict(entry.get("ppo", {})), llm=dict(entry.get("llm", {})),
            r_illegal=None if entry.get("r_illegal") is None else float(entry["r_illegal"]),
            needs=str(entry.get("needs", "")),
        ))
    names = [g.name for g in groups]
    repeated = sorted({n for n in names if names.count(n) > 1})
    slugs = [g.slug for g in groups]
    if repeated or len(set(slugs)) != len(slugs):
        raise ConfigError(f"{where}: [[job]] names must be distinct (as folder names too): {repeated or slugs}")
    return tuple(groups)


def select(groups: Sequence[JobGroup], only: Sequence[str]) -> tuple[JobGroup, ...]:
    """The groups named by --only (all if none), in file order; an unknown name gets the closest valid one."""
    if not only:
        return tuple(groups)
    names = {g.name: g for g in groups}
    wanted = [n.strip() for n in only if n.strip()]  # names may hold commas ("De, two learners"): no splitting
    for name in wanted:
        if name not in names:
            raise UnknownNameError("job group", name, names)
    return tuple(g for g in groups if g.name in wanted)
