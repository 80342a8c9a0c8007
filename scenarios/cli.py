"""Command line of moralsim; `python main.py ...` and the `moralsim` console script both land here.

Anchor-compatible:  python main.py --destination_folder 1xUT_1xaUT_1xDE --num_iterations 30000 --num_runs 20
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from scenarios.run import (  # noqa: F401  (re-exported: the entrance's names)
    DEFAULT_POPULATION,
    LLM_CHECKPOINT_EVERY,
    Job,
    Launch,
    build_parser,
    load_game,
    output_arg,
    resolve,
)
from simulator.config import RunConfig
from simulator.errors import MoralsimError, UnknownNameError
from simulator.storage import is_uri, redact

log = logging.getLogger("moralsim")


def check_output(output: Path | str) -> None:
    """Create the output root and write a probe in it; ConfigError naming the place and the reason if not."""
    from simulator.storage import check_writable

    check_writable(output)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "analyze":
        from analysis.cli import main as analyze

        return analyze(argv[1:], prog="moralsim analyze")
    if argv and argv[0] == "evaluate":
        from scenarios.evaluate import main as evaluate

        return evaluate(argv[1:])
    parser = build_parser()
    try:
        job = resolve(argv, parser)
    except (MoralsimError, UnknownNameError) as e:
        parser.exit(2, f"main.py: error: {e}\n")
    logging.basicConfig(level=logging.DEBUG if job.launch.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        tables = run_job(job)
    except (MoralsimError, UnknownNameError) as e:
        parser.exit(2, f"main.py: error: {e}\n")
    finish(job, tables)
    return 0


def gpu_stacks(runs: Sequence[RunConfig], launch: Launch) -> Launch:
    """LLM runs on CUDA without --runs_per_batch: as many runs per stack as one GPU holds (actors/llm/budget.py's
    arithmetic, the smallest over the job's populations), each stack a Ray task with a whole GPU
    (simulator.resources.batch_resources); the stacks queue for the cluster's GPUs. Logged with the arithmetic."""
    llm_runs = [c for c in runs if c.agents is not None and c.agents.llm is not None
                and c.agents.llm.device.startswith("cuda") and not c.agents.llm.actors.enabled
                and any(a.learner == "llm" for a in c.population.agents)]
    if launch.runs_per_batch is not None or not llm_runs:
        return launch
    from actors.llm import budget
    from actors.llm.models import resolve_model

    fits = []
    for c in llm_runs:
        llm = c.agents.llm  # type: ignore[union-attr]
        shape = budget.ModelShape.from_dir(resolve_model(llm.model))
        codes = [a.code for a in c.population.agents if a.learner == "llm"]
        fits.append(budget.runs_per_device(llm, shape, codes, c.population.size, budget.available_bytes(llm)))
    per = max(1, min(fits))
    log.info("one GPU holds %d runs of each stack (%s); stacks of %d runs, one GPU each", min(fits),
             ", ".join(f"{c.destination_folder}: {n}" for c, n in zip(llm_runs, fits, strict=True)), per)
    return replace(launch, runs_per_batch=per)


def run_job(job: Job) -> list[dict[int, dict[str, object]]]:
    """Check, then run every population of the job; returns each dataset's manifest run table."""
    from simulator.resources import check_run_memory

    launch = gpu_stacks(job.runs, job.launch)
    # refused before any work: runs that cannot fit in memory, an output folder that cannot be written, a cluster
    # that does not answer
    check_run_memory(list(job.runs), launch.backend, launch.ray_address, launch.num_cpus, launch.runs_per_batch)
    check_output(job.output)
    if launch.backend == "ray" and launch.ray_address:
        from simulator.cluster import connect

        connect(launch.ray_address)
    from scenarios.factory import build_groups
    from simulator.driver import run_datasets

    tables = run_datasets(list(job.runs), build_groups, backend=launch.backend, ray_address=launch.ray_address,
                          num_cpus=launch.num_cpus, show_progress=launch.show_progress,
                          runs_per_batch=launch.runs_per_batch)
    for c, runs in zip(job.runs, tables, strict=True):
        rows = sum(int(r.get("rows", 0)) for r in runs.values())
        log.info("%d runs, %d games in %s", len(runs), rows, redact(c.dataset_location))
    return tables


def finish(job: Job, tables: list[dict[int, dict[str, object]]]) -> None:
    """The end of a run: the summary, the report (if asked, or by default), and how to read the records."""
    from analysis.summary import print_summary

    cfg = job.runs[0]
    report = job.launch.report
    try:
        if job.jobs:  # a job scenario: its groups compared side by side, the paper's figures
            if report is not False:
                from analysis.cli import main as analyze

                locations = [str(c.dataset_location) for c in job.runs]
                root = Path("moralsim-reports") / "jobs_report" if is_uri(cfg.output) else Path(job.jobs_root or ".")
                names = [arg for g in job.jobs for arg in ("--name", g.name)]  # the groups' names label the figures
                analyze([*locations, *names, "--out", str(root / "report")] if len(locations) > 1 else locations)
        elif job.sweep is not None:  # the point of a sweep is the comparison; render it now that every run is there
            if report is not False:
                from analysis.dataset import local_copy
                from analysis.sweep import write_sweep_report

                reports = Path("moralsim-reports") if is_uri(cfg.output) else Path(cfg.output)
                sweep = write_sweep_report([local_copy(c.dataset_location) for c in job.runs], reports / job.sweep.report)
                log.info("sweep report: %s", sweep.out / "index.html")
        else:
            print_summary(cfg)
            if report is not False:  # default: the figures, for LLM and classic runs alike
                from analysis.cli import main as analyze

                analyze([cfg.dataset_location])
            log.info("figures and the HTML report: python -m analysis '%s'%s", redact(cfg.dataset_location),
                     " (written above; the command renders it again)" if report is not False else "")
    except MoralsimError as e:  # the records are written and safe: a report that cannot be made is not an error
        log.warning("no report: %s", e)
    if is_uri(cfg.output):
        log.info("read them with: python -m analysis '%s' (copies the committed runs into ~/.cache/moralsim)",
                 redact(cfg.dataset_location))
    else:
        log.info("read them with: polars.scan_parquet('%s/**/*.parquet', hive_partitioning=True)", cfg.dataset_dir)
