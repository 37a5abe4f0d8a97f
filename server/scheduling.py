"""Which queued prompt runs on which idle worker: model affinity first, then the least loaded worker.

Pure and synchronous (no Ray, no I/O), so that it can be tested alone and timed with many simulated workers.

Loading a checkpoint costs seconds to minutes; running a prompt on a worker that already holds it costs
nothing extra. So an idle worker first takes the oldest prompt, among the first `window` of the queue,
whose checkpoints it already holds. Idle workers left over then take the oldest remaining prompts, each
going to the idle worker that holds most of its checkpoints, then has the most free memory, then holds the
fewest models. No worker stays idle while a prompt waits. A prompt passed over `max_skips` times (because
workers kept taking younger prompts for their own checkpoints) goes first in the next round, so none
starves. Looking only at a window of the queue bounds both a decision's cost and how far the order bends.
`worker_target` says how many workers a cluster's resources hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

CHECKPOINT_INPUTS = ("ckpt_name",)


@dataclass(frozen=True)
class Job:
    """A queued prompt as the scheduler sees it."""

    prompt_id: str
    checkpoints: frozenset[str] = frozenset()


@dataclass
class WorkerView:
    """A worker as the scheduler sees it: what it holds, whether it is busy, how much memory it has free."""

    worker_id: str
    loaded: frozenset[str] = frozenset()
    busy: bool = False
    free_memory: int = 0


@dataclass
class Scheduler:
    window: int = 256
    max_skips: int = 16
    skips: dict[str, int] = field(default_factory=dict)

    def assign(self, pending: Sequence[Job], workers: Iterable[WorkerView]) -> list[tuple[Job, str]]:
        """(job, worker id) pairs for this round; `pending` is in queue order (oldest first)."""
        idle = {w.worker_id: w for w in workers if not w.busy}
        if not idle or not pending:
            return []
        window = pending[:self.window]
        taken: set[int] = set()
        result: list[tuple[Job, str]] = []

        def give(index: int, worker: WorkerView) -> None:
            taken.add(index)
            del idle[worker.worker_id]
            result.append((window[index], worker.worker_id))

        for index, job in enumerate(window):  # prompts that waited too long, to the best idle worker
            if not idle:
                break
            if self.skips.get(job.prompt_id, 0) >= self.max_skips:
                give(index, best_worker(job, idle.values()))
        holders = _holders(idle.values())
        for index, job in enumerate(window):  # affinity: an idle worker that already holds every checkpoint
            if not idle:
                break
            if index in taken or not job.checkpoints:
                continue
            first = next(iter(job.checkpoints))
            fits = [w for w in holders.get(first, ()) if w.worker_id in idle and job.checkpoints <= w.loaded]
            if fits:
                give(index, best_worker(job, fits))
        for index in range(len(window)):  # the rest: oldest prompts to the least loaded idle workers
            if not idle:
                break
            if index not in taken:
                give(index, best_worker(window[index], idle.values()))
        self._count_skips(window, taken)
        return result

    def _count_skips(self, window: Sequence[Job], taken: set[int]) -> None:
        last = max(taken, default=-1)
        for index in range(last):
            if index not in taken:
                prompt_id = window[index].prompt_id
                self.skips[prompt_id] = self.skips.get(prompt_id, 0) + 1
        for index in taken:
            self.skips.pop(window[index].prompt_id, None)
        if len(self.skips) > 4 * self.window:  # forget prompts that left the queue some other way
            present = {job.prompt_id for job in window}
            self.skips = {pid: n for pid, n in self.skips.items() if pid in present}

    def forget(self, prompt_id: str) -> None:
        self.skips.pop(prompt_id, None)


def best_worker(job: Job, workers: Iterable[WorkerView]) -> WorkerView:
    """Most of the job's checkpoints held, then most free memory, then fewest models held, then id."""
    return min(workers, key=lambda w: (-len(job.checkpoints & w.loaded), -w.free_memory, len(w.loaded),
                                       w.worker_id))


def _holders(workers: Iterable[WorkerView]) -> dict[str, list[WorkerView]]:
    by_checkpoint: dict[str, list[WorkerView]] = {}
    for worker in workers:
        for name in worker.loaded:
            by_checkpoint.setdefault(name, []).append(worker)
    return by_checkpoint


def prompt_checkpoints(prompt: Any) -> frozenset[str]:
    """The checkpoint names an API-format prompt loads (literal `ckpt_name` inputs)."""
    names = set()
    if isinstance(prompt, dict):
        for node in prompt.values():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            if isinstance(inputs, dict):
                names.update(v for k in CHECKPOINT_INPUTS if isinstance(v := inputs.get(k), str))
    return frozenset(names)


def worker_target(resources: dict[str, float], cpus_per_worker: int = 1,
                  max_workers: int | None = None) -> tuple[int, dict[str, Any]]:
    """How many workers the cluster's resources hold, and each one's Ray resource request: one per GPU
    (each with a CPU), or, on a cluster without GPUs, one per `cpus_per_worker` CPUs."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        count, options = min(gpus, cpus), {"num_gpus": 1, "num_cpus": 1}
    else:
        count, options = cpus // max(1, cpus_per_worker), {"num_cpus": max(1, cpus_per_worker)}
    return (count if max_workers is None else min(count, max_workers)), options
