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
from typing import NoReturn

from simulator.errors import ConfigError, PopulationSpecError, UnknownNameError, closest
from simulator.rewards import MORAL_TYPES, REASON_TYPES

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

    def __post_init__(self) -> None:
        check_reason_learners(self.text, self.agents)  # the one place the virtue reason rule is checked

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


def check_reason_learners(text: str, agents: tuple[AgentSpec, ...]) -> None:
    """A type that scores a stated reason (VR, Game+VR) needs an LLM learner: ConfigError naming why and the fix."""
    bad = sorted({f"{a.code}@{a.learner}" for a in agents
                  if a.code in REASON_TYPES and a.learner is not None and a.learner != "llm"})
    if bad:
        raise ConfigError(
            f"population {text!r}: {', '.join(bad)} cannot learn its reward: {'/'.join(sorted(REASON_TYPES))} score "
            f"the one-sentence reason an LLM agent states for its move (the learned virtue reward models), and only "
            f"LLM agents state reasons; write the entry as <count>x<code>@llm, or use --learner llm"
        )


def parse_population(text: str) -> Population:
    """Parse and validate a population string; raise PopulationSpecError naming the valid codes.

    A malformed string gets a suggestion only when one is likely right: the repaired string parses, or at least the
    repaired entry does ('1x S' -> '1xS', '1xS__1xUT' -> '1xS_1xUT', 'x2S' -> '2xS', '3S' -> '3xS').
    """
    return _parse(text, suggest=True)


_GRAMMAR = "expected <count>x<code>[@<learner>] joined by '_', e.g. '3xUT' or '1xUT_1xaUT_1xDE'"


def _codes_hint() -> str:
    return f"Valid codes: {', '.join(valid_codes())}"


def _parse(text: str, suggest: bool) -> Population:
    def fail(problem: str, token: str | None = None) -> NoReturn:
        hint = _suggestion(text, token) if suggest and "did you mean" not in problem else ""
        raise PopulationSpecError(f"{problem}{hint}; {_GRAMMAR}. {_codes_hint()}")

    if not isinstance(text, str) or not text.strip():
        raise PopulationSpecError(f"empty population string; {_GRAMMAR}. {_codes_hint()}")
    if re.search(r"\s", text):
        token = next((t for t in text.split("_") if re.search(r"\s", t)), text)
        fail(f"population {text!r} contains whitespace (it is also the dataset's folder name, so it is written "
             f"without spaces)", token)
    agents: list[AgentSpec] = []
    for token in text.split("_"):
        if not token:
            fail(f"bad population entry '' in {text!r} (an empty entry: a doubled, leading or trailing '_')")
        m = _ENTRY.match(token)
        if m is None:
            fail(f"bad population entry {token!r} in {text!r}{_entry_problem(token)}", token)
        code, learner = m["code"], m["learner"]
        if code not in valid_codes():
            err = UnknownNameError("agent type code", code, valid_codes())
            raise PopulationSpecError(f"in population {text!r}: {err}") from None
        if learner is not None:
            if code in STATIC_CODES:
                raise PopulationSpecError(
                    f"entry {token!r}: {code} is a static strategy and takes no '@{learner}'; "
                    f"learner kinds apply to moral types only; did you mean {m['count'] + 'x' + code!r}?"
                )
            if learner not in LEARNER_KINDS:
                err = UnknownNameError("learner", learner, LEARNER_KINDS)
                raise PopulationSpecError(f"entry {token!r}: {err}") from None
        # the count is checked before anything is allocated: '99999999999xS' must not build a list of 1e11 agents
        if len(m["count"]) > len(str(MAX_AGENTS)) or len(agents) + int(m["count"]) > MAX_AGENTS:
            raise PopulationSpecError(
                f"population {_short(text)!r} asks for {_count_text(m['count'])} agents in entry {_short(token)!r}; at most "
                f"{MAX_AGENTS} agents are supported in all (each agent's partner-selection state and network grow "
                f"with the population size, so memory grows with its square)"
            )
        agents.extend([AgentSpec(code, learner)] * int(m["count"]))
    if len(agents) < 2:
        raise PopulationSpecError(
            f"population {text!r} has {len(agents)} agent; a dilemma needs at least 2, e.g. "
            f"'{text}_1x{'TFT' if agents and agents[0].code != 'TFT' else 'AC'}'"
        )
    return Population(text, tuple(agents))


