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

from actors.llm.config import LLMActors
from simulator.errors import ConfigError


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
