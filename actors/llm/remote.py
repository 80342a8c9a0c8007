"""LLM agents on Ray actors: thin shells over the plain engine and learner classes, and the proxies the driver uses.

    driver process (LLMGroup: prompts, parsing, buffers, the batched protocol)
      │ RemoteEngine (a RolloutEngine)                  RemoteLearners (a LearnerPool)
      │   one generate/score call per engine,             one step call per job, learners in parallel
      │   requests routed by adapter                      │
      ▼                                                   ▼
    RolloutActor e ── make_engine(): vLLM | HF        LearnerActor l ── LearnerGroup: one frozen base, PPOLearners
      ▲                                                   │ step(job) returns (stats, AdapterWeights) as two objects
      └──── load_adapter(AdapterRef.ref) ◄────────────────┘ the weights go learner -> object store -> engine

Path of one decision: LLMGroup.act builds the prompts -> RemoteEngine.generate splits them by the engine that serves
each agent's adapter -> every RolloutActor runs its share as one batch, all in parallel -> results come back in order.
Path of one update: LLMGroup.learn -> RemoteLearners.submit: LearnerActor.step runs PPO and exports the adapter ->
the driver hands the adapter's ObjectRef (not the tensors) to RemoteEngine.load_adapter -> the RolloutActor writes
a fresh versioned peft folder and registers it (actors/llm/vllm_engine.py) before any later generate: calls from
one caller to one actor run in the order sent.

Shells hold no logic: `RolloutActor` wraps any RolloutEngine, `LearnerActor` wraps a LearnerGroup, each built by
a picklable factory, so tests use the plain classes without Ray and can hand the shells a scripted engine.
An engine that dies (vLLM's EngineDeadError) takes its actor down (`os._exit`), so Ray restarts the actor
(`max_restarts`) instead of leaving a process that answers every call with an error. `max_task_retries` stays 0:
an actor error may hide a call that did run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from actors.llm.config import PPOConfig
from actors.llm.engine import AdapterWeights, GenerationRequest, GenerationResult, check_version
from actors.llm.learners import LearnerGroup, StepJob, StepResult
from actors.llm.resources import LLMActors, Plan, plan
from actors.llm.weight_sync import AdapterRef
from simulator.errors import ConfigError, WorkerLostError

log = logging.getLogger(__name__)

MAX_RESTARTS = 3


def _placement(device: str) -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": device,
        "restarted": bool(ctx.was_current_actor_reconstructed),
    }


def _engine_died(exc: BaseException) -> bool:
    return type(exc).__name__ == "EngineDeadError"  # vllm.v1.engine.exceptions; not imported for the HF engine


class RolloutActor:
    """Ray shell over one RolloutEngine."""

    def __init__(self, factory: Callable[[], Any], device: str = "cpu") -> None:
        self.device = device
        self.engine = factory()

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            if _engine_died(exc):  # a dead vLLM engine never recovers in this process: let Ray restart the actor
                log.error("rollout engine died (%s); exiting so Ray restarts this actor", exc)
                os._exit(1)
            raise

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self._guard(self.engine.generate, requests)  # type: ignore[no-any-return]

    def score_batch(self, adapters: list[str | None], prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        return self._guard(self.engine.score_batch, adapters, prompts, completions)  # type: ignore[no-any-return]

    def load_adapter(self, weights: AdapterWeights, restore: bool = False) -> float:
        """Serve these weights; returns the seconds the engine took (write + register)."""
        t0 = time.perf_counter()
        self._guard(self.engine.load_adapter, weights, restore)
        return time.perf_counter() - t0

    def adapter_version(self, adapter: str) -> int:
        return int(self.engine.adapter_version(adapter))

    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.engine.eos_ids)

    def placement(self) -> dict[str, Any]:
        return _placement(self.device)

    def die(self) -> None:
        """For failure tests: end this process the way a crash would."""
        os._exit(1)


class LearnerActor:
    """Ray shell over one LearnerGroup."""

    def __init__(self, factory: Callable[[], Any], device: str = "cpu") -> None:
        self.device = device
        self.group = factory()

    def step(self, job: StepJob) -> tuple[dict[str, float], AdapterWeights]:
        r = self.group.step(job)
        return r.stats, r.weights

    def export(self, name: str) -> AdapterWeights:
        (w,) = self.group.export([name])
        return w  # type: ignore[no-any-return]

    def versions(self) -> dict[str, int]:
        return dict(self.group.versions())

    def logprobs(self, name: str, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        return list(self.group.logprobs(name, prompt_ids, completion_ids))

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        return dict(self.group.state_dicts())

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        self.group.load_state_dicts(states)

    def placement(self) -> dict[str, Any]:
        return _placement(self.device)

    def die(self) -> None:
        os._exit(1)


# ── proxies used by the driver ──────────────────────────────────────────────────────────────────────────────────


class RemoteEngine:
    """A RolloutEngine over several rollout actors: each adapter lives on one of them (`route`)."""

    def __init__(self, actors: Sequence[Any], route: dict[str, int], tokenizer: Any, eos_ids: Sequence[int]) -> None:
        self.actors = list(actors)
        self.route = dict(route)
        self.tokenizer = tokenizer
        self.eos_ids = tuple(eos_ids)
        self._versions: dict[str, int] = {}
        self._latest: dict[str, Any] = {}  # per adapter, the payload last sent (re-sent to a restarted engine)
        self._loads: list[tuple[int, Any]] = []  # (engine, ref) of loads not yet confirmed (they run before later calls)
        self.sync_seconds: list[float] = []  # per loaded adapter version: the engine-side load time
        self.restarts = 0  # rollout actors found restarted (and re-served) during calls

    def _shard(self, adapter: str | None) -> int:
        return 0 if adapter is None else self.route.get(adapter, 0)

    def _call(self, calls: list[tuple[int, str, tuple[Any, ...]]]) -> list[Any]:
        """Run (engine, method, args) calls, one per engine, in parallel, and confirm every pending load with them.

        A rollout actor that died (killed, or its engine dead) is restarted by Ray; its calls then wait for it, it is
        served every adapter it holds again, and they run again. Generation is a function of the request seeds, so
        the repeated call returns what the lost one would have, and nothing was recorded from the lost one."""
        import ray

        loads, self._loads = self._loads, []
        refs = [r for _, r in loads] + [getattr(self.actors[e], m).remote(*a) for e, m, a in calls]
        out: list[Any] = []
        revived: set[int] = set()
        for k, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                engine = loads[k][0] if k < len(loads) else calls[k - len(loads)][0]
                if engine not in revived:
                    self._revive(engine, e)
                    revived.add(engine)
                out.append(None if k < len(loads) else self._call([calls[k - len(loads)]])[0])
        self.sync_seconds.extend(float(s) for s in out[: len(loads)] if s is not None)
        return out[len(loads) :]

    def _revive(self, engine: int, error: BaseException) -> None:
        """Wait for Ray to restart rollout actor `engine`, then serve it every adapter it holds again."""
        import ray

        log.warning("rollout actor %d lost (%s); waiting for its restart", engine, type(error).__name__)
        wait_until_back(self.actors[engine])
        self.restarts += 1
        mine = [(n, p) for n, p in self._latest.items() if self._shard(n) == engine]
        ray.get([self.actors[engine].load_adapter.remote(p, True) for _, p in mine])
        log.warning("rollout actor %d is back; %d adapters served again", engine, len(mine))

    def _split(self, adapters: Sequence[str | None]) -> dict[int, list[int]]:
        parts: dict[int, list[int]] = {}
        for k, a in enumerate(adapters):
            parts.setdefault(self._shard(a), []).append(k)
        return parts

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        parts = self._split([r.adapter for r in requests])
        calls = [(e, "generate", ([requests[k] for k in ks],)) for e, ks in parts.items()]
        out: list[GenerationResult | None] = [None] * len(requests)
        for ks, results in zip(parts.values(), self._call(calls), strict=True):
            for k, res in zip(ks, results, strict=True):
                out[k] = res
        return [r for r in out if r is not None]

    def score_batch(
        self, adapters: Sequence[str | None], prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        if not (len(adapters) == len(prompts) == len(completions)):
            raise ValueError("adapters, prompts and completions must have the same length")
        parts = self._split(adapters)
        calls = [(e, "score_batch", ([adapters[k] for k in ks], [list(prompts[k]) for k in ks],
                                      [list(completions[k]) for k in ks])) for e, ks in parts.items()]
        out: list[list[float]] = [[] for _ in adapters]
        for ks, rows in zip(parts.values(), self._call(calls), strict=True):
            for k, row in zip(ks, rows, strict=True):
                out[k] = row
        return out

    def score(self, adapter: str | None, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        return self.score_batch([adapter], [prompt_ids], [completion_ids])[0]

    def load_adapter(self, weights: AdapterWeights | AdapterRef, restore: bool = False) -> None:
        """Queue the load on the adapter's engine; it runs before any later call to that engine (Ray keeps one
        caller's calls to one actor in order) and is confirmed with the next call's results."""
        check_version(weights.name, weights.version, self._versions.get(weights.name), restore)
        payload = weights.ref if isinstance(weights, AdapterRef) else weights
        engine = self._shard(weights.name)
        self._loads.append((engine, self.actors[engine].load_adapter.remote(payload, restore)))
        self._versions[weights.name] = weights.version
        self._latest[weights.name] = payload

    def adapter_version(self, adapter: str) -> int:
        """The version this proxy has sent (loads are confirmed with the next call; a failed one raises there)."""
        if adapter not in self._versions:
            from simulator.errors import UnknownNameError

            raise UnknownNameError("adapter", adapter, self._versions)
        return self._versions[adapter]

    def flush(self) -> None:
        """Wait for every queued load."""
        self._call([])

    def close(self) -> None:
        return None  # the actors belong to the Cluster, which ends them (Cluster.close)


@dataclass
class RemoteStep:
    name: str
    stats_ref: Any
    weights_ref: Any

    def done(self) -> bool:
        import ray

        ready, _ = ray.wait([self.stats_ref], timeout=0)
        return bool(ready)

    def result(self) -> StepResult:
        import ray

        try:
            stats = ray.get(self.stats_ref)
        except ray.exceptions.RayActorError as e:  # the learner's state is gone with it: back to a checkpoint
            raise WorkerLostError(f"the learner actor of {self.name} died during its PPO step ({type(e).__name__})") \
                from e
        version = int(stats["version"])
        return StepResult(self.name, stats, version, AdapterRef(self.name, version, self.weights_ref))


class RemoteLearners:
    """A LearnerPool over learner actors: each agent's learner lives on one of them (`route`)."""

    def __init__(self, actors: Sequence[Any], route: dict[str, int]) -> None:
        self.actors = list(actors)
        self.route = dict(route)

    def submit(self, jobs: Sequence[StepJob]) -> list[RemoteStep]:
        out = []
        for job in jobs:
            stats_ref, weights_ref = self.actors[self.route[job.name]].step.options(num_returns=2).remote(job)
            out.append(RemoteStep(job.name, stats_ref, weights_ref))
        return out

    def export(self, names: Sequence[str]) -> list[AdapterRef]:
        versions = self.versions()
        return [AdapterRef(n, versions[n], self.actors[self.route[n]].export.remote(n)) for n in names]

    def versions(self) -> dict[str, int]:
        import ray

        out: dict[str, int] = {}
        for v in ray.get([a.versions.remote() for a in self.actors]):
            out.update(v)
        return out

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        import ray

        out: dict[str, dict[str, Any]] = {}
        for states in ray.get([a.state_dicts.remote() for a in self.actors]):
            out.update(states)
        return out

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        import ray

        for a in self.actors:  # a learner actor that died is being restarted by Ray: wait for it
            wait_until_back(a)
        ray.get([a.load_state_dicts.remote({n: st for n, st in states.items() if self.route[n] == k})
                 for k, a in enumerate(self.actors)])

    def close(self) -> None:
        return None


