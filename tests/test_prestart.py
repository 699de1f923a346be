"""rayseg.prestart: the processes started before training are the ones the Feed's tasks run in,
inside Ray Train (whose workers' runtime_env the tasks inherit)."""

from __future__ import annotations

import functools
import json
import time

import pytest
import torch
from mask_data import META, write_masks

from rayseg import feed, ingest, prestart
from rayseg.models import class_map_from_meta


@pytest.fixture(scope="module")
def ray_keeping_idle(ray_tmpdir):
    """A local 2-CPU Ray that keeps idle worker processes. Ray ends idle processes beyond its
    free CPUs, oldest first; here that could be the ones under test, should the two that Ray
    starts for a new driver register after them on a busy machine."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _system_config={"idle_worker_killing_time_threshold_ms": 600_000},
    )
    yield
    ray.shutdown()


def test_feed_tasks_under_ray_train_run_in_the_started_processes(ray_keeping_idle, tmp_path):
    # ... and the worker takes its first batch, made before it started, from the Starter.
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 16, parts=4)))
    tasks = ingest.train_tasks(
        summary, summary.image_ids, rank=0, world=1, batch_size=2, seed=0, epoch=1
    )
    assert [len(t.batches) for t in tasks] == [2, 2, 2, 2]
    node = ray.get_runtime_context().get_node_id()
    started = ray.get(prestart.start({node: 2}).pids, timeout=120)
    assert len(set(started)) == 2
    first = first_batches(summary, "test-first-batch-in-ray-train", world=1)
    holder = prestart.start({}, first=first)
    out = tmp_path / "pids.json"

    def pid_of(batch, out=None):  # in the data task's process
        import os

        import numpy as np

        return {"image_id": batch["image_id"], "pid": np.full(len(batch["image_id"]), os.getpid())}

    def loop(config):  # a training worker holding no CPU: the tasks may take both
        made = prestart.take_first(first.name, rank=0, epoch=1)
        batches = list(
            feed.Feed(
                tasks, fs=summary.location.fs, make_batch=pid_of, in_flight=2,
                num_cpus=1.0, device=torch.device("cpu"), made=made,
            )
        )  # fmt: skip
        out.write_text(
            json.dumps(
                {
                    "made": made is not None,
                    "ids": [b["image_id"].tolist() for b in batches],
                    "pids": sorted({int(p) for b in batches if "pid" in b for p in b["pid"]}),
                }
            )
        )

    TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"memory": 2**28}
        ),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "train")),
    ).fit()
    prestart.stop(holder)
    got = json.loads(out.read_text())
    assert got["made"], "the worker found no first batch"
    assert got["ids"][0] == first.tasks[0].batches[0].tolist()
    assert sorted(got["ids"]) == sorted(b.tolist() for t in tasks for b in t.batches)
    assert got["pids"] and set(got["pids"]) <= set(started), (got["pids"], started)


def first_batches(summary, name: str, *, world: int, epoch: int = 1) -> prestart.FirstBatches:
    heads = {
        rank: ingest.split_first(
            ingest.train_tasks(
                summary, summary.image_ids, rank=rank, world=world, batch_size=2, seed=0,
                epoch=epoch,
            )[0]
        )[0]
        for rank in range(world)
    }  # fmt: skip
    return prestart.FirstBatches(
        name=name, epoch=epoch, tasks=heads, fs=summary.location.fs, make_batch=MAKE, num_cpus=1.0
    )


MAKE = functools.partial(
    ingest.train_batch, lut=class_map_from_meta(META).train_lut(), crop_size=32
)


def test_each_rank_takes_its_first_batch_once_and_for_its_epoch_only(ray_keeping_idle, tmp_path):
    import ray

    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 12, parts=2)))
    first = first_batches(summary, "test-first-batches", world=2)
    started = prestart.start({}, first=first)
    assert ray.get(started.pids, timeout=60) == []
    assert prestart.take_first(first.name, rank=0, epoch=2) is None  # resumed elsewhere
    assert prestart.take_first(first.name, rank=7, epoch=1) is None  # no such rank
    for rank in (1, 0):
        ref, task = prestart.take_first(first.name, rank=rank, epoch=1)
        assert task.paths == first.tasks[rank].paths
        assert [b.tolist() for b in task.batches] == [first.tasks[rank].batches[0].tolist()]
        (batch,) = ray.get(ref, timeout=60)
        assert batch["image_id"].tolist() == first.tasks[rank].batches[0].tolist()
        assert batch["image"].shape == (2, 32, 32, 3)
        assert prestart.take_first(first.name, rank=rank, epoch=1) is None  # taken
    prestart.stop(started)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(first.name)
        except ValueError:
            break
        time.sleep(0.2)
    assert prestart.take_first(first.name, rank=0, epoch=1) is None  # the Starter is gone


def test_feed_yields_the_made_batch_first_and_makes_it_itself_when_lost(ray_keeping_idle, tmp_path):
    import ray

    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 12, parts=2)))
    tasks = ingest.train_tasks(
        summary, summary.image_ids, rank=0, world=1, batch_size=2, seed=0, epoch=1
    )
    head, rest = ingest.split_first(tasks[0])
    assert len(head.batches) == 1 and len(rest.batches) == len(tasks[0].batches) - 1
    planned = [b.tolist() for t in tasks for b in t.batches]

    @ray.remote(num_cpus=0)
    class Owner:  # owns the made batch, as the Starter does
        def make(self) -> list:
            return [ray.remote(ingest.made_batches).remote(head, summary.location.fs, MAKE)]

    def epoch_of(made) -> list[list[int]]:
        return [
            b["image_id"].tolist()
            for b in feed.Feed(
                tasks, fs=summary.location.fs, make_batch=MAKE, in_flight=1,
                num_cpus=1.0, device=torch.device("cpu"), made=made,
            )
        ]  # fmt: skip

    owner = Owner.remote()
    (ref,) = ray.get(owner.make.remote())
    got = epoch_of((ref, head))
    assert got[0] == head.batches[0].tolist() and sorted(got) == sorted(planned)
    other = ingest.split_first(tasks[1])[0]  # made for other tasks: not used, none left out
    assert sorted(epoch_of((ref, other))) == sorted(planned)

    # Lost: Ray cannot give the object (not an error of the task's own). A killed owner is not
    # a steady way to get there: a borrower on its node may still read the object for a while.
    @ray.remote(max_retries=0)
    def maker_dies() -> list:
        import os

        os._exit(1)

    ref = maker_dies.remote()
    with pytest.raises(ray.exceptions.RayError) as lost:
        ray.get(ref, timeout=30)
    assert not isinstance(lost.value, ray.exceptions.RayTaskError)
    got = epoch_of((ref, head))
    assert got[0] == head.batches[0].tolist() and sorted(got) == sorted(planned)


def test_start_gives_each_task_a_process_of_its_own(ray_keeping_idle):
    # Ray may hand an idle process to the next task at once: a starting task that returned
    # before the others had one left its process to them, and fewer started than asked (1 in 4
    # fresh clusters gave 2 of 4 before the Gate; the test below checks the Gate itself). A
    # runtime_env of its own: the processes started here are none the other tests' Feeds take.
    import ray

    node = ray.get_runtime_context().get_node_id()
    started = prestart.start({node: 4}, runtime_env={"env_vars": {"RAYSEG_TEST_GATE": "1"}})
    pids = ray.get(started.pids, timeout=120)
    assert len(pids) == len(set(pids)) == 4, pids
    prestart.stop(started)


def test_the_gate_holds_each_arrival_until_all_have_come_or_its_wait_ends(ray_keeping_idle):
    import ray

    gate = ray.remote(prestart.Gate).options(num_cpus=0).remote()
    ray.get(gate.__ray_ready__.remote(), timeout=60)  # started: the arrivals below reach it
    early = [gate.arrive.remote(3, 60) for _ in range(2)]
    ready, _ = ray.wait(early, num_returns=2, timeout=2)
    assert ready == []  # two of three: both still held
    last = gate.arrive.remote(3, 60)
    ready, _ = ray.wait([*early, last], num_returns=3, timeout=30)
    assert len(ready) == 3
    ray.kill(gate)

    alone = ray.remote(prestart.Gate).options(num_cpus=0).remote()
    begun = time.monotonic()
    ray.get(alone.arrive.remote(2, 1.0), timeout=30)  # 1 of 2: held until the wait ends
    assert time.monotonic() - begun >= 1.0
    ray.kill(alone)
    # A task that comes after start gave up (its Gate ended) still returns its process's id.
    pid = ray.get(ray.remote(prestart.started_process).remote(alone, 2), timeout=60)
    assert isinstance(pid, int) and pid > 0
