"""Every exception moralsim raises on bad input. Messages say what was expected, what came, and what is valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoralsimError(Exception):
    """Base class: catch this to handle any moralsim input or data error."""


class UnknownNameError(MoralsimError, KeyError):
    """A name (type code, game id, strategy, scenario) that is not in its registry."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        close = difflib.get_close_matches(name, self.valid, n=1, cutoff=0.4)
        if not close:  # case-only typos such as "ut" for "UT"
            close = [v for v in self.valid if v.lower() == name.lower()][:1]
        self.suggestion = close[0] if close else None
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


class CorruptDataError(MoralsimError, OSError):
    """A Parquet part or manifest that cannot be read."""


class IllegalAnswerError(MoralsimError, ValueError):
    """An LLM answer that is not one of the legal action tokens (callers usually map it to R_illegal)."""


class StaleAdapterError(MoralsimError, RuntimeError):
    """An engine served an adapter version older than the learner's latest."""
