"""Feed: one epoch of a training worker's batches, made by Ray tasks, as torch tensors.

Inputs: the PartTasks of rayseg.ingest (train_tasks / val_tasks), the file system they read, and
how a batch is made (ingest.train_batch or val_batch, options bound). Output: an iterable of
batches (rayseg.ingest's columns) as torch tensors on the worker's device.

Each PartTask runs as a Ray task, `load_data` (ingest.task_batch_groups), that yields its
batches as it makes them, BATCHES_PER_OBJECT to a Ray object (a Ray streaming generator). At
most `in_flight` run at once (the CPUs left for data loading, per worker), and the first start
when the Feed is made: train.py makes the next epoch's before it validates. Batches are taken
from whichever task has some ready. They come as numpy arrays read in place from Ray's object
store, so the worker's only copy is onto its device. A task starts only when one before it has
been taken in full, so a Feed holds at most `in_flight` tasks' batches in the object store (a
200-image part at crop 480: 184 MB).

This replaced Ray Data (read_parquet -> map_batches -> streaming_split -> iter_torch_batches):
bench/ingest_bench.py measured its executor, split coordinator, Arrow blocks and re-batching at
about a fifth of the CPU that the decoding itself takes (issue 22, docs/performance.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from rayseg import ingest, waits
from rayseg.errors import RaysegError

# The task name, as Ray's state API and `ray list tasks` show it (rayseg.waits says its waits).
TASK_NAME = waits.DATA_TASK
# Batches a task hands over per Ray object: fewer objects, less of Ray's CPU per image (issue 22,
# exploratory: 4 batches of 16 per object took the raylet's and the consumer's CPU from ~0.23 to
# ~0.10 ms per image), at the cost of 4 batches' time before an object arrives (so a task's
# first batch goes alone, then 2, then 4: ingest.task_batch_groups).
BATCHES_PER_OBJECT = 4

Batch = dict[str, np.ndarray]


def to_torch(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """numpy arrays -> tensors on `device`, sharing memory with the arrays on CPU."""
    with warnings.catch_warnings():
        # Ray's arrays are read-only views of its object store; training only reads a batch
        # (normalize and .long() make new tensors), and tests check that CPU training runs.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    if device.type == "cpu":
        return tensors
    return {k: v.to(device) for k, v in tensors.items()}


class Feed:
    """One epoch of batches: `tasks` run as Ray tasks of `num_cpus` CPUs, at most `in_flight` at
    once, started at once; iterate it once. close() (also when iteration stops early) cancels
    the tasks still running."""

    def __init__(
        self,
        tasks: list[ingest.PartTask],
        *,
        fs: Any,
        make_batch: Callable[[Batch], Batch],
        in_flight: int,
        num_cpus: float,
        device: torch.device,
    ) -> None:
        import ray

        # Ray: a task per PartTask. Its function is rayseg.ingest's: the task's process imports
        # no torch (seconds of a fresh worker process's start, on the first epoch's path).
        self._remote = ray.remote(ingest.task_batch_groups).options(
            name=TASK_NAME, num_cpus=num_cpus, num_returns="streaming"
        )
        self._fs, self._make_batch = ray.put(fs), ray.put(make_batch)
        self._todo = list(reversed(tasks))
        self._running: list[Any] = []  # ray.ObjectRefGenerator of each running task
        self._in_flight = max(1, in_flight)
        self._device = device
        self._start_tasks()

    def _start_tasks(self) -> None:
        while self._todo and len(self._running) < self._in_flight:
            task = self._todo.pop()
            self._running.append(
                self._remote.remote(task, self._fs, self._make_batch, group=BATCHES_PER_OBJECT)
            )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import ray

        try:
            while self._running:
                # Ray: a task with a batch ready (or done); a task ended frees a slot.
                (task,), _ = ray.wait(self._running, num_returns=1)
                try:
                    batches_ref = next(task)
                except StopIteration:
                    self._running.remove(task)
                    self._start_tasks()
                    continue
                try:
                    batches = ray.get(batches_ref)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, RaysegError):  # a part changed: rayseg's own line
                        raise RaysegError(str(e.cause)) from None
                    raise
                for batch in batches:
                    yield to_torch(batch, self._device)
        finally:
            self.close()

    def close(self) -> None:
        import ray

        self._todo.clear()
        for task in self._running:
            # Without force, a task between two of its batches runs on (Ray 2.60): ending its
            # process is what frees its CPU.
            ray.cancel(task, force=True)
        self._running.clear()
