"""The batched engine against the plain reference loop: identical records for the same seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from polars.testing import assert_frame_equal

from actors.dqn import DQNConfig
from scenarios.run import with_agents
from simulator.config import RunConfig
from simulator.contracts import Reason
from simulator.games import GAMES
from tests.helpers import engine_records, reference_frame
from tests.reference import reference_run

F64 = DQNConfig(dtype="float64")

CASES = [
    # population, method, game, iterations, compat, random_matching
    ("2xTFT_1xRandom_1xCD_1xAC_1xAD", "dqn", "IPD", 30, "none", False),
    ("1xGEa_1xGEb_1xGEc_1xGEd_1xGEe_1xTFT", "dqn", "ISH", 30, "none", False),
    ("1xUT_1xaUT_1xDE", "tabularQ", "IPD", 60, "none", False),
    ("2xS_1xDE_1xmDE_1xVEe_1xTFT_1xGEb", "tabularQ", "IVD", 40, "aies2024", False),
    ("1xUT_1xaUT_1xDE", "dqn", "IPD", 60, "none", False),
    ("3xS_1xUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg_1xVM_1xAL_1xaAL_1xTFT_1xGEc", "dqn", "BOS", 25, "aies2024", False),
    ("2xS_1xUT@tabularQ_1xDE_1xAD_1xRandom", "dqn", "ICN", 40, "none", False),
    ("2xUT_1xDE_1xTFT", "dqn", "IPD", 40, "none", True),
]


@pytest.mark.parametrize(("pop", "method", "game", "iterations", "compat", "random_matching"), CASES)
def test_batched_engine_equals_reference(tmp_path, pop, method, game, iterations, compat, random_matching):
    cfg = RunConfig(
        pop,
        num_iterations=iterations,
        num_runs=3,
        seed=11,
        game=GAMES[game],
        method=method,
        compat=compat,
        random_matching=random_matching,
        output=tmp_path,
        flush_rows=37,
    )
    got = engine_records(with_agents(cfg, dqn=F64), [0, 1, 2])  # three runs stacked in one engine
    population = cfg.population.resolved(method)
    rows = [
        r
        for run in (0, 1, 2)
        for r in reference_run(population, GAMES[game], 11, run, iterations, compat=compat, random_matching=random_matching)
    ]
    assert got.height == 3 * iterations * population.size
    assert_frame_equal(got, reference_frame(rows))


def test_learners_actually_learn_something(tmp_path):
    """Guard against a vacuous equivalence: greedy moves exist and DQN weights changed."""
    cfg = RunConfig("1xUT_1xaUT_1xDE", num_iterations=60, num_runs=1, seed=3, output=tmp_path)
    df = engine_records(with_agents(cfg, dqn=F64), [0])
    assert (df["selector_reason"] == "greedy").sum() > 0


def test_chunked_uniforms_match_per_iteration_draws():
    a = np.random.default_rng(5).random((4, 3, 7))
    rng = np.random.default_rng(5)
    b = np.stack([rng.random((3, 7)) for _ in range(4)])
    assert np.array_equal(a, b)


def test_adam_with_denormals_flushed_gives_the_same_weights():
    """FlatAdam flushes denormals during its step (actors/dqn.py): weights without gradient for ~800 steps have a
    denormal first moment, whose update is far below the weight's last bit. The weights must be the same bits."""
    from actors.dqn import FlatAdam

    gen = torch.Generator().manual_seed(0)
    flushed, plain = torch.rand(4096, generator=gen) - 0.5, torch.empty(4096)
    plain.copy_(flushed)
    a, b = FlatAdam([flushed], lr=1e-3), FlatAdam([plain], lr=1e-3)
    grad = torch.randn(4096, generator=gen) * 1e-2
    for step in range(1200):
        if step == 5:
            grad[: 4096 // 2] = 0.0  # half the weights get no gradient from here on
        a.step([grad])
        torch._foreach_add_(b.steps, 1)
        b.update(b.buffers, [grad], b.exp_avg, b.exp_avg_sq, b.steps)  # the same kernel without the flush
    m = b.exp_avg[0]
    assert ((m != 0) & (m.abs() < torch.finfo(torch.float32).tiny)).any(), "no denormal moment: the test is vacuous"
    assert torch.equal(flushed, plain)


def test_selection_gradients_in_chunks_give_the_same_weights(tmp_path, monkeypatch):
    """A large population takes its selection gradients and Adam steps chunk by chunk (actors/dqn.py
    GRAD_CHUNK_BYTES): the weights and the records must be the same bits as in one step over every agent."""

    import actors.dqn
    from scenarios.factory import build_groups
    from simulator.driver import build_engine

    cfg = RunConfig("2xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie", num_iterations=30, num_runs=4, seed=5, output=tmp_path)

    def run() -> tuple[object, list[np.ndarray]]:
        engine, _ = build_engine(cfg, [0, 1, 2, 3], build_groups)
        actions = [engine.step().selector_action for _ in range(30)]
        return engine.groups[0], actions

    cfg = with_agents(cfg, dqn=DQNConfig(fused=False))  # the torch path: the fused step holds no gradients at all
    whole, whole_actions = run()
    monkeypatch.setattr(actors.dqn, "GRAD_CHUNK_BYTES", 1)  # the smallest chunk: CHUNK_AGENTS agents
    chunked, chunked_actions = run()
    assert whole.chunk == 32 and chunked.chunk == actors.dqn.CHUNK_AGENTS == 16
    assert chunked.grads["sel_w1"].shape[0] == 16  # the scratch holds one chunk
    for name, t in whole.params.items():
        assert torch.equal(t, chunked.params[name]), name
    assert all(np.array_equal(a, b) for a, b in zip(whole_actions, chunked_actions, strict=True))


def _dqn_engines(cfg: RunConfig, runs: list[int], iterations: int, **dqn: object) -> tuple[list[object], list[object]]:
    """Every DQN group of an engine after `iterations` steps, and every iteration's records."""
    from scenarios.factory import build_groups
    from simulator.driver import build_engine

    engine, _ = build_engine(with_agents(cfg, dqn=DQNConfig(**dqn)), runs, build_groups)  # type: ignore[arg-type]
    records = [engine.step() for _ in range(iterations)]
    return [g for g in engine.groups if hasattr(g, "opt")], records


def _assert_same_bits(fast: list[object], plain: list[object]) -> None:
    assert fast and len(fast) == len(plain)
    for f, p in zip(fast, plain, strict=True):
        for name, t in p.params.items():
            assert torch.equal(t, f.params[name]), name
        for k in range(len(p.opt.buffers)):
            assert torch.equal(p.opt.exp_avg[k], f.opt.exp_avg[k]) and torch.equal(p.opt.exp_avg_sq[k], f.opt.exp_avg_sq[k])


@pytest.mark.parametrize(("pop", "runs", "iterations", "dtype"), [
    ("8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg", 2, 900, "float32"),  # the sweep's; past ~800: denormals
    ("2xS_1xUT_1xaUT_1xDE_1xTFT_1xAD", 3, 200, "float32"),  # 15 agents x 6 partners: Adam's scalar tail (90 % 8)
    ("2xS_1xUT_1xaUT_1xDE_1xTFT_1xAD", 3, 200, "float64"),
    ("1xUT_1xDE", 1, 200, "float32"),  # one partner
])
def test_fused_selection_step_equals_the_torch_path(tmp_path, monkeypatch, pop, runs, iterations, dtype):
    """actors/dqn_fused.py computes the TD targets and gradients inside the Adam step, and the next forward passes
    after it; the torch path (gradients into a buffer, then torch._fused_adam_) is its plain reference. With the same
    forward passes (the compiled ones, which the torch path otherwise makes with torch): weights, Adam moments and
    records, the same bits."""
    import actors.dqn

    cfg = RunConfig(pop, num_iterations=iterations, num_runs=runs, seed=9, output=tmp_path)
    fast, fast_rec = _dqn_engines(cfg, list(range(runs)), iterations, dtype=dtype, fused=True)
    monkeypatch.setattr(actors.dqn, "TORCH_PATH_COMPILED_FORWARD", True)
    plain, plain_rec = _dqn_engines(cfg, list(range(runs)), iterations, dtype=dtype, fused=False)
    assert fast[0]._fused and not plain[0]._fused and plain[0]._compiled_forward  # type: ignore[attr-defined]
    _assert_same_bits(fast, plain)
    for a, b in zip(fast_rec, plain_rec, strict=True):
        for col in ("selected", "selector_action", "selected_action", "selection_reason"):
            assert np.array_equal(getattr(a, col), getattr(b, col)), col
    greedy = sum(int((r.selection_reason == Reason.GREEDY).sum()) for r in fast_rec)
    assert greedy > 0, "no greedy selection: the selection nets were never used"


def test_fused_selection_step_equals_the_chunked_torch_path(tmp_path, monkeypatch):
    """Where the torch path takes the selection gradients chunk by chunk (large populations), the fused step, which
    holds none, still gives the same bits."""
    import actors.dqn

    cfg = RunConfig("2xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie", num_iterations=40, num_runs=4, seed=5, output=tmp_path)
    fast, _ = _dqn_engines(cfg, [0, 1, 2, 3], 40, fused=True)
    monkeypatch.setattr(actors.dqn, "GRAD_CHUNK_BYTES", 1)
    monkeypatch.setattr(actors.dqn, "TORCH_PATH_COMPILED_FORWARD", True)
    chunked, _ = _dqn_engines(cfg, [0, 1, 2, 3], 40, fused=False)
    assert chunked[0].chunk == actors.dqn.CHUNK_AGENTS < 32  # type: ignore[attr-defined]
    _assert_same_bits(fast, chunked)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("agents", "n", "hid"), [(3, 15, 256), (1, 5, 7), (2, 1, 2), (2, 16, 33), (1, 17, 64), (4, 40, 9)])