def wait_until_back(actor: Any, timeout_s: float = 300.0) -> dict[str, Any]:
    """Block until `actor` answers (Ray restarts a dead actor with max_restarts); its placement info."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.placement.remote(), timeout=timeout_s)  # type: ignore[no-any-return]
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ── launching ───────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass
class Cluster:
    """The actors of one LLMGroup and the placement group that holds them."""

    plan: Plan
    engine: RemoteEngine
    learners: RemoteLearners
    rollout_actors: list[Any]
    learner_actors: list[Any]
    placement_group: Any
    started_s: float = 0.0
    info: list[dict[str, Any]] = field(default_factory=list)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in [*self.rollout_actors, *self.learner_actors]:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.placement_group)


def _ready_placement_group(bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> Any:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ConfigError(
            f"the Ray cluster cannot fit the LLM actors' bundles {bundles} ({strategy}) within {timeout_s:.0f} s; "
            f"it has {ray.cluster_resources()} in total and {ray.available_resources()} free. Lower "
            "llm.actors.rollout_actors/learner_actors or their cpus/gpus, or add nodes."
        ) from None
    return pg


def launch(
    actors_cfg: LLMActors,
    names: list[str],
    specs: Sequence[tuple[str, PPOConfig]],
    engine_factory: Callable[[list[str]], Callable[[], Any]],
    learner_factory: Callable[[list[tuple[str, PPOConfig]]], Callable[[], Any]],
    tokenizer: Any,
    device: str = "cpu",
) -> Cluster:
    """Place every agent's engine and learner on actors (resources.plan), in one placement group, and wait for them.

    engine_factory(names) / learner_factory(specs) return the picklable zero-argument builders the shells call.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    t0 = time.perf_counter()
    p = plan(actors_cfg, names, device)
    if not ray.is_initialized():  # a local Ray of our own: declare enough logical CPUs for every actor's bundle
        from simulator.cluster import connect

        needed = sum(b.get("CPU", 0.0) for b in p.bundles)
        connect(None, num_cpus=max(os.cpu_count() or 1, int(-(-needed // 1))))
    pg = _ready_placement_group(list(p.bundles), actors_cfg.placement, actors_cfg.placement_timeout_s)
    spec_of = dict(specs)

    def options(cpus: float, gpus: float, bundle: int) -> dict[str, Any]:
        return dict(
            num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_RESTARTS, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
        )

    rollout: list[Any] = [
        ray.remote(RolloutActor).options(**options(s.num_cpus, s.num_gpus, s.bundle)).remote(  # type: ignore[attr-defined]
            engine_factory(list(s.names)), device)
        for s in p.rollout
    ]
    learner: list[Any] = [
        ray.remote(LearnerActor).options(**options(s.num_cpus, s.num_gpus, s.bundle)).remote(  # type: ignore[attr-defined]
            learner_factory([(n, spec_of[n]) for n in s.names]), device)
        for s in p.learner
    ]
    info = ray.get([a.placement.remote() for a in [*rollout, *learner]])  # waits for every constructor
    eos = ray.get(rollout[0].eos_ids.remote())
    engine = RemoteEngine(rollout, {n: s.index for s in p.rollout for n in s.names}, tokenizer, eos)
    learners = RemoteLearners(learner, {n: s.index for s in p.learner for n in s.names})
    seconds = time.perf_counter() - t0
    log.info("LLM actors up in %.1f s: %d rollout, %d learner; %s", seconds, len(rollout), len(learner), info)
    return Cluster(p, engine, learners, rollout, learner, pg, seconds, info)


def learner_group_factory(
    model_dir: str, device: str, dtype: str = "float32", quantize: str = "none"
) -> Callable[[list[tuple[str, PPOConfig]]], Callable[[], Any]]:
    def make(specs: list[tuple[str, PPOConfig]]) -> Callable[[], Any]:
        return partial(LearnerGroup, model_dir, specs, device, dtype, quantize)

    return make
