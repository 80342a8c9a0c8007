"""Live training metrics: a run's curves streamed to TensorBoard or offline W&B while it runs.

The Parquet records stay the source of truth; a tracker only lets a long (GPU) run be watched. One tracker per run:

    kind          writes to                                        watch with
    none          nothing
    tensorboard   <dataset dir>/tensorboard/run=<k>/events.out.*   tensorboard --logdir <dataset dir>/tensorboard
    wandb         <dataset dir>/wandb/offline-run-*/ (offline)     wandb sync <dataset dir>/wandb/offline-run-*

What is logged, per run and iteration (the step is the iteration):

    game/cooperation        share of C among the iteration's moves, both roles (selector_action, selected_action == 0)
    game/payoff             mean payoff of those moves
    game/learning_reward    mean learning reward of the learners' moves (static strategies have none)
    agents/<column>         mean of each numeric column the agents add to the records (LLM: legal, p_cooperate, kl,
                            policy_loss, value_loss, adapter_version), both roles
    learn/<stat>            what the learners' learn() returned (DQN dilemma_td2, PPO ppo_updates, ...); these come
                            from the stacked learners of the whole batch, so every run of a batch shows the same value

LLM runs log every iteration; classic runs (cheap iterations, 30,000 of them) every num_iterations // 1000 iterations
and the last one, so a run draws at most about 1,000 points and tracking costs nothing measurable.

tensorboard and wandb are imported only when asked for, so `simulator` imports without them.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from simulator.engine import IterationRecords
from simulator.errors import ConfigError

log = logging.getLogger("moralsim.tracking")

TRACKERS = ("none", "tensorboard", "wandb")
TRACKED_POINTS = 1000  # about this many points per classic run (see the module docstring)


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar metrics at this step (the iteration); NaN values are skipped."""

    def close(self) -> None:
        """Flush everything to disk; the tracker is not used afterwards."""


def check_tracker(kind: str) -> str:
    if kind not in TRACKERS:
        raise ConfigError(f"unknown tracker {kind!r} for log_to; valid: {', '.join(TRACKERS)}")
    return kind


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    # a NaN (no learner in the run, no PPO update yet) would draw as a gap or break W&B's summary
    return {k: float(v) for k, v in metrics.items() if not math.isnan(v)}


class NullTracker:
    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        return None

    def close(self) -> None:
        return None


class TensorBoardTracker:
    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"log_to='tensorboard' needs the tensorboard package: pip install tensorboard ({e})") from e
        # a restarted run replays its iterations from the seed; stale events from the failed attempt would double them
        shutil.rmtree(log_dir, ignore_errors=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in _finite(metrics).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, dataset_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"log_to='wandb' needs the wandb package: pip install wandb ({e})") from e
        dataset_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode="offline",  # never online: no network is assumed, and CI has no stdin for a login prompt
            dir=str(dataset_dir),  # wandb adds wandb/offline-run-<time>-<id>/ below it
            project="moralsim",
            name=f"{dataset_dir.name}/{run_name}",
            config=dict(config),
            reinit="create_new",  # the runs of a batch are tracked side by side in one process
            settings=wandb.Settings(
                silent=True,
                console="off",  # leave stdout to the progress bar and logging
                x_disable_stats=True,  # no system-metrics sampler on a machine the runs already fill
            ),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(_finite(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, log_dir: Path, run_name: str, config: Mapping[str, Any]) -> Tracker:
    """A tracker of this kind for one run. log_dir: the dataset directory, each kind writes below it (table above);
    run_name: the run's partition name, run=<k>; config: plain JSON data recorded with the curves."""
    check_tracker(kind)
    log_dir = Path(log_dir)
    tracker: Tracker
    if kind == "tensorboard":
        tracker = TensorBoardTracker(log_dir / "tensorboard" / run_name, config)
    elif kind == "wandb":
        tracker = WandbTracker(log_dir, run_name, config)
    else:
        tracker = NullTracker()
    log.debug("tracking %s with %s under %s", run_name, kind, log_dir)
    return tracker


def track_every(num_iterations: int, llm: bool) -> int:
    """Iterations between two logged points (the last iteration is logged too)."""
    return 1 if llm else max(1, num_iterations // TRACKED_POINTS)


def _mean(a: np.ndarray) -> np.ndarray:
    """(R,) mean over each run's row of a (R, K) array, ignoring NaN; NaN where a row has no value."""
    a = a.astype(np.float64, copy=False)
    n = (~np.isnan(a)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(a, axis=1) / n, np.nan)


def iteration_metrics(rec: IterationRecords) -> list[dict[str, float]]:
    """The tracked metrics of one iteration, one dict per run of the batch (names in the module docstring)."""
    both = lambda a, b: np.concatenate([a, b], axis=1)  # (R, 2G): every move of the iteration
    columns = {
        "game/cooperation": both(rec.selector_action == 0, rec.selected_action == 0),
        "game/payoff": both(rec.selector_payoff, rec.selected_payoff),
        "game/learning_reward": both(rec.selector_learning_reward, rec.selected_learning_reward),
    }
    for name, col in rec.extra.items():
        role, _, base = name.partition("_")
        if role == "selector" and col.dtype.kind in "biuf" and f"selected_{base}" in rec.extra:
            columns[f"agents/{base}"] = both(col, rec.extra[f"selected_{base}"])
    means = {k: _mean(v) for k, v in columns.items()}
    learned = {f"learn/{k}": float(v) for k, v in rec.learn_stats.items() if isinstance(v, numbers.Real)}
    return [{**{k: float(v[r]) for k, v in means.items()}, **learned} for r in range(rec.selector_action.shape[0])]
