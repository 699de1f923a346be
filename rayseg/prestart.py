"""Data-loading processes started before training, so that the first epoch's tasks find them.

Inputs: how many processes each node should hold ready (train.prestart_counts). Output: idle Ray
worker processes with rayseg.ingest imported, which rayseg.feed's tasks then run in.

Ray starts a worker process when a task finds no idle one it may take. Without this, the first
epoch's data tasks wait for theirs while the training worker builds its model: Python, Ray,
OpenCV and pyarrow, on CPUs that the model build also wants (issue 22: the first epoch under Ray
Train waited 12-16% of its time, later epochs about 1%). Later epochs find the processes the
first one left.

Ray lends an idle process only to a task whose runtime_env serializes to the same string as the
one the process started with. Feed tasks inherit the training worker's runtime_env: the variables
Ray Train gives its workers (raycompat.train_worker_env), written out by Ray's core worker, which
does so only where a task names a runtime_env under a parent that has one. So a short-lived
actor with that runtime_env starts the tasks here, naming it again (tests/test_prestart.py
checks that the Feed's tasks run in these processes).
"""

from __future__ import annotations

from typing import Any

from rayseg import ingest, raycompat

TASK_NAME = "start_data_process"


class Starter:
    """A Ray actor of no CPU: starts the processes, says which, and ends."""

    def start(self, counts: dict[str, int], runtime_env: dict[str, Any]) -> list[int]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(ingest.process_id)
        refs = [
            task.options(
                name=TASK_NAME,
                num_cpus=0,  # never waits for, nor holds, a CPU training asks for
                runtime_env=runtime_env,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote()
            for node, count in counts.items()
            for _ in range(count)
        ]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=120)
        pids = []
        for ref in ready:
            try:
                pids.append(ray.get(ref))
            except ray.exceptions.RayError:  # its node gone meanwhile: nothing to make ready
                continue
        return pids


def start(counts: dict[str, int], runtime_env: dict[str, Any] | None = None) -> Any:
    """Start `counts[node_id]` data-loading processes on each node; returns at once.

    runtime_env: that of the training workers (default: raycompat.train_worker_env(), as
    `rayseg train` runs them). Returns the ObjectRef of the started processes' ids (tests wait
    for it; training does not).
    """
    import ray

    if not any(counts.values()):
        return None
    if runtime_env is None:
        runtime_env = raycompat.train_worker_env()
    starter = ray.remote(Starter).options(num_cpus=0, runtime_env=runtime_env).remote()
    # Ray ends the actor once this call is done: no handle is kept.
    return starter.start.remote(counts, runtime_env)
