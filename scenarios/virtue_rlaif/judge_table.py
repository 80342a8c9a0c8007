"""`python -m scenarios.virtue_rlaif.judge_table OUTPUT/judge_check`: every judge's check as one markdown table.

One row per judge and rule (the check stores its verdicts under both rules, `agree` costing nothing extra), one
column group per labelled set: accuracy [95% bootstrap interval], order consistency, accuracy when consistent (n), and
the check's wall time on the machine that ran it. A judge passes when its lower bound is above 0.6 on every set and
its consistency at least 0.7.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def rescored(rows_file: Path, rule: str, margin: float) -> dict[str, Any]:
    """check_metrics per set from the check's saved per-virtue shares (judge_check/<judge>.parquet), under `rule`."""
    import polars as pl

    from actors.llm.virtue.scoring import VIRTUES, check_metrics

    df = pl.read_parquet(rows_file)
    out = {}
    for name in df["set"].unique(maintain_order=True):
        d = df.filter(pl.col("set") == name)
        p_ab = d.select([f"{v}_p_ab" for v in VIRTUES]).to_numpy()
        p_ba = d.select([f"{v}_p_ba" for v in VIRTUES]).to_numpy()
        out[name] = check_metrics(p_ab, p_ba, margin, rule).as_dict()
    return out


def rows(folder: Path) -> list[str]:
    from scenarios.virtue_rlaif.pipeline import passes

    out = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        j = r["judge"]
        other = "agree" if j["rule"] == "average" else "average"
        other_sets = rescored(f.with_suffix(".parquet"), other, j["tie_margin"])
        for rule, sets, ok in ((j["rule"], r["sets"], r["passes"]), (other, other_sets, passes(other_sets))):
            cells = [f"{Path(j['model']).name} {j['mode']}", rule]
            for name in sorted(sets):
                cells.append(_cell(sets[name]))
            cells += [f"{r['wall_s']:.0f} s ({r['pairs']} pairs)", "yes" if ok else "no"]
            out.append("| " + " | ".join(cells) + " |")
    return out


def _num(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"  # None in new files, NaN in older ones


def _cell(m: dict[str, Any]) -> str:
    return (f"{m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}] (n={m['pairs']}); "
            f"cons. {m['consistency']:.2f}; when cons. {_num(m['consistent_accuracy'])} (n={m['consistent_pairs']})")


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path("results/virtue_rlaif/judge_check")
    body = rows(folder)
    if not body:
        print(f"no judge-check results in {folder}", file=sys.stderr)
        return 2
    print("| judge | rule | ethics | handwritten | check wall time | passes |")
    print("|---|---|---|---|---|---|")
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
