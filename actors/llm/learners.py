"""`LearnerGroup`: the PPO learners of a group of LLM agents over one frozen base, as one plain object.

    LearnerGroup (one process: the driver, or one learner actor, actors/llm/remote.py)
      PolicyHost ── one frozen base model
        ├── PPOLearner "run0-slot0": LoRA adapter, value head, Adam, KL controller, score moments
        └── PPOLearner "run0-slot3": ...
      submit(jobs) ──► one PPO step per job, in order ──► StepResult(name, stats, version, weights)

A step's result carries the adapter it produced (`AdapterWeights`, the payload of the weight sync,
actors/llm/weight_sync.py), so one call both trains and hands over what the rollout engine must load next.
`submit` returns `StepHandle`s: here they are complete on return; the Ray pool (actors/llm/remote.py) returns
handles that complete when the learner actor does, so the caller may overlap rollouts with updates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from actors.llm.engine import AdapterWeights
from actors.llm.learner import PolicyHost, PPOConfig, PPOLearner
from simulator.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class StepJob:
    """One PPO update for one agent: `batch_size` samples (see PPOLearner.step)."""

    name: str
    queries: list[list[int]]
    responses: list[list[int]]
    scores: list[float]
    behaviour_logprobs: list[list[float]] | None = None
    versions: list[int] | None = None
    allowed: list[list[list[int]] | None] | None = None


@dataclass(frozen=True)
class StepResult:
    name: str
    stats: dict[str, float]
    version: int  # the learner's version after the step (= weights.version)
    weights: Any  # AdapterWeights in process; a Ray ObjectRef to them from a learner actor (never pulled here)


class StepHandle(Protocol):
    name: str

    def done(self) -> bool: ...

    def result(self) -> StepResult:
        """Block until the step finished; raises what the step raised."""
        ...


@dataclass
class DoneStep:
    """A step that already ran (in this process)."""

    name: str
    value: StepResult

    def done(self) -> bool:
        return True

    def result(self) -> StepResult:
        return self.value


@runtime_checkable
class LearnerPool(Protocol):
    """What LLMGroup needs from its learners, in process (LearnerGroup) or on Ray actors (remote.RemoteLearners)."""

    def submit(self, jobs: Sequence[StepJob]) -> list[StepHandle]:
        """Start one PPO step per job; jobs for one agent run in the order given."""
        ...

    def export(self, names: Sequence[str]) -> list[Any]:
        """Each agent's current adapter (AdapterWeights, or a handle a rollout engine proxy can load)."""
        ...

    def versions(self) -> dict[str, int]: ...

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        """Every learner's checkpoint state, by agent name (CPU tensors and plain values)."""
        ...

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class LearnerGroup:
    """The learners of some agents on one PolicyHost (see module docstring)."""

    def __init__(self, model_dir: str | os.PathLike[str], specs: Sequence[tuple[str, PPOConfig]], device: str = "cpu",
                 dtype: str = "float32", quantize: str = "none"):
        """dtype: float32, bfloat16 or bf16-mixed (actors/llm/models.py); adapters, value heads and Adam stay float32;
        quantize: nf4 / nf4_double, a 4-bit base (PolicyHost)."""
        if not specs:
            raise ConfigError("a learner group needs at least one agent")
        names = [n for n, _ in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"agent names must be unique in a learner group, got {names}")
        from actors.llm.models import weights_dtype

        torch_dtype, mixed = weights_dtype(dtype)
        self.host = PolicyHost(model_dir, device=device, dtype=torch_dtype, quantize=quantize, mixed=mixed)
        self.learners = {name: PPOLearner(self.host, name, cfg) for name, cfg in specs}

    @property
    def tokenizer(self) -> Any:
        return self.host.tokenizer

    def _learner(self, name: str) -> PPOLearner:
        try:
            return self.learners[name]
        except KeyError:
            raise UnknownNameError("agent", name, self.learners) from None

    def step(self, job: StepJob) -> StepResult:
        learner = self._learner(job.name)
        stats = learner.step(job.queries, job.responses, job.scores, behaviour_logprobs=job.behaviour_logprobs,
                             versions=job.versions, allowed=job.allowed)
        return StepResult(job.name, stats, learner.version, learner.export_adapter())

    def submit(self, jobs: Sequence[StepJob]) -> list[StepHandle]:
        return [DoneStep(job.name, self.step(job)) for job in jobs]

    def export(self, names: Sequence[str]) -> list[AdapterWeights]:
        return [self._learner(n).export_adapter() for n in names]

    def versions(self) -> dict[str, int]:
        return {name: learner.version for name, learner in self.learners.items()}

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        """Every learner's checkpoint state (PPOLearner.state_dict), by agent name."""
        return {name: learner.state_dict() for name, learner in self.learners.items()}

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        for name, state in states.items():
            self._learner(name).load_state_dict(state)

    def logprobs(self, name: str, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                 allowed: Sequence[Sequence[int]] | None = None) -> list[float]:
        """log pi of a completion under the agent's current adapter: what a synced engine must reproduce."""
        return self._learner(name).logprobs(prompt_ids, completion_ids, allowed)

    def close(self) -> None:
        return None
