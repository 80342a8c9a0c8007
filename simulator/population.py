"""Population strings: `8xS_1xUT_1xaUT_1xDE` (count x type code, joined by underscores).

Grammar (one entry per underscore-separated token):
    entry   := count "x" code [ "@" learner ]
    count   := positive integer, no sign, no leading zero
    code    := a moral type (simulator.rewards.MORAL_TYPES) or a static strategy (STATIC_CODES)
    learner := one of LEARNER_KINDS; overrides --method/--learner for this entry (moral types only)
Example of a mixed population: `2xUT@llm_1xDE@dqn_1xTFT`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from simulator.errors import PopulationSpecError, UnknownNameError
from simulator.rewards import MORAL_TYPES

STATIC_CODES: tuple[str, ...] = ("AC", "AD", "TFT", "Random", "CD", "GEa", "GEb", "GEc", "GEd", "GEe")
LEARNER_KINDS: tuple[str, ...] = ("dqn", "tabularQ", "llm")
# a fresh episode's state in the pair protocol: these strategies' "last move" is fixed, everyone else's is random
# (LLM_morality fine_tune.py, generate_initial_state)
FIXED_LAST_MOVE: dict[str, int] = {"AC": 0, "AD": 1}
MAX_AGENTS = 1 << 16

_ENTRY = re.compile(r"^(?P<count>[1-9][0-9]*)x(?P<code>[A-Za-z][A-Za-z0-9+]*)(?:@(?P<learner>[A-Za-z]+))?$")


def valid_codes() -> tuple[str, ...]:
    return (*MORAL_TYPES, *STATIC_CODES)


@dataclass(frozen=True)
class AgentSpec:
    code: str  # moral type or static strategy
    learner: str | None  # None: static strategy, or the run's default learner for a moral type

    @property
    def is_static(self) -> bool:
        return self.code in STATIC_CODES


@dataclass(frozen=True)
class Population:
    text: str
    agents: tuple[AgentSpec, ...]  # one per slot, in the order of the string

    @property
    def size(self) -> int:
        return len(self.agents)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(a.code for a in self.agents)

    @property
    def moral_codes(self) -> tuple[str | None, ...]:
        """Each slot's moral type, None for static strategies (they have no moral reward)."""
        return tuple(None if a.is_static else a.code for a in self.agents)

    def resolved(self, default_learner: str) -> Population:
        """Every moral-type slot gets a learner kind: its own `@kind`, else the default."""
        if default_learner not in LEARNER_KINDS:
            raise UnknownNameError("learner", default_learner, LEARNER_KINDS)
        agents = tuple(
            a if a.is_static or a.learner else AgentSpec(a.code, default_learner) for a in self.agents
        )
        return Population(self.text, agents)


def parse_population(text: str) -> Population:
    """Parse and validate a population string; raise PopulationSpecError naming the valid codes."""
    if not isinstance(text, str) or not text.strip():
        raise PopulationSpecError(
            f"empty population string; expected entries like '1xUT_1xaUT_1xDE'. Valid codes: {', '.join(valid_codes())}"
        )
    agents: list[AgentSpec] = []
    for token in text.strip().split("_"):
        m = _ENTRY.match(token)
        if m is None:
            hint = ""
            if re.match(r"^0+x", token):
                hint = " (a count must be at least 1)"
            elif re.match(r"^[0-9]+[A-Za-z]", token):
                fixed = re.sub(r"^([0-9]+)", r"\1x", token)
                hint = f" (missing 'x': did you mean '{fixed}'?)"
            raise PopulationSpecError(
                f"bad population entry {token!r} in {text!r}{hint}; expected <count>x<code>[@<learner>], "
                f"e.g. '3xUT'. Valid codes: {', '.join(valid_codes())}"
            )
        code, learner = m["code"], m["learner"]
        if code not in valid_codes():
            err = UnknownNameError("agent type code", code, valid_codes())
            raise PopulationSpecError(f"in population {text!r}: {err}") from None
        if learner is not None:
            if code in STATIC_CODES:
                raise PopulationSpecError(
                    f"entry {token!r}: {code} is a static strategy and takes no '@{learner}'; "
                    f"learner kinds apply to moral types only"
                )
            if learner not in LEARNER_KINDS:
                err = UnknownNameError("learner", learner, LEARNER_KINDS)
                raise PopulationSpecError(f"entry {token!r}: {err}") from None
        agents.extend([AgentSpec(code, learner)] * int(m["count"]))
        if len(agents) > MAX_AGENTS:
            raise PopulationSpecError(f"population {text!r} has more than {MAX_AGENTS} agents")
    if len(agents) < 2:
        raise PopulationSpecError(f"population {text!r} has {len(agents)} agent; a dilemma needs at least 2")
    return Population(text.strip(), tuple(agents))
