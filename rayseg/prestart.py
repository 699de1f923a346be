"""Data loading started before training: processes, and each worker's first batch.

Inputs: how many processes each node should hold ready (train.prestart_counts), and optionally
each rank's first batch of the first epoch (FirstBatches). Outputs: idle Ray worker processes
with rayseg.ingest imported, which rayseg.feed's tasks then run in; the first batches, made while
Ray Train starts its workers, which each worker takes once (take_first).

Ray starts a worker process when a task finds no idle one it may take. Without this, the first
epoch's data tasks wait for theirs while the training worker builds its model: Python, Ray,
OpenCV and pyarrow, on CPUs that the model build also wants (issue 22: the first epoch under Ray
Train waited 12-16% of its time, later epochs about 1%). Later epochs find the processes the
first one left. Even in a started process, a worker's first batch took 60-80 ms after its Feed
began (read the part, decode), longer than a small model takes to build: made before Ray Train
starts, it is ready when asked for (bench/train_bench.py --first-epoch-pairs).

Ray lends an idle process only to a task whose runtime_env serializes to the same string as the
one the process started with. Feed tasks inherit the training worker's runtime_env: the variables
Ray Train gives its workers (raycompat.train_worker_env), written out by Ray's core worker, which
does so only where a task names a runtime_env under a parent that has one. So an actor with that
runtime_env starts the tasks here, naming it again (tests/test_prestart.py checks that the
Feed's tasks run in these processes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayseg import ingest, raycompat, waits

TASK_NAME = "start_data_process"
GATE_WAIT_S = 60  # a starting task holds its process at most this long for the others


@dataclass(frozen=True)
class FirstBatches:
    """Each rank's first batch of `epoch`, to make before the training workers start."""

    name: str  # the Ray actor's name, which the workers look up (Plan.first_batches_actor)
    epoch: int
    tasks: dict[int, ingest.PartTask]  # rank -> its first batch, a task of its own
    fs: Any
    make_batch: Callable[..., ingest.Batch]
    num_cpus: float


@dataclass(frozen=True)
class Started:
    actor: Any  # the Starter: keep it until training ends, then stop()
    pids: Any  # ObjectRef of the started processes' ids (tests wait for it; training does not)


class Gate:
    """A Ray actor of no CPU (async: every starting task waits in it at once). Opens once
    `total` tasks have arrived, or after `wait_s` for a task that waits longer (its node lost)."""

    def __init__(self) -> None:
        import asyncio

        self._arrived = 0
        self._open = asyncio.Event()

    async def arrive(self, total: int, wait_s: float) -> None:
        import asyncio

        self._arrived += 1
        if self._arrived >= total:
            self._open.set()
        try:
            await asyncio.wait_for(self._open.wait(), wait_s)
        except TimeoutError:
            pass


def started_process(gate: Any, total: int) -> int:
    """A starting task: its process's id, once `total` starting tasks each hold a process. Its
    process has imported this module, so rayseg.ingest (OpenCV, pyarrow, numpy) too."""
    import os

    import ray

    try:
        ray.get(gate.arrive.remote(total, GATE_WAIT_S))
    except ray.exceptions.RayError:  # the Gate ended: start gave up on the slowest tasks
        pass
    return os.getpid()


class Starter:
    """A Ray actor of no CPU: starts the processes and says which; holds the first batches
    until each worker takes its own. Threaded: a take is not queued behind start's wait."""

    def __init__(self, runtime_env: dict[str, Any], first: FirstBatches | None) -> None:
        import ray

        self._env = runtime_env
        self._first: dict[int, tuple[Any, ingest.PartTask]] = {}
        self._epoch = first.epoch if first else None
        if first:
            make = ray.remote(ingest.made_batches).options(
                name=waits.DATA_TASK, num_cpus=first.num_cpus, runtime_env=runtime_env
            )
            fs, make_batch = ray.put(first.fs), ray.put(first.make_batch)
            self._first = {
                rank: (make.remote(task, fs, make_batch), task)
                for rank, task in first.tasks.items()
            }

    def start(self, counts: dict[str, int]) -> list[int]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        total = sum(counts.values())
        if not total:
            return []
        # A runtime_env of its own: the Gate neither takes nor ends a process the tasks could use.
        gate_env = {"env_vars": {"RAYSEG_PRESTART_GATE": "1"}}
        gate = ray.remote(Gate).options(num_cpus=0, runtime_env=gate_env).remote()
        task = ray.remote(started_process)
        refs = [
            task.options(
                name=TASK_NAME,
                num_cpus=0,  # never waits for, nor holds, a CPU training asks for
                runtime_env=self._env,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(gate, total)
            for node, count in counts.items()
            for _ in range(count)
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2 * GATE_WAIT_S)
        ray.kill(gate)
        pids = []
        for ref in ready:
            try:
                pids.append(ray.get(ref))
            except ray.exceptions.RayError:  # its node gone meanwhile: nothing to make ready
                continue
        return pids

    def take_first(self, rank: int, epoch: int) -> list[tuple[Any, ingest.PartTask]]:
        """[(ObjectRef of rank's first batch, the task that made it)] once; [] after, or for
        another epoch (a worker restarted after a checkpoint)."""
        if epoch != self._epoch or rank not in self._first:
            return []
        return [self._first.pop(rank)]  # in a list: Ray hands the ref over, unresolved


def start(
    counts: dict[str, int],
    runtime_env: dict[str, Any] | None = None,
    *,
    first: FirstBatches | None = None,
) -> Started:
    """Start `counts[node_id]` data-loading processes on each node, and make `first`; returns
    at once.

    runtime_env: that of the training workers (default: raycompat.train_worker_env(), as
    `rayseg train` runs them).
    """
    import ray

    if runtime_env is None:
        runtime_env = raycompat.train_worker_env()
    options: dict[str, Any] = {"num_cpus": 0, "runtime_env": runtime_env, "max_concurrency": 4}
    if first:
        options["name"] = first.name
    actor = ray.remote(Starter).options(**options).remote(runtime_env, first)
    return Started(actor, actor.start.remote(counts))


def stop(started: Started) -> None:
    """End the Starter, with the first batches no worker took (Ray may be gone: stopped by
    Ctrl-C)."""
    import ray

    if ray.is_initialized():
        ray.kill(started.actor)


def take_first(name: str, *, rank: int, epoch: int) -> tuple[Any, ingest.PartTask] | None:
    """From a training worker: (ObjectRef of its first batch of `epoch`, the task that made it),
    or None where there is none to take (taken before, another epoch, the Starter gone)."""
    import ray

    try:
        got = ray.get(ray.get_actor(name).take_first.remote(rank, epoch), timeout=60)
    except (ValueError, ray.exceptions.RayError):  # no such actor, or it died: none made
        return None
    return got[0] if got else None