def _count_text(count: str) -> str:
    return count if len(count) <= 30 else f"a {len(count)}-digit number of"


def _short(text: str, keep: int = 60) -> str:
    return text if len(text) <= keep else f"{text[: keep - 20]}...{text[-15:]}"


def _entry_problem(token: str) -> str:
    """Why a token does not match the entry grammar, when there is a specific reason."""
    if re.match(r"^0+[xX]", token):
        return " (a count must be at least 1)"
    if re.match(r"^0[0-9]", token):
        return " (a count has no leading zero)"
    if re.match(r"^[xX*][0-9]", token):
        return " (the count comes before the 'x')"
    if re.match(r"^[0-9]+[A-Za-z]", token) and not re.match(r"^[0-9]+[xX]", token):
        fixed = _repair_token(token)
        return f" (missing 'x': did you mean {fixed!r}?)" if _ENTRY.match(fixed) else " (missing 'x' after the count)"
    if re.match(r"^[0-9]+X", token):
        return " (the separator is a lower-case 'x')"
    if re.match(r"^[A-Za-z]", token):
        return " (an entry starts with its count)"
    return ""


def _repair_token(token: str) -> str:
    """The entry a malformed token most likely meant (it may still be invalid): spaces dropped, '2S', '2XS', '2*S',
    'x2S', 'S2' -> '2xS', a bare code -> '1x<code>', a leading zero dropped, code and learner matched to the
    closest valid names ('s' -> 'S', 'DQN' -> 'dqn')."""
    t = re.sub(r"\s+", "", token)
    learner = None
    if "@" in t:
        t, _, learner = t.partition("@")
    m = (re.fullmatch(r"[xX*](?P<count>[0-9]+)(?P<code>[A-Za-z][A-Za-z+]*)", t)  # x2S
         or re.fullmatch(r"(?P<count>[0-9]*)(?:[xX*](?=[A-Za-z]))?(?P<code>(?![xX])[A-Za-z][A-Za-z+]*)", t)  # 2S, S
         or re.fullmatch(r"(?P<code>(?![xX])[A-Za-z][A-Za-z+]*?)[xX*]?(?P<count>[0-9]+)", t))  # S2, Sx2
    if m is None:
        return token
    count = m["count"].lstrip("0") if m["count"] else "1"
    if not count:  # '0xS': a count of zero is not a typo worth guessing
        return token
    code = m["code"] if m["code"] in valid_codes() else (closest(m["code"], valid_codes()) or m["code"])
    if learner is not None and learner not in LEARNER_KINDS:
        learner = closest(learner, LEARNER_KINDS) or learner
    return f"{count}x{code}" + (f"@{learner}" if learner is not None else "")


def _parses(text: str) -> str | None:
    """None when text parses, else its error message."""
    try:
        _parse(text, suggest=False)
    except PopulationSpecError as e:
        return str(e)
    return None


def _suggestion(text: str, token: str | None) -> str:
    """'; did you mean ...?' when a repaired string parses or at least the repaired entry does, else ''."""
    compact = re.sub(r"\s+", "", text)
    candidates = ["_".join(_repair_token(t) for t in re.split(r"_+", compact.strip("_")) if t),  # '1x S', '1xS__1xUT'
                  "_".join(_repair_token(t) for t in re.split(r"[\s_,;/-]+", text.strip(" _,;/-")) if t)]  # '1xS 1xUT'
    for cand in dict.fromkeys(candidates):
        if cand and cand != text and _parses(cand) is None:
            return f"; did you mean {cand!r}?"
    if token is None:
        return ""
    fixed = _repair_token(token)
    if fixed == token or _ENTRY.match(fixed) is None or fixed.split("x", 1)[1].split("@")[0] not in valid_codes():
        return ""
    whole = text.replace(token, fixed, 1)
    still = _parses(whole)
    note = f" ({whole!r} would still be refused: {still.split('; expected')[0]})" if still else ""
    return f"; did you mean {fixed!r}?{note}"
