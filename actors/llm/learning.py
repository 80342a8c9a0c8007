"""Learning: an LLM group's samples, buffered per adapter until a PPO step's batch is full.

    act()/select() ──Sample (prompt, answer, behaviour log pi, version, mask)──┐
    learn(): each sample gets its reward ──► buffers[adapter] ──► StepJob per full batch ──► learners

A move sample is rewarded with its game's learning reward; a selection sample with the learning reward of the game
it led to, or R_illegal for an illegal answer (selection by prompt). With shared adapters the buffer of an adapter
holds the samples of all its agents, in decision order. A plain class: no model, no engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from actors.llm.learners import StepJob


@dataclass
class Sample:
    prompt: list[int]  # (P,) chat-templated prompt ids
    response: list[int]  # (T,) answer ids
    logprobs: list[float]  # (T,) behaviour log pi per answer token (the masked policy's in mask mode)
    version: int  # adapter version that produced it
    allowed: list[list[int]] | None = None  # mask mode: per answer position the tokens the mask allowed


class SampleBuffers:
    """Rewarded samples per adapter; `jobs()` cuts them into PPO steps of `batch_size`."""

    def __init__(self, names: Sequence[str], batch_size: int, off_policy: str = "ratio") -> None:
        self.buffers: dict[str, list[tuple[Sample, float]]] = {n: [] for n in names}
        self.batch_size = batch_size
        self.off_policy = off_policy
        self.dropped = 0  # stale samples discarded (off_policy = "drop")

    def add(self, name: str, sample: Sample, reward: float) -> None:
        self.buffers[name].append((sample, float(reward)))

    def jobs(self, trained_version: Callable[[str], int]) -> list[StepJob]:
        """Every full batch as a StepJob, in adapter order; with off_policy = "drop" a sample older than the
        version its adapter will have when the batch trains is discarded and counted first."""
        out: list[StepJob] = []
        for name, buf in self.buffers.items():
            if self.off_policy == "drop":
                fresh = [(s, r) for s, r in buf if s.version >= trained_version(name)]
                self.dropped += len(buf) - len(fresh)
                buf[:] = fresh
            n = self.batch_size
            while len(buf) >= n:
                chunk = buf[:n]
                del buf[:n]
                out.append(StepJob(
                    name, [s.prompt for s, _ in chunk], [s.response for s, _ in chunk], [r for _, r in chunk],
                    behaviour_logprobs=[s.logprobs for s, _ in chunk], versions=[s.version for s, _ in chunk],
                    allowed=None if all(s.allowed is None for s, _ in chunk) else [s.allowed for s, _ in chunk],
                ))
        return out