def test_compiled_forward_passes_make_the_sums_they_state(agents, n, hid, dtype):
    """actors/dqn_fused.py's selection forward runs its sums in SIMD vectors (16 float32 lanes, CHAINS chains) with a
    scalar path near the buffer's end; both must give the bits of the order its docstring states, written here as a
    plain loop, and the net's values to rounding (a float64 matmul). Shapes cover columns below, at and above one
    vector, hidden sizes that are not a multiple of it, and buffers small enough to take the scalar path."""
    from numba import njit

    from actors.dqn_fused import CHAINS, _fma, dilemma_forward, selection_forward

    @njit
    def stated(p, b, n_agents, x, hid):  # type: ignore[no-untyped-def]
        n = x.size
        o_b1, o_w2 = n_agents * n * hid + b * hid, n_agents * n * hid + n_agents * hid + b * hid * n
        o_b2 = n_agents * (n * hid + hid + hid * n) + b * n
        h, q = np.zeros(hid, p.dtype), np.zeros(n, p.dtype)
        for j in range(hid):
            a = p[o_b1 + j]
            for i in range(n):
                if x[i] != 0:
                    a = a + p[(b * n + i) * hid + j]
            h[j] = max(a, p.dtype.type(0))
        for k in range(n):
            s = np.zeros(CHAINS, p.dtype)
            for j in range(hid):
                s[j % CHAINS] = _fma(h[j], p[o_w2 + j * n + k], s[j % CHAINS])
            q[k] = ((s[0] + s[1]) + (s[2] + s[3])) + p[o_b2 + k]
        return h, q

    f = np.dtype(dtype).type
    rng = np.random.default_rng(n * 100 + hid)
    p = rng.standard_normal(agents * (2 * n * hid + hid + n)).astype(f)
    x = (rng.random((agents, n)) < 0.5).astype(np.int8)
    x[0] = 1  # every row of one agent
    h, q = np.empty((agents, hid), f), np.empty((agents, n), f)
    selection_forward(p, x, h, q)
    for b in range(agents):
        want_h, want_q = stated(p, b, agents, x[b], hid)
        assert np.array_equal(h[b], want_h) and np.array_equal(q[b], want_q), b
    w1 = p[: agents * n * hid].reshape(agents, n, hid).astype(np.float64)
    o = agents * n * hid
    b1 = p[o : o + agents * hid].reshape(agents, hid)
    w2 = p[o + agents * hid : o + agents * hid + agents * hid * n].reshape(agents, hid, n).astype(np.float64)
    b2 = p[o + agents * hid + agents * hid * n :].reshape(agents, n)
    h64 = np.maximum(np.einsum("bi,bij->bj", x, w1) + b1, 0)
    np.testing.assert_allclose(q, np.einsum("bj,bjk->bk", h64, w2) + b2, rtol=0, atol=1e-4 if dtype == "float32" else 1e-12)
    pd = rng.standard_normal(agents * (4 * hid + 2)).astype(f)
    hd, qd = np.empty((agents, 2, hid), f), np.empty((agents, 2, 2), f)
    dilemma_forward(pd, hd, qd)
    dw1, db1 = pd[: agents * hid].reshape(agents, hid), pd[agents * hid : 2 * agents * hid].reshape(agents, hid)
    dw2 = pd[2 * agents * hid : 4 * agents * hid].reshape(agents, hid, 2).astype(np.float64)
    dh = np.maximum(np.stack([db1, db1 + dw1], axis=1), 0)
    assert np.array_equal(hd, dh)
    np.testing.assert_allclose(qd, np.einsum("bsj,bja->bsa", dh, dw2) + pd[4 * agents * hid :].reshape(agents, 1, 2),
                               rtol=0, atol=1e-4 if dtype == "float32" else 1e-12)
