"""The report end to end: from a real small simulation, from several folders side by side, with bad parts."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from analysis.__main__ import main
from analysis.report import write_report
from analysis.synthetic import SyntheticSpec, write_synthetic
from simulator.errors import CorruptDataError

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def test_report_from_real_simulation(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "main.py",
        "--destination_folder",
        "3xS_1xTFT",
        "--num_iterations",
        "50",
        "--num_runs",
        "2",
        "--output",
        str(tmp_path),
        "--backend",
        "inline",
        "--no_progress",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "3xS_1xTFT"

    assert main([str(folder), "--dpi", "40"]) == 0  # low resolution: the test checks content, not looks
    out = folder / "report"
    page = (out / "index.html").read_text()
    pngs = embedded_pngs(page)
    assert len(pngs) == len(list((out / "figures").glob("*.png"))) >= 8
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert "Problems" not in page
    coop = pl.read_csv(out / "tables" / "cooperation_by_type.csv")
    assert set(coop["type"]) == {"S", "TFT"}
    assert coop["iteration"].max() == 49 and set(coop["n_runs"]) == {2}
    selection = pl.read_csv(out / "tables" / "selection_matrix.csv")
    assert selection.group_by("selector_type").agg(pl.col("fraction").sum())["fraction"].round(9).to_list() == [1, 1]


def test_comparison_report_with_bad_part_llm_runs_and_eval(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path, SyntheticSpec("2xUT_2xS", num_runs=3, num_iterations=40))
    b = write_synthetic(tmp_path, SyntheticSpec("1xGame+De_1xTFT", num_runs=2, num_iterations=40, llm=True))
    bad = a / "run=2" / "part-00000000.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    eval_path = tmp_path / "eval.parquet"
    pl.DataFrame(
        {
            "model": ["base", "base", "Game+De", "Game+De"],
            "game": ["IPD", "ISH", "IPD", "ISH"],
            "action_tokens": ["A|B"] * 4,
            "prompt_variant": ["v0"] * 4,
            "legal": [True, False, True, True],
            "action": pl.Series([1, None, 0, 0], dtype=pl.Int8),
        }
    ).write_parquet(eval_path)

    report = write_report([a, b], tmp_path / "cmp", bin_size=10, eval_path=eval_path, dpi=40)
    assert any("part-00000000.parquet" in p and "run=2" in p for p in report.problems)
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert "Problems" in page and str(bad) in page
    names = {p.name for p in (tmp_path / "cmp" / "figures").glob("*.png")}
    assert {
        "compare_cooperation_grid.png",
        "compare_learners.png",
        "compare_social_outcomes.png",
        "1xGame+De_1xTFT__llm_episodes.png",
        "1xGame+De_1xTFT__llm_training.png",
        "generalisation_matrix.png",
    } <= names
    assert len(embedded_pngs(page)) == len(names)
    coop = pl.read_csv(tmp_path / "cmp" / "tables" / "2xUT_2xS__cooperation_by_type.csv")
    assert coop["iteration"].unique().sort().to_list() == [0, 10, 20, 30]
    assert set(coop["n_runs"]) == {2}  # run 2 lost its only part
    gm = pl.read_csv(tmp_path / "cmp" / "tables" / "generalisation_matrix.csv")
    assert gm.filter(model="base", game="ISH")["illegal_rate"].item() == 1.0


def test_cli_reports_an_unreadable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nothing_here")]) == 2
    with pytest.raises(CorruptDataError):
        write_report([tmp_path / "nothing_here"], tmp_path / "out")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--bin-size", "0"])
