from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simulator.errors import ConfigError, PopulationSpecError
from simulator.population import parse_population

ROOT = Path(__file__).resolve().parents[1]


def test_parse_counts_and_order():
    pop = parse_population("8xS_1xUT_1xaUT_1xDE_1xmDE_1xVEe_1xVie_1xVEk_1xVagg")
    assert pop.size == 16 and pop.codes[:9] == ("S",) * 8 + ("UT",)


def test_every_code_is_accepted():
    from actors.static import STRATEGIES
    from simulator.population import STATIC_CODES, valid_codes

    assert set(STRATEGIES) == set(STATIC_CODES)
    pop = parse_population("_".join(f"1x{c}" for c in valid_codes()))
    assert pop.size == len(valid_codes())


def test_mixed_learner_syntax():
    pop = parse_population("2xUT@llm_1xDE@tabularQ_1xTFT_1xS").resolved("dqn")
    assert [a.learner for a in pop.agents] == ["llm", "llm", "tabularQ", None, "dqn"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty population"),
        ("0xS", "count must be at least 1"),
        ("3S", "did you mean '3xS'"),
        ("1xUTT", "Did you mean 'UT'"),
        ("1xUT_", "bad population entry ''"),
        ("2xTFT@dqn", "static strategy"),
        ("2xUT@ppo", "unknown learner"),
        ("1xS", "at least 2"),
    ],
)
def test_bad_strings(text, message):
    with pytest.raises(PopulationSpecError, match=message):
        parse_population(text)


@pytest.mark.parametrize("text", ["1xUT_1xFOO", "0xS", "3S", ""])
def test_cli_rejects_bad_population_before_any_work(tmp_path, text):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "main.py", "--destination_folder", text, "--num_iterations", "5", "--num_runs", "1", "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "Valid" in proc.stderr and "TFT" in proc.stderr and "mDE" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_the_virtue_reason_rule_is_checked_when_a_population_is_built():
    from simulator.population import AgentSpec, Population

    with pytest.raises(ConfigError, match=r"VR@dqn cannot learn its reward.*@llm"):
        Population("1xVR@dqn", (AgentSpec("VR", "dqn"),))
    Population("1xVR", (AgentSpec("VR", None),))  # the learner comes later (resolved), checked then
    with pytest.raises(ConfigError, match="only LLM agents state reasons"):
        Population("1xVR", (AgentSpec("VR", None),)).resolved("tabularQ")
