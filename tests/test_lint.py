"""ruff and mypy run as part of the test command, so CI checks them on every submission."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["simulator", "actors", "scenarios", "analysis", "main.py"]


def test_ruff():
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed; install the dev extra: pip install -e '.[dev]'")
    proc = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy():
    proc = subprocess.run([sys.executable, "-m", "mypy", *PACKAGES], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pure_core_imports_no_heavy_framework():
    """simulator/ and analysis/ must import without ray, vllm, trl, transformers (or torch for simulator)."""
    code = (
        "import sys, simulator.engine, simulator.driver, simulator.records, simulator.env, simulator.config\n"
        "import analysis\n"
        "bad = [m for m in ('ray', 'vllm', 'trl', 'transformers', 'torch') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_llm_configuration_imports_no_framework():
    """Every LLM setting (actors/llm/config.py) reads without torch, so the entrance can parse and check an LLM run
    before any framework loads."""
    code = (
        "import sys, actors.llm.config\n"
        "bad = [m for m in ('ray', 'vllm', 'trl', 'transformers', 'torch', 'peft') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
