"""Hypothesis properties of the protocol on random populations."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.factory import build_groups
from simulator.config import RunConfig
from simulator.engine import PopulationEngine
from simulator.games import GAMES
from simulator.population import parse_population, valid_codes
from simulator.seeding import initial_state, run_streams

AIES_AND_STATIC = [c for c in valid_codes() if c not in ("Game", "De", "Ut", "Game+De", "VR", "Game+VR")]


@st.composite
def populations(draw):
    entries = draw(
        st.lists(
            st.tuples(st.integers(1, 3), st.sampled_from(AIES_AND_STATIC), st.sampled_from(["", "@dqn", "@tabularQ"])),
            min_size=1,
            max_size=5,
        )
    )
    text = "_".join(f"{n}x{c}{'' if c in ('AC', 'AD', 'TFT', 'Random', 'CD') or c.startswith('GE') else k}" for n, c, k in entries)
    pop = parse_population(text if sum(n for n, _, _ in entries) >= 2 else text + "_1xAC")
    return pop.resolved("dqn")


@settings(max_examples=25, deadline=None)
@given(
    pop=populations(),
    runs=st.integers(1, 3),
    iterations=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    game=st.sampled_from(sorted(GAMES)),
    random_matching=st.booleans(),
)
def test_protocol_invariants(pop, runs, iterations, seed, game, random_matching):
    n = pop.size
    streams = [run_streams(seed, r, n) for r in range(runs)]
    init = np.stack([initial_state(s.protocol, n) for s in streams])
    eng = PopulationEngine(
        pop.codes,
        pop.moral_codes,
        build_groups(RunConfig(pop.text, random_matching=random_matching), streams),
        GAMES[game],
        [s.protocol for s in streams],
        init,
        random_matching=random_matching,
    )
    records = 0
    prev_state = init
    for _ in range(iterations):
        rec = eng.step()
        records += rec.selector.size
        # each agent selects exactly once per iteration, and never itself
        assert np.array_equal(np.sort(rec.selector, axis=1), np.tile(np.arange(n), (runs, 1)))
        assert not np.any(rec.selector == rec.selected)
        # dilemma states come from the snapshot
        assert np.array_equal(rec.selector_state, np.take_along_axis(prev_state, rec.selected, axis=1))
        assert np.array_equal(rec.selected_state, np.take_along_axis(prev_state, rec.selector, axis=1))
        # new env_state: each agent's move in the last game it played
        for r in range(runs):
            last = {}
            for k in range(n):
                last[int(rec.selector[r, k])] = int(rec.selector_action[r, k])
                last[int(rec.selected[r, k])] = int(rec.selected_action[r, k])
            assert [last[i] for i in range(n)] == eng.state[r].tolist()
        # payoffs come from the game matrix
        pay = GAMES[game].payoffs[rec.selector_action, rec.selected_action]
        assert np.array_equal(pay[..., 0], rec.selector_payoff)
        prev_state = eng.state
    assert records == n * iterations * runs
