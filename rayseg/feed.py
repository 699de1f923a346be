"""Feed: one epoch of a training worker's batches, made by Ray tasks, as torch tensors.

Inputs: the PartTasks of rayseg.ingest (train_tasks / val_tasks), the file system they read, and
how a batch is made (ingest.train_batch or val_batch, options bound). Output: an iterable of
batches (rayseg.ingest's columns) as torch tensors on the worker's device.

Each PartTask runs as a Ray task, `load_data` (ingest.task_objects), that yields its
batches as it makes them, BATCHES_PER_OBJECT to a Ray object (a Ray streaming generator). At
most `in_flight` run at once (the CPUs left for data loading, per worker), and the first start
when the Feed is made: train.py makes the next epoch's before it validates. Batches are taken
from whichever task has some ready. They come as numpy arrays read in place from Ray's object
store, so the worker's only copy is onto its device. A task starts when one before it has made
its last batch (its CPU is free), not when that batch is taken: the next part is read and
decoded while the model works through the last. A Feed holds at most `in_flight` + 1 tasks'
batches in the object store (a 200-image part at crop 480: 184 MB). A data task's process
keeps the memory it frees, up to ingest.KEEP_FREED_BYTES, for the next task it runs.

This replaced Ray Data (read_parquet -> map_batches -> streaming_split -> iter_torch_batches):
bench/ingest_bench.py measured its executor, split coordinator, Arrow blocks and re-batching at
about a fifth of the CPU that the decoding itself takes (issue 22, docs/performance.md).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

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

Batch = ingest.Batch


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


def get_batches(ref: Any) -> list[Batch]:
    """ray.get of a data task's batches; a part changed since the scan is rayseg's own line."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, RaysegError):
            raise RaysegError(str(e.cause)) from None
        raise


class Feed:
    """One epoch of batches: `tasks` run as Ray tasks of `num_cpus` CPUs, at most `in_flight` at
    once, started at once; iterate it once. close() (also when iteration stops early) cancels
    the tasks still running.

    made: (ObjectRef of a list of batches made elsewhere, the PartTask that made them): the
    worker's first batch, made before it started (rayseg.prestart). Where it is the first batch
    of `tasks` (ingest.without_first), it is yielded first and left out of them; else it is
    not used and the tasks make every batch. Should that object be lost (its owner or node
    gone), the batch is made here instead."""

    def __init__(
        self,
        tasks: list[ingest.PartTask],
        *,
        fs: Any,
        make_batch: Callable[[Batch], Batch],
        in_flight: int,
        num_cpus: float,
        device: torch.device,
        made: tuple[Any, ingest.PartTask] | None = None,
    ) -> None:
        import ray

        # Ray: a task per PartTask. Its function is rayseg.ingest's: the task's process imports
        # no torch (seconds of a fresh worker process's start, on the first epoch's path).
        self._remote = ray.remote(ingest.task_objects).options(
            name=TASK_NAME, num_cpus=num_cpus, num_returns="streaming"
        )
        self._fs, self._make_batch = ray.put(fs), ray.put(make_batch)
        rest = ingest.without_first(tasks, made[1]) if made and tasks else None
        tasks, self._made = (tasks, None) if rest is None else (rest, made)
        self._make_here = functools.partial(ingest.made_batches, fs=fs, make_batch=make_batch)
        self._todo = list(reversed(tasks))
        self._tasks: list[Any] = []  # ray.ObjectRefGenerator of each task not yet taken in full
        self._making: dict[Any, Any] = {}  # of those still running: completed() ref -> task
        self._in_flight = max(1, in_flight)
        self._device = device
        self._start_tasks()

    def _start_tasks(self) -> None:
        # A CPU for each task running, and one finished task's batches beside them.
        while (
            self._todo
            and len(self._making) < self._in_flight
            and len(self._tasks) <= self._in_flight
        ):
            task = self._remote.remote(
                self._todo.pop(), self._fs, self._make_batch, group=BATCHES_PER_OBJECT
            )
            self._tasks.append(task)
            self._making[task.completed()] = task

    def _note_finished(self) -> None:
        """Tasks that have made their last batch free their slot: the next ones start."""
        import ray

        if not self._making:
            return
        making = list(self._making)
        done, _ = ray.wait(making, num_returns=len(making), timeout=0, fetch_local=False)
        for ref in done:
            del self._making[ref]
        if done:
            self._start_tasks()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import ray

        try:
            if self._made is not None:
                for batch in self._made_batches(*self._made):
                    yield to_torch(batch, self._device)
            while self._tasks:
                self._note_finished()
                # Ray: a task with a batch ready (or done).
                (task,), _ = ray.wait(self._tasks, num_returns=1)
                try:
                    batches_ref = next(task)
                except StopIteration:
                    self._tasks.remove(task)
                    self._making = {r: t for r, t in self._making.items() if t is not task}
                    self._start_tasks()
                    continue
                for batch in get_batches(batches_ref):
                    yield to_torch(batch, self._device)
        finally:
            self.close()

    def _made_batches(self, ref: Any, task: ingest.PartTask) -> list[Batch]:
        import ray

        try:
            return get_batches(ref)
        except ray.exceptions.RayTaskError:
            raise
        except ray.exceptions.RayError:  # lost with its owner or node: made here instead
            return self._make_here(task)

    def close(self) -> None:
        import ray

        self._todo.clear()
        for task in self._making.values():
            # Without force, a task between two of its batches runs on (Ray 2.60): ending its
            # process is what frees its CPU.
            ray.cancel(task, force=True)
        self._tasks.clear()
        self._making.clear()
