"""Every exception moralsim raises on bad input. Messages say what was expected, what came, and what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def _osa_distance(a: str, b: str) -> int:
    """Edit distance counting a swap of two neighbours as one edit ("IDP" -> "IPD" is 1)."""
    d = [[max(i, j) if min(i, j) == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name a typo most likely meant: same letters ignoring case first, then fewest edits."""
    valid = list(valid)
    same = [v for v in valid if v.lower() == name.lower()]
    if same:
        return same[0]
    scored = sorted(valid, key=lambda v: (_osa_distance(name.lower(), v.lower()), -difflib.SequenceMatcher(None, name, v).ratio()))
    if scored and _osa_distance(name.lower(), scored[0].lower()) <= max(1, len(name) // 2):
        return scored[0]
    return None


class MoralsimError(Exception):
    """Base class: catch this to handle any moralsim input or data error."""


class UnknownNameError(MoralsimError, KeyError):
    """A name (type code, game id, strategy, scenario) that is not in its registry."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        self.suggestion = closest(name, self.valid)
        hint = f" Did you mean {self.suggestion!r}?" if self.suggestion else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class PopulationSpecError(MoralsimError, ValueError):
    """A population string such as '1xUT_1xaUT_1xDE' that cannot be parsed."""


class GameSpecError(MoralsimError, ValueError):
    """A payoff matrix that is not a valid 2x2 two-player game."""


class ConfigError(MoralsimError, ValueError):
    """A run configuration value out of its allowed range."""


def check_positive(owner: str, config: object, names: Iterable[str]) -> None:
    """ConfigError `<owner>.<name> must be > 0` for the first of config's fields (in names) that is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"{owner}.{name} must be > 0, got {value!r}")


def check_unit(owner: str, config: object, names: Iterable[str]) -> None:
    """ConfigError `<owner>.<name> must be in [0, 1]` for the first of config's fields (in names) outside [0, 1]."""
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{owner}.{name} must be in [0, 1], got {value!r}")


class ClusterError(MoralsimError, ConnectionError):
    """A Ray cluster that cannot be reached or joined (simulator/cluster.py)."""


class CorruptDataError(MoralsimError, OSError):
    """A Parquet part or manifest that cannot be read."""


class ModelUnavailableError(MoralsimError, OSError):
    """A model that cannot be found locally or fetched (offline, no pip, package gone)."""


class IllegalAnswerError(MoralsimError, ValueError):
    """An LLM answer that is not one of the legal action tokens (callers usually map it to R_illegal)."""


class StaleAdapterError(MoralsimError, RuntimeError):
    """An engine served an adapter version older than the learner's latest."""


class WorkerLostError(MoralsimError, RuntimeError):
    """A process that held part of a batch's state died (a learner actor). The batch continues from its last
    checkpoint once the process is back (simulator/driver.py); without a checkpoint the batch fails."""


class DatasetLockedError(MoralsimError, RuntimeError):
    """A dataset that another live driver is writing (simulator/lock.py)."""


class LockLostError(MoralsimError, RuntimeError):
    """This driver's dataset lock was taken over by another driver (its lease had run out): it must stop writing."""
