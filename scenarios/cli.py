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
from simulator.errors import ConfigError, GameSpecError, MoralsimError, UnknownNameError
from simulator.games import GAMES, Game, get_game
from simulator.population import STATIC_CODES, parse_population
from simulator.rewards import COMPAT_MODES, MORAL_TYPES
from simulator.storage import is_uri, redact
from simulator.tracking import TRACKERS

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


LLM_CHECKPOINT_EVERY = 25  # iterations: at most ~2 minutes of the CPU demo lost to a crash

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
    p.add_argument("--output", type=output_arg, default=Path("results"),
                   help="root of the datasets: a folder (default results/; on a cluster, one every node mounts) or a "
                        "pyarrow filesystem URI such as s3://bucket/prefix")
    p.add_argument("--random_matching", action="store_true",
                   help="partners are assigned uniformly at random instead of learned selection")
    p.add_argument("--compat", choices=COMPAT_MODES, default="none",
                   help="aies2024 reproduces the anchor's reward defects (DE/mDE as the selected player, VM beta)")
    p.add_argument("--ray_address", default=None, help="join a running Ray cluster (e.g. auto, host:6379 or "
                   "ray://host:10001; refused within 30 s when none answers there); without it a local Ray is started")
    p.add_argument("--num_cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--backend", choices=("ray", "inline"), default="ray",
                   help="ray (default) runs batches as Ray tasks; inline runs them in this process")
    p.add_argument("--runs_per_batch", type=int, default=None,
                   help="runs stacked in one engine (default: spread the runs evenly over the CPUs)")
    p.add_argument("--flush_rows", type=int, default=1 << 18, help="rows per run buffered before a Parquet part is written")
    p.add_argument("--checkpoint_every", type=int, default=None,
                   help="iterations between checkpoints of a batch's whole state (learners, optimisers, buffers, random "
                        f"streams, records written so far); a re-run with the same arguments continues from the last one. "
                        f"Default: {LLM_CHECKPOINT_EVERY} for runs with LLM agents, 0 (none) otherwise: classic runs "
                        "resume run by run")
    p.add_argument("--log_to", choices=TRACKERS, default="none",
                   help="stream reward, cooperation, KL and losses while the run runs: tensorboard "
                   "(<output>/<folder>/tensorboard/) or wandb in offline mode (<output>/<folder>/wandb/); default none")
    llm = p.add_argument_group("LLM agents (--learner llm or <code>@llm entries)")
    llm.add_argument("--llm_model", default="smollm2-135m-instruct",
                     help="local HF folder, hub id, or the embedded smollm2-135m-instruct (default)")
    llm.add_argument("--llm_engine", choices=("hf", "vllm"), default="hf", help="rollout engine (default hf)")
    llm.add_argument("--llm_device", default="cpu", help="torch device of the HF engine and the learners")
    llm.add_argument("--llm_selection", choices=("random", "dqn", "prompt"), default="random",
                     help="how LLM agents choose partners (default random)")
    llm.add_argument("--llm_tokens", default="action12", help="action-token pair, e.g. action12, AB, XY, 01, random:3")
    llm.add_argument("--ppo_batch_size", type=int, default=5,
                     help="samples per PPO update (the paper's job file: 5 against every static opponent, 3 for two "
                          "LLM learners)")
    llm.add_argument("--llm_answer_mode", choices=("free", "mask"), default="free",
                     help="free: sample freely, as the paper (default); mask: restrict answers to the two legal action "
                          "tokens (a logit mask; for models too small to follow the format)")
    llm.add_argument("--llm_rollout_actors", type=int, default=None,
                     help="Ray actors hosting rollout engines (one engine each); 0 = engine and learners in this "
                          "process (default, or the scenario's [llm.actors])")
    llm.add_argument("--llm_learner_actors", type=int, default=None,
                     help="Ray actors hosting the PPO learners (one frozen base each; default 1)")
    llm.add_argument("--llm_overlap", action="store_true", default=None,
                     help="train iteration t while t+1 rolls out (needs rollout actors; one version off-policy, "
                          "with the importance ratio)")
    llm.add_argument("--llm_virtue_reward_models", default=None,
                     help="VR / Game+VR agents: the virtue pipeline's reward_models/ folder (or its output folder); "
                          "default results/virtue_rlaif/reward_models, or the scenario's [llm.virtue]")
    llm.add_argument("--llm_virtue_weight", type=float, default=None,
                     help="VR / Game+VR: weight of the ensemble score in the moral reward (default 1)")
    llm.add_argument("--llm_virtue_lam", type=float, default=None,
                     help="VR / Game+VR: ensemble = mean - lam * std of the three reward models (default 0.5)")
    llm.add_argument("--llm_virtue_reason_tokens", type=int, default=None,
                     help="VR / Game+VR: token limit of the stated reason (default 32; a cut reason is flagged)")
    p.add_argument("--protocol", choices=("population", "pair"), default="population",
                   help="population (AIES, default): every agent selects; pair (ICLR fine-tuning): two agents, one "
                        "game per iteration, slot 0 the row player")
    p.add_argument("--episode_length", type=int, default=0,
                   help="pair protocol: games per episode, after which the state is drawn afresh (the paper: the PPO "
                        "batch size); 0 = one episode")
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
    flags = ("model", "engine", "device", "selection", "tokens", "answer_mode")
    llm = {k: v for k, v in (scenario.llm.items() if scenario else ()) if k not in flags}
    llm.update(model=args.llm_model, engine=args.llm_engine, device=args.llm_device, selection=args.llm_selection,
               tokens=args.llm_tokens, answer_mode=args.llm_answer_mode)
    actors = dict(llm.pop("actors", {}))  # [llm.actors] of the scenario, then the flags
    for flag, key in (("llm_rollout_actors", "rollout_actors"), ("llm_learner_actors", "learner_actors"),
                      ("llm_overlap", "overlap")):
        if getattr(args, flag) is not None:
            actors[key] = getattr(args, flag)
    if actors:
        llm["actors"] = actors
    virtue = dict(llm.pop("virtue", {}))  # [llm.virtue] of the scenario, then the flags
    for key in ("reward_models", "weight", "lam", "reason_tokens"):
        if getattr(args, f"llm_virtue_{key}") is not None:
            virtue[key] = getattr(args, f"llm_virtue_{key}")
    if virtue:
        llm["virtue"] = virtue
    if args.protocol == "pair":  # two agents: the only partner is the other one, nothing to select
        llm["selection"] = "random"
    ppo = dict(scenario.ppo) if scenario else {}
    ppo["batch_size"] = args.ppo_batch_size
    ppo["mini_batch_size"] = min(ppo.get("mini_batch_size", args.ppo_batch_size), args.ppo_batch_size)
    return {"llm": llm, "ppo": ppo}


