"""Moral rewards (DESIGN section 3) as pure, vectorised functions in one registry.

Every function takes numpy arrays of equal shape for player M against opponent O:
    a_m, a_o : actions (0=C, 1=D)
    r_m, r_o : game payoffs of M and O
    s_o      : O's move in M's dilemma state (O's previous move)
and returns M's reward as float64.

Choices recorded here (the anchor code differs, see README "Fixes to the anchor"):
- VEe / Vie use 1 - |R_M - R_O| / (|R_M| + |R_O|). For the non-negative payoffs of every game in
  DESIGN section 2 this is the stated formula; it stays defined when R_M + R_O = 0. When both payoffs are 0
  the outcome is perfectly equal, so VEe = 1 and Vie = 0 (the anchor divides by zero there).
- VM uses the stated beta = 0.5. `compat="aies2024"` reproduces the anchor's int(0.5) == 0, i.e. VM = [a_M = C].
- DE/mDE judge O's previous move; the engine passes the right state for both roles unless compat="aies2024"
  (see simulator/engine.py).
- VR and Game+VR (`reason=True`, family "virtue") score the agent's stated one-sentence reason with the learned
  virtue ensemble (actors/llm/virtue/dilemma.py). This registry stays free of torch: its function gives only the
  payoff part (0 for VR, R_M for Game+VR); the LLM group adds weight * ensemble score per decision
  (Decisions.reward_term), so only LLM agents can have these types (REASON_TYPES; checked by the population and
  the engine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simulator.errors import ConfigError, UnknownNameError

XI = 5.0  # strength of the norm-based rewards (DE, VEk, mDE, Vagg)
VM_BETA = 0.5
ICLR_DE_PENALTY = -3.0  # De in the ICLR fine-tuning rewards
DEFAULT_R_ILLEGAL = 6.0  # the paper's --r_illegal 6 (every job-file run but two extra groups: 100 and 15)
R_ILLEGAL = -DEFAULT_R_ILLEGAL  # an LLM answer that is not a legal action token (RunConfig.r_illegal sets another)
R_OTHER = 0.0  # the paper's r_other under its smallerR payoffs: De's "no violation" and Ut's partner-illegal reward

# Two LLM learners in the pair protocol (LLM_morality fine_tune_2learners.py): the reward of a player that answered
# legally when its partner did not. The paper's reward functions read the partner's raw answer: Ut (reward_fn_Ut)
# pays r_other, Game+De (reward_fn_gameDe) pays r_illegal. Game pays against the partner's last legal move (its
# `action_for_payoff`) and De judges the partner's previous move, which is what the carried-over move gives here,
# so those two types and every AIES type keep their table reward.
PARTNER_ILLEGAL = {"Ut": "r_other", "Game+De": "r_illegal"}

COMPAT_MODES = ("none", "aies2024")

Arr = np.ndarray
ArrayLike = np.ndarray | float | int
RewardFn = Callable[[Arr, Arr, Arr, Arr, Arr], Arr]


def equality(r_m: Arr, r_o: Arr) -> Arr:
    """1 - |R_M - R_O| / (|R_M| + |R_O|), and 1 where both payoffs are 0 (two-player 1 - Gini)."""
    r_m = np.asarray(r_m, dtype=np.float64)
    r_o = np.asarray(r_o, dtype=np.float64)
    denom = np.abs(r_m) + np.abs(r_o)
    safe = np.where(denom == 0, 1.0, denom)
    return np.where(denom == 0, 1.0, 1.0 - np.abs(r_m - r_o) / safe)


def _f(x: Arr) -> Arr:
    return np.asarray(x, dtype=np.float64)


def _is_c(a: Arr) -> Arr:
    return (np.asarray(a) == 0).astype(np.float64)


def _is_d(a: Arr) -> Arr:
    return (np.asarray(a) == 1).astype(np.float64)


def _exploits(a_m: Arr, s_o: Arr) -> Arr:
    return _is_d(a_m) * _is_c(s_o)


def _vm(beta: float) -> RewardFn:
    return lambda a_m, a_o, r_m, r_o, s_o: beta * equality(r_m, r_o) + (1 - beta) * _is_c(a_m)


@dataclass(frozen=True)
class MoralType:
    code: str
    name: str
    formula: str
    fn: RewardFn
    family: str  # "aies" population types, "iclr" LLM fine-tuning rewards, "virtue" the learned virtue ensemble
    reason: bool = False  # the reward also scores the agent's stated reason: fn is only its payoff part (LLM only)


_TYPES = [
    MoralType("S", "Selfish", "R_M", lambda a_m, a_o, r_m, r_o, s_o: _f(r_m), "aies"),
    MoralType("UT", "Utilitarian", "R_M + R_O", lambda a_m, a_o, r_m, r_o, s_o: _f(r_m) + _f(r_o), "aies"),
    MoralType(
        "DE", "Deontological", "-xi if a_M = D and s_O = C",
        lambda a_m, a_o, r_m, r_o, s_o: -XI * _exploits(a_m, s_o), "aies",
    ),
    MoralType("VEe", "Virtue equality", "1 - |R_M - R_O| / (R_M + R_O)",
              lambda a_m, a_o, r_m, r_o, s_o: equality(r_m, r_o), "aies"),
    MoralType("VEk", "Virtue kindness", "xi if a_M = C", lambda a_m, a_o, r_m, r_o, s_o: XI * _is_c(a_m), "aies"),
    MoralType("VM", "Virtue mixed", "beta * VEe + (1 - beta) * [a_M = C], beta = 0.5", _vm(VM_BETA), "aies"),
    MoralType("AL", "Altruist", "R_O", lambda a_m, a_o, r_m, r_o, s_o: _f(r_o), "aies"),
    MoralType("aUT", "anti-Utilitarian", "-(R_M + R_O)",
              lambda a_m, a_o, r_m, r_o, s_o: -(_f(r_m) + _f(r_o)), "aies"),
    MoralType(
        "mDE", "malicious Deontological", "+xi if a_M = D and s_O = C",
        lambda a_m, a_o, r_m, r_o, s_o: XI * _exploits(a_m, s_o), "aies",
    ),
    MoralType("Vie", "Virtue inequality", "|R_M - R_O| / (R_M + R_O)",
              lambda a_m, a_o, r_m, r_o, s_o: 1.0 - equality(r_m, r_o), "aies"),
    MoralType("Vagg", "Virtue aggressiveness", "xi if a_M = D", lambda a_m, a_o, r_m, r_o, s_o: XI * _is_d(a_m), "aies"),
    MoralType("aAL", "anti-Altruist", "-R_O", lambda a_m, a_o, r_m, r_o, s_o: -_f(r_o), "aies"),
    # ICLR 2025 fine-tuning rewards for LLM agents
    MoralType("Game", "Game payoff", "R_M", lambda a_m, a_o, r_m, r_o, s_o: _f(r_m), "iclr"),
    MoralType("De", "Deontological (ICLR)", "-3 if a_M = D and O's previous move = C",
              lambda a_m, a_o, r_m, r_o, s_o: ICLR_DE_PENALTY * _exploits(a_m, s_o), "iclr"),
    MoralType("Ut", "Utilitarian (ICLR)", "R_M + R_O", lambda a_m, a_o, r_m, r_o, s_o: _f(r_m) + _f(r_o), "iclr"),
    MoralType("Game+De", "Game payoff + Deontological", "R_M + De",
              lambda a_m, a_o, r_m, r_o, s_o: _f(r_m) + ICLR_DE_PENALTY * _exploits(a_m, s_o), "iclr"),
    # the learned virtue ensemble (DESIGN section 5) scoring an LLM agent's stated reason; fn is the payoff part,
    # the group adds w * (mean - lam * std over the three reward models)
    MoralType("VR", "Virtue reward models", "w * (mean - lam * std) of the 3 reward models on the stated reason",
              lambda a_m, a_o, r_m, r_o, s_o: np.zeros(np.shape(r_m)), "virtue", reason=True),
    MoralType("Game+VR", "Game payoff + virtue reward models", "R_M + w * VR",
              lambda a_m, a_o, r_m, r_o, s_o: _f(r_m), "virtue", reason=True),
]

MORAL_TYPES: dict[str, MoralType] = {t.code: t for t in _TYPES}
# Types whose reward reads s_O; under compat="aies2024" the engine feeds them the anchor's (wrong) state
# when they are the selected player.
STATE_DEPENDENT = frozenset({"DE", "mDE"})
# Types whose reward scores the agent's stated reason: only an agent group that states reasons (LLM) can play them.
REASON_TYPES = frozenset(t.code for t in _TYPES if t.reason)


def check_r_illegal(r_illegal: float) -> float:
    """R_illegal's magnitude, as the paper's --r_illegal gives it (the reward is -r_illegal): a finite number >= 0."""
    value = float(r_illegal)
    if not np.isfinite(value) or value < 0:
        raise ConfigError(f"r_illegal is the magnitude of the illegal-answer penalty (reward -r_illegal): a finite "
                          f"number >= 0, got {r_illegal!r}")
    return value


def partner_illegal_reward(code: str | None, r_illegal: float = DEFAULT_R_ILLEGAL) -> float:
    """Learning reward of a legal player of type `code` whose partner (an LLM learner of the pair protocol) answered
    illegally, as fine_tune_2learners.py pays it; NaN where the paper pays the table reward (see PARTNER_ILLEGAL)."""
    rule = PARTNER_ILLEGAL.get(code or "")
    if rule is None:
        return float("nan")
    return R_OTHER if rule == "r_other" else -check_r_illegal(r_illegal)


def check_compat(compat: str) -> str:
    if compat not in COMPAT_MODES:
        raise ConfigError(f"unknown compat mode {compat!r}; valid: {', '.join(COMPAT_MODES)}")
    return compat


def get_moral_type(code: str) -> MoralType:
    try:
        return MORAL_TYPES[code]
    except KeyError:
        raise UnknownNameError("moral type", code, MORAL_TYPES) from None


def reward_fn(code: str, compat: str = "none") -> RewardFn:
    """The reward function of a type under a compat mode."""
    check_compat(compat)
    if code == "VM" and compat == "aies2024":
        return _vm(float(int(VM_BETA)))  # the anchor's int(0.5) == 0: VM reduces to [a_M = C]
    return get_moral_type(code).fn


def moral_reward(
    code: str, a_m: ArrayLike, a_o: ArrayLike, r_m: ArrayLike, r_o: ArrayLike, s_o: ArrayLike, compat: str = "none"
) -> Arr:
    return reward_fn(code, compat)(np.asarray(a_m), np.asarray(a_o), np.asarray(r_m), np.asarray(r_o), np.asarray(s_o))


def mixed_rewards(
    codes: list[str | None], code_idx: Arr, a_m: Arr, a_o: Arr, r_m: Arr, r_o: Arr, s_o: Arr, compat: str = "none"
) -> Arr:
    """Rewards for a batch where row k belongs to type codes[code_idx[k]]; NaN where the code is None."""
    out = np.full(np.shape(a_m), np.nan, dtype=np.float64)
    for i, code in enumerate(codes):
        if code is None:
            continue
        m = code_idx == i
        if m.any():
            out[m] = reward_fn(code, compat)(a_m[m], a_o[m], r_m[m], r_o[m], s_o[m])
    return out
