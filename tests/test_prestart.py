"""rayseg.prestart: the processes started before training are the ones the Feed's tasks run in,
inside Ray Train (whose workers' runtime_env the tasks inherit)."""

from __future__ import annotations

import json

import pytest
import torch
from mask_data import write_masks

from rayseg import feed, ingest, prestart


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
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 8, parts=4)))
    tasks = ingest.train_tasks(
        summary, summary.image_ids, rank=0, world=1, batch_size=2, seed=0, epoch=1
    )
    assert len(tasks) == 4
    node = ray.get_runtime_context().get_node_id()
    started = ray.get(prestart.start({node: 2}), timeout=120)
    assert len(set(started)) == 2
    out = tmp_path / "pids.json"

    def pid_of(batch):  # in the data task's process
        import os

        import numpy as np

        return {"pid": np.full(len(batch["image_id"]), os.getpid())}

    def loop(config):  # a training worker holding no CPU: the tasks may take both
        batches = feed.Feed(
            tasks, fs=summary.location.fs, make_batch=pid_of, in_flight=2, num_cpus=1.0,
            device=torch.device("cpu"),
        )  # fmt: skip
        out.write_text(json.dumps(sorted({int(p) for b in batches for p in b["pid"]})))

    TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"memory": 2**28}
        ),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "train")),
    ).fit()
    ran_in = json.loads(out.read_text())
    assert ran_in and set(ran_in) <= set(started), (ran_in, started)
