"""A schema-conformant synthetic dataset, for the analysis tests and the throughput benchmark.

Rows follow the population protocol's bookkeeping (DESIGN section 1): every agent selects one partner per iteration,
games are shuffled, dilemma states are the opponent's move in the previous iteration's snapshot, `latest_move` is the
action of each agent's last game in the shuffled order, payoffs come from `simulator.games.GAMES` and learning rewards
from `simulator.rewards`. What is *not* real is the behaviour: moves are coin flips whose cooperation probability drifts
with the agent's type (prosocial types drift up, antisocial types down), and partners are chosen uniformly.

Parts are written to a hidden temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.contracts import REASON_NAMES, Reason
from simulator.errors import ConfigError
from simulator.games import get_game
from simulator.population import parse_population
from simulator.rewards import mixed_rewards
from simulator.schema import LLM_RECORD_SCHEMA, RECORD_SCHEMA

log = logging.getLogger(__name__)

# Where each type's cooperation probability ends up after a run (it starts at 0.5).
_TARGET_P_COOPERATE = {
    "UT": 0.9, "DE": 0.85, "VEe": 0.7, "VEk": 0.95, "VM": 0.85, "AL": 0.9, "Game+De": 0.8, "De": 0.85, "Ut": 0.9,
    "S": 0.15, "Game": 0.15, "aUT": 0.05, "mDE": 0.1, "Vie": 0.3, "Vagg": 0.05, "aAL": 0.1,
    "AC": 1.0, "AD": 0.0,
}


@dataclass(frozen=True)
class SyntheticSpec:
    population: str = "3xS_1xUT_1xDE"
    game: str = "IPD"
    num_runs: int = 2
    num_iterations: int = 100
    iterations_per_part: int = 1000
    llm: bool = False  # also write the LLM columns (LLM_RECORD_SCHEMA), as if every learner were an LLM
    seed: int = 0


def _p_cooperate(code: str, frac: np.ndarray) -> np.ndarray:
    target = _TARGET_P_COOPERATE.get(code, 0.5)
    if code in ("AC", "AD"):
        return np.full_like(frac, target)
    return 0.5 + (target - 0.5) * np.minimum(1.0, 2.0 * frac)


def _dict_array(indices: np.ndarray, values: list[str], dtype: pa.DataType) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(indices, type=dtype.index_type), pa.array(values, pa.string()))


def _chunk(
    spec: SyntheticSpec, rng: np.random.Generator, first: int, count: int, env_state: np.ndarray
) -> tuple[pa.Table, np.ndarray]:
    """`count` iterations starting at `first`; returns the table and the env_state after the last iteration."""
    pop = parse_population(spec.population)
    game = get_game(spec.game)
    codes = list(dict.fromkeys(pop.codes))
    agent_code = np.array([codes.index(c) for c in pop.codes], dtype=np.int16)
    static = np.array([a.is_static for a in pop.agents])
    n = pop.size
    p_by_agent = np.stack(  # (count, n)
        [_p_cooperate(c, (first + np.arange(count)) / max(1, spec.num_iterations - 1)) for c in pop.codes], axis=1
    )

    # Selection and shuffled order: row k = (iteration t, order o); the selector of each game is perm[t, o].
    perm = np.argsort(rng.random((count, n)), axis=1).astype(np.int32)
    selected = ((perm + rng.integers(1, n, size=(count, n))) % n).astype(np.int32)
    act_m = (rng.random((count, n)) >= p_by_agent[np.arange(count)[:, None], perm]).astype(np.int8)
    act_o = (rng.random((count, n)) >= p_by_agent[np.arange(count)[:, None], selected]).astype(np.int8)

    # latest_move per (iteration, agent): the action of the agent's game with the highest order.
    latest = np.empty((count, n), dtype=np.int8)
    order = np.broadcast_to(np.arange(n, dtype=np.int32), (count, n))
    t_idx = np.broadcast_to(np.arange(count)[:, None], (count, n))
    agents = np.concatenate([perm.ravel(), selected.ravel()])
    acts = np.concatenate([act_m.ravel(), act_o.ravel()])
    ords = np.concatenate([order.ravel(), order.ravel()])
    ts = np.concatenate([t_idx.ravel(), t_idx.ravel()])
    idx = np.lexsort((ords, agents, ts))
    key = ts[idx].astype(np.int64) * n + agents[idx]
    last = np.flatnonzero(np.r_[key[1:] != key[:-1], True])
    latest.ravel()[key[last]] = acts[idx][last]
    # The snapshot of iteration t is env_state before it: latest of t-1 (the carried env_state for t = 0).
    snapshot = np.concatenate([env_state[None, :], latest[:-1]], axis=0)
    rows_t = np.arange(count)[:, None]
    state_m = snapshot[rows_t, selected]
    state_o = snapshot[rows_t, perm]
    coop_snapshot = (snapshot == 0).sum(axis=1, keepdims=True)
    available_c = (coop_snapshot - (snapshot[rows_t, perm] == 0)).astype(np.int16)

    pay = game.payoffs
    r_m = pay[act_m, act_o, 0].astype(np.float32)
    r_o = pay[act_m, act_o, 1].astype(np.float32)
    code_m = agent_code[perm]
    code_o = agent_code[selected]
    reward_codes: list[str | None] = [None if c in {a.code for a in pop.agents if a.is_static} else c for c in codes]
    mr_m = mixed_rewards(reward_codes, code_m.ravel(), act_m.ravel(), act_o.ravel(), r_m.ravel(), r_o.ravel(),
                         state_m.ravel()).astype(np.float32)
    mr_o = mixed_rewards(reward_codes, code_o.ravel(), act_o.ravel(), act_m.ravel(), r_o.ravel(), r_m.ravel(),
                         state_o.ravel()).astype(np.float32)

    def reason(who: np.ndarray) -> np.ndarray:
        explore = rng.random(who.shape) < 0.1
        r = np.where(explore, Reason.EXPLORE, Reason.GREEDY)
        r = np.where(static[who], Reason.STATIC, r)
        if first == 0:
            r[0] = np.where(static[who[0]], Reason.STATIC, Reason.FIRST)
        return r.astype(np.int8).ravel()

    iteration = (first + np.repeat(np.arange(count, dtype=np.int32), n)).astype(np.int32)
    denom = np.abs(r_m) + np.abs(r_o)
    equality = np.where(denom == 0, 1.0, 1.0 - np.abs(r_m - r_o) / np.where(denom == 0, 1.0, denom))
    cols: dict[str, pa.Array] = {
        "iteration": pa.array(iteration),
        "order": pa.array(order.ravel().astype(np.int32)),
        "selector": pa.array(perm.ravel()),
        "selected": pa.array(selected.ravel()),
        "selector_type": _dict_array(code_m.ravel(), codes, RECORD_SCHEMA.field("selector_type").type),
        "selected_type": _dict_array(code_o.ravel(), codes, RECORD_SCHEMA.field("selected_type").type),
        "selector_state": pa.array(state_m.ravel()),
        "selected_state": pa.array(state_o.ravel()),
        "selector_action": pa.array(act_m.ravel()),
        "selected_action": pa.array(act_o.ravel()),
        "selector_payoff": pa.array(r_m.ravel()),
        "selected_payoff": pa.array(r_o.ravel()),
        "selector_moral_reward": pa.array(mr_m, from_pandas=True),
        "selected_moral_reward": pa.array(mr_o, from_pandas=True),
        "selector_learning_reward": pa.array(mr_m, from_pandas=True),
        "selected_learning_reward": pa.array(mr_o, from_pandas=True),
        "selector_reason": _dict_array(reason(perm), list(REASON_NAMES), RECORD_SCHEMA.field("selector_reason").type),
        "selected_reason": _dict_array(reason(selected), list(REASON_NAMES), RECORD_SCHEMA.field("selected_reason").type),
        "selection_reason": _dict_array(reason(perm), list(REASON_NAMES), RECORD_SCHEMA.field("selection_reason").type),
        "selector_available_c": pa.array(available_c.ravel()),
        "collective_payoff": pa.array((r_m + r_o).ravel()),
        "equality": pa.array(equality.ravel().astype(np.float32)),
        "min_payoff": pa.array(np.minimum(r_m, r_o).ravel()),
    }
    schema = RECORD_SCHEMA
    if spec.llm:
        schema = LLM_RECORD_SCHEMA
        k = count * n
        for role, who, act in (("selector", perm, act_m), ("selected", selected, act_o)):
            is_llm = ~static[who.ravel()]
            legal = rng.random(k) > 0.1 * (1 - iteration / max(1, spec.num_iterations))  # fewer illegal answers later
            p_c = np.clip(1.0 - act.ravel() + rng.normal(0, 0.2, k), 0, 1).astype(np.float32)
            cols[f"{role}_prompt_variant"] = pa.array(np.full(k, "v0"), mask=~is_llm)
            cols[f"{role}_action_tokens"] = pa.array(np.full(k, "A|B"), mask=~is_llm)
            cols[f"{role}_answer_mode"] = pa.array(np.full(k, "free"), mask=~is_llm)
            answer = np.where(legal, np.where(act.ravel() == 0, "A", "B"), "I refuse")
            cols[f"{role}_raw_answer"] = pa.array(answer, mask=~is_llm)
            cols[f"{role}_legal"] = pa.array(legal, mask=~is_llm)
            cols[f"{role}_p_cooperate"] = pa.array(p_c, mask=~is_llm)
            cols[f"{role}_adapter_version"] = pa.array(iteration, mask=~is_llm)
            # the agent's latest update is the previous iteration's: KL grows, losses shrink with training
            decay = np.exp(-iteration / max(1, spec.num_iterations / 3)).astype(np.float32)
            cols[f"{role}_kl"] = pa.array((0.1 * (1 - decay)).astype(np.float32), mask=~is_llm | (iteration == 0))
            for name, scale in (("policy_loss", 1.0), ("value_loss", 2.0)):
                loss = (scale * decay * (0.5 + 0.1 * who.ravel() / n)).astype(np.float32)
                cols[f"{role}_{name}"] = pa.array(loss, mask=~is_llm | (iteration == 0))
            for f in LLM_RECORD_SCHEMA:  # no synthetic agent has a reason-scoring type (VR): its columns are null
                if f.name.startswith(f"{role}_") and f.name not in cols:
                    cols[f.name] = pa.nulls(k, f.type)
    table = pa.Table.from_arrays([cols[f.name].cast(f.type) for f in schema], schema=schema)
    return table, latest[-1].copy()


def write_part(table: pa.Table, path: Path) -> None:
    """Write next to the target under a hidden name, then rename: readers never see a half-written part."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_synthetic(output: str | os.PathLike[str], spec: SyntheticSpec, folder: str | None = None) -> Path:
    """Write `<output>/<folder>/run=<k>/part-<iter:08d>.parquet` and `manifest.json`; return the folder."""
    if spec.num_runs < 1 or spec.num_iterations < 1 or spec.iterations_per_part < 1:
        raise ConfigError(f"num_runs, num_iterations and iterations_per_part must be >= 1, got {spec}")
    pop = parse_population(spec.population)
    dest = Path(output) / (folder or spec.population)
    seeds = np.random.SeedSequence(spec.seed).spawn(spec.num_runs)
    for run, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        run_dir = dest / f"run={run}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env_state = rng.integers(0, 2, pop.size).astype(np.int8)
        for first in range(0, spec.num_iterations, spec.iterations_per_part):
            count = min(spec.iterations_per_part, spec.num_iterations - first)
            table, env_state = _chunk(spec, rng, first, count, env_state)
            write_part(table, run_dir / f"part-{first:08d}.parquet")
    manifest = {
        "population": spec.population,
        "game": spec.game,
        "num_iterations": spec.num_iterations,
        "num_runs": spec.num_runs,
        "config": {"synthetic": True, "seed": spec.seed, "llm": spec.llm},
    }
    tmp = dest / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, dest / "manifest.json")
    log.info("wrote synthetic dataset %s (%d rows)", dest, spec.num_runs * spec.num_iterations * pop.size)
    return dest
