"""One change to the data tasks, with and without it: epochs in turn, in one Ray (issue 22).

    python bench/paired_bench.py --change groups --rounds 20 --json bench/results/groups_bench.json
    python bench/paired_bench.py --change chunks --rounds 14 --json bench/results/chunks_bench.json
    python bench/paired_bench.py --change reuse --rounds 14 --json bench/results/reuse_bench.json
    python bench/paired_bench.py --change memory --rounds 20 --json bench/results/memory_bench.json

What `rayseg train` feeds a worker (rayseg.feed.Feed of ingest.train_tasks, 2 tasks at once on
2 CPUs, bench/ingest_bench.py's (c)), epoch by epoch, its data tasks (ingest.task_objects, as
committed) either as they are or with one change taken out (patched in):
- groups: a batch that runs over into the next Parquet part has the task read all of that part,
  not only the row groups of the images it takes there (ingest.spanning_from_few_groups);
- chunks: arrays over 1 MiB handed to Ray whole, not in chunks of 1 MiB (raycompat.InChunks);
- reuse: each batch made in new arrays, not in those of a group already handed over;
- memory: the task's process hands the memory it frees back to the kernel (glibc's and Arrow's
  defaults, not ingest.keep_freed_memory) and reads local Parquet pre-buffered; these tasks run
  in worker processes of their own.
Each round takes one epoch of each, the order alternating; the first round is a warm-up.
Paired rounds, because this machine drifts by more between separate runs than such a change is
worth: per round, images/s per core (wall) and images per CPU second of the whole process tree,
and how many rounds the committed version won.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import ingest_bench  # noqa: E402

from rayseg import feed, ingest  # noqa: E402
from rayseg.models import class_map_from_meta  # noqa: E402


def whole_arrays(task, fs, make_batch, *, group):
    """ingest.task_objects without the chunks: each array handed to Ray whole."""
    yield from ingest.task_batch_groups(task, fs, make_batch, group=group, reuse=True)


def fresh_arrays(task, fs, make_batch, *, group):
    """ingest.task_objects without the reuse: new arrays for every batch."""
    from rayseg import raycompat

    for batches in ingest.task_batch_groups(task, fs, make_batch, group=group, reuse=False):
        yield [{k: raycompat.in_chunks(v) for k, v in b.items()} for b in batches]


def freed_memory_returned(task, fs, make_batch, *, group):
    """ingest.task_objects without keep_freed_memory and reading local Parquet pre-buffered, as
    before (run in worker processes of their own: keep_freed_memory lasts a process's life)."""
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile

    def pre_buffered(*args, **options):
        return parquet_file(*args, **{**options, "pre_buffer": True})

    with (
        mock.patch.object(ingest, "keep_freed_memory", lambda: None),
        mock.patch.object(pq, "ParquetFile", pre_buffered),
    ):
        yield from ingest.task_objects(task, fs, make_batch, group=group)


def epoch_tasks(summary, epoch: int) -> list[ingest.PartTask]:
    return ingest_bench.epoch_tasks(summary, summary.image_ids, batch_size=16, epoch=epoch)


def whole_parts(summary, epoch: int) -> list[ingest.PartTask]:
    """epoch_tasks without the row groups: the order drawn as before, every part read whole."""
    with mock.patch.object(ingest, "spanning_from_few_groups", lambda _, order, **__: order):
        return [replace(task, groups=()) for task in epoch_tasks(summary, epoch)]


# change -> what replaces the committed version's part: its tasks, or their function
WITHOUT = {
    "groups": {"tasks": whole_parts},
    "chunks": {"task_objects": whole_arrays},
    "reuse": {"task_objects": fresh_arrays},
    "memory": {"task_objects": freed_memory_returned, "own_processes": True},
}


def epoch_feed(summary, epoch: int, *, make, without: dict | None = None) -> feed.Feed:
    """One epoch's Feed; `without`: a WITHOUT entry, the change taken out."""
    without = without or {}
    tasks = without.get("tasks", epoch_tasks)(summary, epoch)
    options = {"fs": summary.location.fs, "make_batch": make, "in_flight": 2, "num_cpus": 1.0}
    function = without.get("task_objects", ingest.task_objects)
    with (
        mock.patch.object(ingest, "task_objects", function),  # what the Feed runs as its tasks
        own_processes() if without.get("own_processes") else contextlib.nullcontext(),
    ):
        return feed.Feed(tasks, device=torch.device("cpu"), **options)


@contextlib.contextmanager
def own_processes():
    """Ray tasks made meanwhile run in worker processes of their own (a runtime_env of theirs)."""
    import ray

    remote = ray.remote

    class Remote:
        def __init__(self, function) -> None:
            self.function = function

        def options(self, **options):
            env = {"env_vars": {"RAYSEG_PAIRED_BENCH": "without"}}
            return remote(self.function).options(runtime_env=env, **options)

    with mock.patch.object(ray, "remote", Remote):
        yield


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--change", choices=sorted(WITHOUT), required=True)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    summary = ingest.scan_data(ingest_bench.make_data(REPO / "bench" / "_data", args.images))
    make = functools.partial(
        ingest.train_batch, lut=class_map_from_meta(summary.meta).train_lut(), crop_size=480
    )
    cores = os.cpu_count() or 1
    # Processes of their own for one side: keep both sides' idle processes (Ray ends those over
    # its soft limit, of one per CPU, and each epoch would start with new processes).
    own = WITHOUT[args.change].get("own_processes")
    system_config = {"num_workers_soft_limit": 2 * cores} if own else {}
    ray.init(
        num_cpus=cores, include_dashboard=False, logging_level="ERROR", _system_config=system_config
    )
    seen: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    epoch = 0
    for r in range(args.rounds + 1):
        for name in ("without", "with") if r % 2 else ("with", "without"):
            epoch += 1
            without = WITHOUT[args.change] if name == "without" else None
            batches = epoch_feed(summary, epoch, make=make, without=without)
            rate, per_cpu, _ = ingest_bench.epoch(batches, set())
            print(f"  round {r} {name}: {rate / cores:.1f} images/s per core", flush=True)
            if r:  # round 0 warms up
                seen[name].append((rate / cores, per_cpu))
    ray.shutdown()

    without, with_ = np.array(seen["without"]), np.array(seen["with"])
    out = {
        "change": args.change,
        "machine": {"cpu_count": cores, "load_avg_1m_end": round(os.getloadavg()[0], 2)},
        "images": len(summary.image_ids),
        "rounds_timed": args.rounds,
        **{
            name: {
                "wall_images_per_s_per_core": [round(float(x), 1) for x in v[:, 0]],
                "images_per_cpu_s": [round(float(x), 1) for x in v[:, 1]],
            }
            for name, v in (("without", without), ("with", with_))
        },
        "with_faster_rounds_wall": int((with_[:, 0] > without[:, 0]).sum()),
        "with_faster_rounds_per_cpu": int((with_[:, 1] > without[:, 1]).sum()),
        "median_gain_wall": round(float(np.median(with_[:, 0]) / np.median(without[:, 0]) - 1), 3),
        "median_gain_per_cpu": round(
            float(np.median(with_[:, 1]) / np.median(without[:, 1]) - 1), 3
        ),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
