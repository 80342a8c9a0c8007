"""`python -m analysis <output>/<destination_folder> [more folders]` and `moralsim analyze ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.report import DEFAULT_MAX_POINTS, write_report
from simulator.errors import MoralsimError

log = logging.getLogger("analysis")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser(prog: str = "python -m analysis") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Figures, tables and an HTML report from the Parquet logs of one or more destination folders. "
        "Several folders are also compared side by side; two or more LLM runs (e.g. Game, De, Ut, Game+De and "
        "Game-then-De against TFT) get the paper's figures: cooperation over legal answers and illegal-answer rate "
        "per episode, start and end rates, and the generalisation matrix of their saved adapters' evaluations.",
    )
    p.add_argument("folders", nargs="+", help="<output>/<destination_folder> (one or more; a dataset under an "
                   "--output URI such as s3://bucket/prefix/<folder> is copied into ~/.cache/moralsim first)")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: <folder>/report for one folder, <parent>/comparison_report for several)")
    p.add_argument("--bin-size", type=_positive_int, default=None,
                   help="iterations per bin in time series (default: so that each series has at most --max-points)")
    p.add_argument("--max-points", type=_positive_int, default=DEFAULT_MAX_POINTS,
                   help="bins per time series when --bin-size is not given (default: %(default)s)")
    p.add_argument("--eval", type=Path, default=None, dest="eval_path",
                   help="evaluation-suite Parquet (model/adapter, game, action_tokens, prompt_variant, legal, action): "
                   "adds the generalisation matrix")
    p.add_argument("--dpi", type=_positive_int, default=150, help="PNG resolution (default: %(default)s)")
    p.add_argument("--name", action="append", dest="names", default=None,
                   help="a label per folder, in order (repeat it; e.g. a job file's group names, which also tell its "
                   "'extra' and 'unlearning' groups apart in the paper's figures)")
    p.add_argument("--sweep", action="store_true",
                   help="the sweep report of several populations (e.g. the nine AIES ones): comparison figures across "
                   "populations, per-run final cooperation and mode counts, each population's report under "
                   "<out>/populations (default out: <parent>/sweep_report)")
    p.add_argument("--verify", action="store_true",
                   help="only check each folder's runs against the size and SHA-256 their _SUCCESS lists for every "
                   "file (read in place, also on an object store); exit status 1 if any run does not match")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def verify(folders: Sequence[str]) -> int:
    """`--verify`: one line per run, a summary per folder; 1 when a run does not match its _SUCCESS."""
    from analysis.dataset import verify_dataset
    from simulator.storage import redact

    bad = 0
    for folder in folders:
        checks = verify_dataset(folder)
        for c in checks:
            sys.stdout.write(f"{c.run}: {'DOES NOT MATCH' if c.status == 'bad' else c.status}: {c.detail}\n")
        counts = {s: sum(c.status == s for c in checks) for s in ("ok", "unlisted", "bad", "uncommitted")}
        sys.stdout.write(f"{redact(folder)}: {counts['ok']} runs verified, {counts['unlisted']} without hashes, "
                         f"{counts['bad']} not matching, {counts['uncommitted']} not committed\n")
        bad += counts["bad"]
    return 1 if bad else 0


def default_out(folders: Sequence[Path]) -> Path:
    if len(folders) == 1:
        return folders[0] / "report"
    parent = Path(os.path.commonpath([f.resolve() for f in folders]))
    if parent in {f.resolve() for f in folders}:
        parent = parent.parent
    return parent / "comparison_report"


def main(argv: Sequence[str] | None = None, prog: str = "python -m analysis") -> int:
    args = build_parser(prog).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.verify:
            return verify(args.folders)
        from analysis.dataset import local_copy

        args.folders = [local_copy(f) for f in args.folders]
        out = args.out or default_out(args.folders)
        if args.sweep:
            from analysis.sweep import write_sweep_report

            out = args.out or default_out(args.folders).with_name("sweep_report")
            if args.eval_path is not None:
                raise MoralsimError("--eval is for the report of LLM runs, not for --sweep")
            sweep = write_sweep_report(args.folders, out, args.bin_size, args.dpi, args.max_points)
            sys.stdout.write(f"{sweep.out / 'index.html'}\n")
            return 0
        report = write_report(args.folders, out, args.bin_size, args.eval_path, args.max_points, args.dpi, args.names)
    except MoralsimError as e:
        log.error("%s", e)
        return 2
    if report.problems:
        log.warning("%d problem(s), listed in the report", len(report.problems))
    sys.stdout.write(f"{report.out / 'index.html'}\n")  # the result, for scripts: the page to open
    return 0