def _llm_config(options: dict[str, object]):  # type: ignore[no-untyped-def]
    from actors.llm.config import LLMActors, LLMAgentConfig, PPOConfig

    llm = dict(options["llm"])  # type: ignore[call-overload]
    actors = llm.pop("actors", {})
    if not isinstance(actors, dict):
        raise ConfigError(f"[llm.actors] must be a table of actors.llm.resources.LLMActors fields, got {actors!r}")
    unknown = sorted(set(actors) - set(LLMActors.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown [llm.actors] keys {unknown}; valid: {sorted(LLMActors.__dataclass_fields__)}")
    return LLMAgentConfig(**llm, ppo=PPOConfig(**options["ppo"]), actors=LLMActors(**actors))  # type: ignore[arg-type]


def output_arg(text: str) -> Path | str:
    """--output: a URI stays text (Path would fold its '//'), a folder becomes a Path."""
    return text if is_uri(text) else Path(text)


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        scenario = _apply_scenario(parser, args, argv)
        sweep = scenario.sweep if scenario else None
        if sweep is not None:
            parser.set_defaults(destination_folder=None)  # tells a --destination_folder on the command line apart
            if parser.parse_args(argv).destination_folder is not None:
                raise ConfigError(
                    f"--destination_folder cannot be combined with the sweep scenario {args.scenario!r}, which runs "
                    f"{len(sweep.populations)} populations: {', '.join(sweep.populations)}"
                )
        populations = sweep.populations if sweep else (args.destination_folder,)
        has_llm = any(a.learner == "llm" for p in populations for a in parse_population(p).resolved(args.method).agents)
        game = load_game(args.game)
        cfgs = [RunConfig(
            destination_folder=population,
            num_iterations=args.num_iterations,
            num_runs=args.num_runs,
            seed=args.seed,
            game=game,
            method=args.method,
            compat=args.compat,
            random_matching=args.random_matching,
            output=args.output,
            flush_rows=args.flush_rows,
            checkpoint_every=args.checkpoint_every if args.checkpoint_every is not None
            else (LLM_CHECKPOINT_EVERY if has_llm else 0),
            log_to=args.log_to,
            reward_schedule=tuple(tuple(e) for e in (scenario.run.get("reward_schedule", ()) if scenario else ())),
            agent_options=_llm_options(args, scenario) if has_llm else {},
            protocol=args.protocol,
            episode_length=args.episode_length,
        ) for population in populations]
        cfg = cfgs[0]
        # refused before any work: runs that cannot fit in memory, an output folder that cannot be written, a cluster
        # that does not answer
        from simulator.resources import check_run_memory

        check_run_memory(cfgs, args.backend, args.ray_address, args.num_cpus, args.runs_per_batch)
        check_output(args.output)
        if args.backend == "ray" and args.ray_address:
            from simulator.cluster import connect

            connect(args.ray_address)
        from scenarios.factory import AgentSettings, build_groups
        from simulator.driver import run_datasets

        llm = _llm_config(cfg.agent_options) if has_llm else None
        settings = AgentSettings(random_matching=args.random_matching or cfg.protocol == "pair", llm=llm, game=cfg.game,
                                 seed=cfg.seed)
        tables = run_datasets(cfgs, partial(build_groups, settings=settings), backend=args.backend,
                              ray_address=args.ray_address, num_cpus=args.num_cpus,
                              show_progress=False if args.no_progress else None, runs_per_batch=args.runs_per_batch)
        for c, runs in zip(cfgs, tables, strict=True):
            rows = sum(int(r.get("rows", 0)) for r in runs.values())
            log.info("%d runs, %d games in %s", len(runs), rows, redact(c.dataset_location))
        if sweep is not None:  # the point of a sweep is the comparison; render it now that every run is there
            from analysis.dataset import local_copy
            from analysis.sweep import write_sweep_report

            reports = Path("moralsim-reports") if is_uri(args.output) else Path(args.output)
            report = write_sweep_report([local_copy(c.dataset_location) for c in cfgs], reports / sweep.report)
            log.info("sweep report: %s", report.out / "index.html")
    except (MoralsimError, UnknownNameError) as e:
        parser.exit(2, f"main.py: error: {e}\n")
    if has_llm and sweep is None:  # LLM runs are short and their figures (cooperation, illegal answers, KL) are the point
        from analysis.cli import main as analyze

        analyze([cfg.dataset_location])
    if is_uri(cfg.output):
        log.info("read them with: python -m analysis '%s' (copies the committed runs into ~/.cache/moralsim)",
                 redact(cfg.dataset_location))
    else:
        log.info("read them with: polars.scan_parquet('%s/**/*.parquet', hive_partitioning=True)", cfg.dataset_dir)
    return 0
