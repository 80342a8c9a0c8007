"""Command line of moralsim; `python main.py ...` and the `moralsim` console script both land here.

Anchor-compatible:  python main.py --destination_folder 1xUT_1xaUT_1xDE --num_iterations 30000 --num_runs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from scenarios.scenario import Scenario, load_scenario
from simulator.config import RunConfig
from simulator.errors import GameSpecError, MoralsimError, UnknownNameError
from simulator.games import GAMES, Game, get_game
from simulator.population import STATIC_CODES, parse_population
from simulator.rewards import COMPAT_MODES, MORAL_TYPES

log = logging.getLogger("moralsim")

DEFAULT_POPULATION = "1xUT_1xaUT_1xDE"
_METHODS = {"dqn": "dqn", "tabularq": "tabularQ", "llm": "llm"}


def _method(text: str) -> str:
    try:
        return _METHODS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; valid: DQN, tabularQ, llm") from None


def load_game(spec: str) -> Game:
    """A game id (IPD, ISH, ...) or a path to a TOML/JSON file holding one custom payoff table."""
    path = Path(spec)
    if path.suffix in (".toml", ".json") and path.exists():
        try:
            data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise GameSpecError(f"cannot parse game file {path}: {e}") from e
        return Game.from_mapping(data.get("game", data))
    return get_game(spec)


def build_parser() -> argparse.ArgumentParser:
    codes = ", ".join(f"{c} ({t.name})" for c, t in MORAL_TYPES.items() if t.family == "aies")
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Population simulator for moral learning agents in social dilemmas (AIES 2024 protocol).",
        epilog=(
            f"Moral types: {codes}. Static strategies: {', '.join(STATIC_CODES)}. "
            "Mixed learners: append @<kind> to an entry, e.g. 2xUT@llm_1xDE@dqn_1xTFT. "
            "Records: <output>/<destination_folder>/run=<k>/part-*.parquet; re-running the same command resumes."
        ),
    )
    p.add_argument("--destination_folder", default=DEFAULT_POPULATION,
                   help=f"population as <count>x<code> joined by '_' (default {DEFAULT_POPULATION}); also the output folder name")
    p.add_argument("--num_iterations", type=int, default=30000, help="iterations (episodes) per run (default 30000)")
    p.add_argument("--num_runs", type=int, default=20, help="independent seeded runs (default 20)")
    p.add_argument("--method", "--learner", dest="method", type=_method, default="dqn",
                   help="learner for the moral types: DQN (default), tabularQ or llm (case-insensitive)")
    p.add_argument("--scenario", default=None,
                   help="a named experiment (e.g. iclr2025/de_vs_tft_smollm2) or a .toml file; flags given too win")
    p.add_argument("--game", default="IPD",
                   help=f"game id ({', '.join(GAMES)}) or a .toml/.json file with id, CC, CD, DC, DD (default IPD)")
    p.add_argument("--seed", type=int, default=0, help="root seed; run k uses SeedSequence(seed, spawn_key=(k,)) (default 0)")
    p.add_argument("--output", type=Path, default=Path("results"), help="root folder of the datasets (default results/)")
    p.add_argument("--random_matching", action="store_true",
                   help="partners are assigned uniformly at random instead of learned selection")
    p.add_argument("--compat", choices=COMPAT_MODES, default="none",
                   help="aies2024 reproduces the anchor's reward defects (DE/mDE as the selected player, VM beta)")
    p.add_argument("--ray_address", default=None, help="join a running Ray cluster (e.g. auto or ray://host:10001); "
                   "without it a local Ray is started")
    p.add_argument("--num_cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--backend", choices=("ray", "inline"), default="ray",
                   help="ray (default) runs batches as Ray tasks; inline runs them in this process")
    p.add_argument("--runs_per_batch", type=int, default=None,
                   help="runs stacked in one engine (default: spread the runs evenly over the CPUs)")
    p.add_argument("--flush_rows", type=int, default=1 << 18, help="rows per run buffered before a Parquet part is written")
    llm = p.add_argument_group("LLM agents (--learner llm or <code>@llm entries)")
    llm.add_argument("--llm_model", default="smollm2-135m-instruct",
                     help="local HF folder, hub id, or the embedded smollm2-135m-instruct (default)")
    llm.add_argument("--llm_engine", choices=("hf", "vllm"), default="hf", help="rollout engine (default hf)")
    llm.add_argument("--llm_device", default="cpu", help="torch device of the HF engine and the learners")
    llm.add_argument("--llm_selection", choices=("random", "dqn", "prompt"), default="random",
                     help="how LLM agents choose partners (default random)")
    llm.add_argument("--llm_tokens", default="action12", help="action-token pair, e.g. action12, AB, XY, 01, random:3")
    llm.add_argument("--ppo_batch_size", type=int, default=5, help="samples per PPO update (paper: 5; 3 against TFT)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _apply_scenario(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> Scenario | None:
    """Scenario values become the defaults; flags given on the command line keep their values."""
    if not args.scenario:
        return None
    scenario = load_scenario(args.scenario)
    defaults = {k: v for k, v in scenario.run.items() if k != "reward_schedule"}
    defaults.update({f"llm_{k}": v for k, v in scenario.llm.items()})
    if "batch_size" in scenario.ppo:
        defaults["ppo_batch_size"] = scenario.ppo["batch_size"]
    if "method" in defaults:
        defaults["method"] = _method(str(defaults["method"]))
    parser.set_defaults(**defaults)
    args.__dict__.update(vars(parser.parse_args(argv)))
    return scenario


def _llm_options(args: argparse.Namespace, scenario: Scenario | None) -> dict[str, object]:
    """LLM settings as plain data (recorded in the manifest; a resumed run must match them)."""
    llm = {k: v for k, v in (scenario.llm.items() if scenario else ()) if k not in ("model", "engine", "device",
                                                                                    "selection", "tokens")}
    llm.update(model=args.llm_model, engine=args.llm_engine, device=args.llm_device, selection=args.llm_selection,
               tokens=args.llm_tokens)
    ppo = dict(scenario.ppo) if scenario else {}
    ppo["batch_size"] = args.ppo_batch_size
    ppo["mini_batch_size"] = min(ppo.get("mini_batch_size", args.ppo_batch_size), args.ppo_batch_size)
    return {"llm": llm, "ppo": ppo}


def _llm_config(options: dict[str, object]):  # type: ignore[no-untyped-def]
    from actors.llm.agent import LLMAgentConfig
    from actors.llm.learner import PPOConfig

    llm = dict(options["llm"])  # type: ignore[call-overload]
    return LLMAgentConfig(**llm, ppo=PPOConfig(**options["ppo"]))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "analyze":
        from analysis.cli import main as analyze

        return analyze(argv[1:], prog="moralsim analyze")
    if argv and argv[0] == "evaluate":
        from scenarios.evaluate import main as evaluate

        return evaluate(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        scenario = _apply_scenario(parser, args, argv)
        has_llm = any(a.learner == "llm" for a in parse_population(args.destination_folder).resolved(args.method).agents)
        cfg = RunConfig(
            destination_folder=args.destination_folder,
            num_iterations=args.num_iterations,
            num_runs=args.num_runs,
            seed=args.seed,
            game=load_game(args.game),
            method=args.method,
            compat=args.compat,
            random_matching=args.random_matching,
            output=args.output,
            flush_rows=args.flush_rows,
            reward_schedule=tuple(tuple(e) for e in (scenario.run.get("reward_schedule", ()) if scenario else ())),
            agent_options=_llm_options(args, scenario) if has_llm else {},
        )
        from scenarios.factory import AgentSettings, build_groups
        from simulator.driver import run_sweep

        llm = _llm_config(cfg.agent_options) if has_llm else None
        settings = AgentSettings(random_matching=args.random_matching, llm=llm, game=cfg.game, seed=cfg.seed)
        runs = run_sweep(cfg, partial(build_groups, settings=settings), backend=args.backend,
                         ray_address=args.ray_address, num_cpus=args.num_cpus,
                         show_progress=False if args.no_progress else None, runs_per_batch=args.runs_per_batch)
    except (MoralsimError, UnknownNameError) as e:
        parser.exit(2, f"main.py: error: {e}\n")
    if has_llm:  # LLM runs are short and their figures (cooperation, illegal answers, KL) are the point
        from analysis.cli import main as analyze

        analyze([str(cfg.dataset_dir)])
    rows = sum(int(r.get("rows", 0)) for r in runs.values())
    log.info("%d runs, %d games in %s", len(runs), rows, cfg.dataset_dir)
    log.info("read them with: polars.scan_parquet('%s/**/*.parquet', hive_partitioning=True)", cfg.dataset_dir)
    return 0
