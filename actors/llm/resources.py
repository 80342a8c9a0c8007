"""Where LLM agents run: the `[llm.actors]` settings and the pure plan that places agents on actors (no Ray here).

    LLMActors(rollout_actors=2, learner_actors=1, ...)      plan(actors, names, device)
        │                                                      │
        ▼                                                      ▼
    rollout actor e  ◄── agents b with b % rollout_actors == e       (one engine, all their adapters)
    learner actor l  ◄── agents b with b % learner_actors == l       (one frozen base, their learners)
    one placement group: a bundle per actor {CPU: c, GPU: g}, strategy PACK (one node) or SPREAD (several)

`rollout_actors = 0` (the default) keeps everything in the driver's process, as before. GPU requests follow the
device: with `device = "cuda"` every actor asks for its `*_gpus` (fractions allowed, so an engine and a learner can
share one GPU: 0.5 + 0.5); on CPU they ask for none. Ray then sets CUDA_VISIBLE_DEVICES in the actor, so the
engine and the learner see exactly the GPU they were given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from simulator.errors import ConfigError, check_positive

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class LLMActors:
    """How many Ray actors host the LLM agents, and what each one asks of the cluster."""

    rollout_actors: int = 0
    """rollout engines, each in its own actor; 0 = engine and learners in the driver's process (no Ray)"""
    learner_actors: int = 1
    """learner actors (each holds one frozen base and the learners of its agents); used when rollout_actors > 0"""
    rollout_cpus: float = 1.0
    rollout_gpus: float = 1.0
    """GPUs per rollout actor when device = "cuda" (fractions allowed); ignored on CPU"""
    learner_cpus: float = 1.0
    learner_gpus: float = 1.0
    """GPUs per learner actor when device = "cuda"; ignored on CPU"""
    gpu_memory_utilization: float = 0.4
    """vLLM's share of its GPU's memory (KV cache + weights); leave room for a learner on the same GPU"""
    placement: str = "PACK"
    """placement-group strategy: PACK (fill one node first), SPREAD (across nodes), or their STRICT_ forms"""
    placement_timeout_s: float = 120.0
    """how long to wait for the cluster to fit every bundle; a bundle that cannot fit would otherwise wait forever"""
    overlap: bool = False
    """train iteration t while iteration t+1 rolls out: one version off-policy at most, with the importance ratio"""

    def __post_init__(self) -> None:
        if self.rollout_actors < 0 or self.learner_actors < 1:
            raise ConfigError(
                f"rollout_actors must be >= 0 and learner_actors >= 1, got {self.rollout_actors} and {self.learner_actors}"
            )
        check_positive("llm.actors", self, ("rollout_cpus", "learner_cpus"))  # every bundle needs a resource, torch a thread
        for name in ("rollout_gpus", "learner_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"llm.actors.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.placement not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"unknown placement {self.placement!r}; valid: {', '.join(PLACEMENT_STRATEGIES)}")
        if self.placement_timeout_s <= 0:
            raise ConfigError(f"placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.overlap and self.rollout_actors == 0:
            raise ConfigError("overlap needs the learners on their own actors: set llm.actors.rollout_actors >= 1")

    @property
    def enabled(self) -> bool:
        return self.rollout_actors > 0


@dataclass(frozen=True)
class ActorSpec:
    role: str  # "rollout" | "learner"
    index: int
    names: tuple[str, ...]  # the agents it serves
    num_cpus: float
    num_gpus: float
    bundle: int  # its bundle in the placement group


@dataclass(frozen=True)
class Plan:
    rollout: tuple[ActorSpec, ...]
    learner: tuple[ActorSpec, ...]
    device: str
    bundles: tuple[dict[str, float], ...] = field(default=())

    def rollout_of(self, name: str) -> int:
        return next(s.index for s in self.rollout if name in s.names)

    def learner_of(self, name: str) -> int:
        return next(s.index for s in self.learner if name in s.names)


def plan(actors: LLMActors, names: list[str], device: str = "cpu") -> Plan:
    """Agents round-robin over the rollout actors and the learner actors; one bundle per actor."""
    if not actors.enabled:
        raise ConfigError("no actors to plan: llm.actors.rollout_actors is 0 (everything runs in process)")
    if not names:
        raise ConfigError("no LLM agents to place")
    gpu = device.startswith("cuda")
    specs: dict[str, list[ActorSpec]] = {"rollout": [], "learner": []}
    bundles: list[dict[str, float]] = []
    for role, count, cpus, gpus in (
        ("rollout", actors.rollout_actors, actors.rollout_cpus, actors.rollout_gpus),
        ("learner", actors.learner_actors, actors.learner_cpus, actors.learner_gpus),
    ):
        count = min(count, len(names))  # an actor without agents would hold a model for nothing
        for k in range(count):
            mine = tuple(n for b, n in enumerate(names) if b % count == k)
            g = gpus if gpu else 0.0
            bundle = {"CPU": cpus} | ({"GPU": g} if g else {})
            specs[role].append(ActorSpec(role, k, mine, cpus, g, len(bundles)))
            bundles.append(bundle)
    return Plan(tuple(specs["rollout"]), tuple(specs["learner"]), device, tuple(bundles))
