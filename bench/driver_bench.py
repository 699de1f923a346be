"""The `rayseg masks` driver alone (issue 10): parse, plan, submit and collect with no-op tasks.

    python bench/driver_bench.py                    # 118,287 and 1,000,000 images, ~6 min
    python bench/driver_bench.py --quick            # 20,000 images, < 1 min
    python bench/driver_bench.py --sizes 118287     # one size

Each size runs in a fresh Python process that starts a local Ray (--num-cpus, default all cores),
replaces rayseg.shard.render_shard with a no-op returning a minimal shard record, and times
rayseg.masks.run_masks on a make_coco.py file of that many images (generated once into
bench/_data: the 1,000,000-image one is ~3.8 GB and its parse needs ~5 GB). So everything the
driver does is measured (parse, per-shard job building, pickling, submit, ray.wait / ray.get, the
manifest) and nothing a render task does. Reported per size: the parse (rayseg.masks.load_coco or
load_coco_apart), the rest (dispatch), shards/s and images/s dispatched, the most refs passed to
one ray.wait (the shards in flight), the driver's peak RSS above its RSS after imports and Ray
start-up, per million images, and the peak with its non-Ray children (the parse child) counted.

The render rate per core that the dispatch rate is divided by is the minimal pipeline's
(bench/minimal.py, on the first 1,000 images of the first file, in this process), unless
--per-core-rate gives one: images/s dispatched / per-core rate = the worker cores one driver keeps
busy, against cluster.yaml's 8 cpu_worker nodes x 16 vCPUs = 128. The no-op tasks run on this
machine's cores beside the driver, so the dispatch rate here is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from make_coco import DATA_DIR, PRESETS, ensure_preset, write_coco
from subset_bench import run_json

BENCH = Path(__file__).resolve().parent
CLUSTER_WORKER_CORES = 8 * 16  # cluster.yaml: cpu_worker max_workers 8 x c6i.4xlarge (16 vCPUs)
HEAD_MEMORY_BYTES = 32 * 2**30  # cluster.yaml's head: m6i.2xlarge, 32 GiB
FULL_SIZES = "118287,1000000"
QUICK_SIZES = "20000"


def annotations_file(num_images: int) -> Path:
    if num_images == PRESETS["train2017"]["num_images"]:
        return ensure_preset("train2017")
    path = DATA_DIR / f"instances_{num_images}.json"  # make_coco.py --num-images's name
    if not path.exists():
        print(f"  writing {path.name} ...", flush=True)
        write_coco(path, num_images=num_images, num_annotations=round(num_images * 7.27))
    return path


# ---- the child: one driver run with no-op tasks ----


def noop_shard(job: Any) -> dict[str, Any]:
    """A shard record as render_shard returns it, for a shard that renders and writes nothing."""
    return {
        "shard": job.shard,
        "images": len(job.images),
        "written": [rec.id for rec in job.images],
        "failed": [],
        "problems": [],
        "class_pixels": {},
        "masks": [],
        "part_bytes": 0,
        "node": "",
        "node_id": None,
        "pid": os.getpid(),
        "seconds": 0.0,
    }


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(
    annotations: str, shard_size: int, num_cpus: int | None, profile: Path | None
) -> dict[str, Any]:
    import cProfile
    import pstats

    import ray
    from render_bench import MemoryPoller

    import rayseg.masks
    import rayseg.shard
    from rayseg.config import MasksConfig
    from rayseg.rayconnect import connect_ray

    connect_ray(None, num_cpus)
    base = status_bytes("VmRSS")
    timings: dict[str, float] = {"parse": 0.0, "parse_cpu": 0.0}
    in_flight = [0]

    def timed(load: Any) -> Any:
        def timed_load(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return load(*args, **kwargs)
            finally:
                timings["parse"] += time.perf_counter() - start
                timings["parse_cpu"] += time.process_time() - cpu

        return timed_load

    def counting_wait(refs: Any, *args: Any, **kwargs: Any) -> Any:
        in_flight[0] = max(in_flight[0], len(refs))
        return wait(refs, *args, **kwargs)

    wait = ray.wait
    for name in ("load_coco", "load_coco_apart"):  # in this process or a child of it
        if hasattr(rayseg.masks, name):
            setattr(rayseg.masks, name, timed(getattr(rayseg.masks, name)))
    rayseg.shard.render_shard = noop_shard
    ray.wait = counting_wait
    with tempfile.TemporaryDirectory(dir=DATA_DIR, prefix="driver_bench_") as out:
        cfg = MasksConfig(
            annotations=annotations,
            out=out,
            shard_size=shard_size,
            overwrite=True,
            render_while_ray_starts=False,  # every shard a (no-op) task
        )
        memory = MemoryPoller(os.getpid())  # counts rayseg's parse child, not Ray's processes
        profiler = cProfile.Profile() if profile else None
        start, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        manifest = rayseg.masks.run_masks(cfg)
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
        memory.stop()
        if profiler:
            profiler.disable()
            with open(profile, "w") as f:
                pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(40)
    return {
        "images": manifest["counts"]["images_valid"],
        "written": manifest["counts"]["masks_written"],
        "shards": manifest["counts"]["shards"],
        "seconds": total,
        "parse_seconds": timings["parse"],
        # The driver process's CPU time, all its threads (Ray's included).
        "cpu_seconds": total_cpu,
        "parse_cpu_seconds": timings["parse_cpu"],
        "base_bytes": base,
        "peak_bytes": status_bytes("VmHWM"),
        "tree_peak_bytes": memory.tree_peak,
        "max_in_flight": in_flight[0],
        "cpus": ray.cluster_resources().get("CPU", 0),
    }


# ---- the parent ----


def run_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", str(path), "--shard-size", str(args.shard_size)]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    if args.profile:
        argv += ["--profile", str(args.profile.with_suffix(f".{path.stem}.txt"))]
    return run_json(argv, f"driver run on {path.name}", cwd=BENCH.parent)


def per_core_rate(path: Path) -> float:
    from minimal import render_minimal
    from render_bench import first_images

    images, groups = first_images(path, 1000)
    with tempfile.TemporaryDirectory(dir=DATA_DIR, prefix="driver_bench_minimal_") as out:
        start = time.perf_counter()
        render_minimal(images, groups, out)
        return len(images) / (time.perf_counter() - start)


def report(rows: list[tuple[Path, dict[str, Any]]], rate: float, rate_note: str) -> str:
    lines = [
        f"{'images':>9} {'file MiB':>8} {'shards':>6} {'total s':>8} {'parse s':>8} "
        f"{'dispatch s':>10} {'(CPU s)':>8} {'shards/s':>8} {'images/s':>9} {'in flight':>9} "
        f"{'driver MiB':>10} {'per 1M images':>13} {'peak / file':>11} {'+children':>9}"
    ]
    for path, r in rows:
        dispatch = r["seconds"] - r["parse_seconds"]
        dispatch_cpu = r["cpu_seconds"] - r["parse_cpu_seconds"]
        extra = r["peak_bytes"] - r["base_bytes"]
        lines.append(
            f"{r['images']:>9} {path.stat().st_size / 2**20:>8.0f} {r['shards']:>6} "
            f"{r['seconds']:>8.2f} {r['parse_seconds']:>8.2f} {dispatch:>10.2f} "
            f"{dispatch_cpu:>8.2f} {r['shards'] / dispatch:>8.0f} {r['images'] / dispatch:>9.0f} "
            f"{r['max_in_flight']:>9} {extra / 2**20:>10.0f} "
            f"{extra / r['images'] * 1e6 / 2**20:>9.0f} MiB "
            f"{r['peak_bytes'] / path.stat().st_size:>10.2f}x "
            f"{r['tree_peak_bytes'] / path.stat().st_size:>8.2f}x"
        )
    cpus = int(rows[0][1]["cpus"])
    lines += [
        f"(local Ray with {cpus} CPUs; dispatch = all but the parse: job building, submit,",
        " collect, manifest; CPU s = the driver process's CPU time in it; driver MiB = peak RSS",
        " above the RSS after imports and Ray start-up; peak / file = the whole peak RSS;",
        " +children = the peak of its RSS plus its non-Ray children's (the parse child), sampled",
        " every 0.1 s; in flight = the most refs in one ray.wait)",
        f"render rate per core: {rate:.0f} images/s ({rate_note})",
    ]
    for _, r in rows:
        wall = r["images"] / (r["seconds"] - r["parse_seconds"])
        cpu = r["images"] / max(r["cpu_seconds"] - r["parse_cpu_seconds"], 1e-9)
        per_image = (r["peak_bytes"] - r["base_bytes"]) / r["images"]
        lines.append(
            f"  {r['images']:>9} images: one driver keeps {wall / rate:.0f} worker cores busy at "
            f"this machine's dispatch rate, {cpu / rate:.0f} at its CPU cost per image "
            f"(cluster.yaml: {CLUSTER_WORKER_CORES}); a 32 GiB head holds the driver state of "
            f"~{HEAD_MEMORY_BYTES / per_image / 1e6:.0f}M images"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZES} images only")
    parser.add_argument("--sizes", help=f"images per run, comma-separated (default {FULL_SIZES})")
    parser.add_argument("--shard-size", type=int, default=200, help="0: rayseg's auto size")
    parser.add_argument("--num-cpus", type=int, help="local Ray's CPUs (default: all cores)")
    parser.add_argument("--per-core-rate", type=float, help="images/s per core (default: measured)")
    parser.add_argument(
        "--profile", type=Path, help="write each run's cProfile (cumulative) to PROFILE.<file>.txt"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.shard_size, args.num_cpus, args.profile)))
        return 0

    from render_bench import write_results

    sizes = [int(s) for s in (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",")]
    paths = [annotations_file(n) for n in sizes]
    rows = []
    for path in paths:
        print(f"driver run on {path.name} (no-op tasks) ...", flush=True)
        rows.append((path, run_child(path, args)))
    if args.per_core_rate:
        rate, note = args.per_core_rate, "--per-core-rate"
    else:
        rate = per_core_rate(paths[0])
        note = f"bench/minimal.py on the first 1,000 images of {paths[0].name}, this machine"
    text = report(rows, rate, note)
    key = "quick" if args.quick else "full" if not args.sizes else f"sizes {args.sizes}"
    written = write_results("driver_bench", key, text)
    print(f"\n{text}\n(written to {written})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
