"""`rayseg masks` on a simulated cluster (issue 10): 2 nodes of 1 CPU against 1 node of 1 CPU.

    python bench/scale_bench.py          # 8,000 images (make_coco.py --preset render), ~1.5 min
    python bench/scale_bench.py --quick  # 1,000 images, < 1 min

Each configuration runs in a fresh Python process with its own RAY_TMPDIR: a
ray.cluster_utils.Cluster on this machine whose head has num_cpus=0 (the driver's node, as
cluster.yaml's head: no tasks) plus N worker nodes of 1 CPU, then rayseg.masks.run_masks with
`address` set to the cluster, after one warm-up task per node has started this job's worker
process there. Reported: end to end (run_masks; the cluster and its workers already up), the
rendering phase (first shard start to last shard end, from the shard records), the nodes that
rendered, and the 2-node / 1-node throughput ratios (target ~2x). The nodes share this machine's
cores with the driver and with anything else running, so the ratio needs 3 idle cores to reach 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from make_coco import DATA_DIR, ensure_preset
from subset_bench import run_json

BENCH = Path(__file__).resolve().parent
QUICK_IMAGES = 1000
NODE_COUNTS = (1, 2)
TARGET_SCALING = 2.0


def child(annotations: str, nodes: int, shard_size: int) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster
    from render_bench import rendering_phase

    from rayseg.config import MasksConfig
    from rayseg.masks import run_masks
    from rayseg.rayconnect import connect_ray

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    out = tempfile.mkdtemp(dir=DATA_DIR, prefix="scale_bench_")
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        connect_ray(cluster.address)
        warm_workers()
        cfg = MasksConfig(
            annotations=annotations,
            out=out,
            shard_size=shard_size,
            overwrite=True,
            address=cluster.address,
        )
        start = time.perf_counter()
        manifest = run_masks(cfg)
        seconds = time.perf_counter() - start
        records = [json.loads(p.read_text()) for p in Path(out, "_shards").glob("shard-*.json")]
        images, phase, busy = rendering_phase(Path(out, "_shards"))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    return {
        "nodes": nodes,
        "images": manifest["counts"]["masks_written"],
        "seconds": seconds,
        "phase_images": images,
        "phase_seconds": phase,
        "task_seconds": busy,
        "nodes_used": len({r.get("node_id") for r in records}),
    }


def warm_workers() -> None:
    """Start this job's worker process on every node with CPUs, so the rendering phase measures
    the nodes working rather than the first worker start on each (Ray reuses it for the shards)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def node_id() -> str:
        return ray.get_runtime_context().get_node_id()

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    ray.get(
        [
            node_id.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)
            ).remote()
            for n in nodes
        ]
    )


def run_child(path: Path, nodes: int, shard_size: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", str(path), "--nodes", str(nodes)]
    argv += ["--shard-size", str(shard_size)]
    # Short: Ray's unix sockets live under it and socket paths must stay under 108 bytes.
    tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
    try:
        return run_json(argv, f"{nodes}-node run", cwd=BENCH.parent, env=env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["phase_seconds"] or r["seconds"])


def hardware_scaling(path: Path, images: int) -> tuple[float, float]:
    """The minimal pipeline's images/s in 1 process and in 2 at once (one folder): how far this
    machine's cores and file system let 2 workers scale without any Ray or rayseg."""
    from render_bench import measure_minimal

    work = Path(tempfile.mkdtemp(dir=DATA_DIR, prefix="scale_minimal_"))
    try:
        m = measure_minimal(path, work, images, repeats=1, processes=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return m.rate, m.parallel_rate


def report(
    path: Path, results: dict[int, dict[str, Any]], repeat: int, minimal: tuple[float, float]
) -> str:
    lines = [
        f"file: {path.name}; head num_cpus=0 + N worker nodes of 1 CPU; best of {repeat}",
        f"{'nodes':>5} {'images':>7} {'end to end s':>12} {'images/s':>9} {'phase s':>8} "
        f"{'images/s':>9} {'tasks busy s':>12} {'nodes used':>10}",
    ]
    for n, r in results.items():
        lines.append(
            f"{n:>5} {r['images']:>7} {r['seconds']:>12.2f} {r['images'] / r['seconds']:>9.1f} "
            f"{r['phase_seconds']:>8.2f} {r['phase_images'] / r['phase_seconds']:>9.1f} "
            f"{r['task_seconds']:>12.1f} {r['nodes_used']:>10}"
        )
    one, two = results[1], results[2]
    end = one["seconds"] / two["seconds"]
    phase = (two["phase_images"] / two["phase_seconds"]) / (
        one["phase_images"] / one["phase_seconds"]
    )
    lines.append(f"2 nodes / 1 node, end to end:      {end:5.2f}x   target ~{TARGET_SCALING}x")
    lines.append(f"2 nodes / 1 node, rendering phase: {phase:5.2f}x   target ~{TARGET_SCALING}x")
    one_proc, two_procs = minimal
    lines.append(
        f"hardware reference, same run: the minimal pipeline (bench/minimal.py) {one_proc:.0f} "
        f"images/s in 1 process, {two_procs:.0f} in 2 at once: {two_procs / one_proc:.2f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images")
    parser.add_argument("--annotations", type=Path, help="default: make_coco.py's render preset")
    parser.add_argument("--shard-size", type=int, help="default 200 (--quick: 50)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; best kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shard_size = args.shard_size or (50 if args.quick else 200)
    if args.child:
        print(json.dumps(child(args.child, args.nodes, args.shard_size)))
        return 0

    from render_bench import quick_file, write_results

    path = args.annotations or (quick_file(QUICK_IMAGES) if args.quick else ensure_preset("render"))
    results = {}
    for n in NODE_COUNTS:
        runs = []
        for _ in range(args.repeat):
            print(f"{n} node(s) x 1 CPU on {path.name} ...", flush=True)
            runs.append(run_child(path, n, args.shard_size))
        results[n] = best(runs)
    print("minimal pipeline, 1 and 2 processes ...", flush=True)
    minimal = hardware_scaling(path, QUICK_IMAGES if args.quick else 8000)
    text = report(path, results, args.repeat, minimal)
    written = write_results("scale_bench", "quick" if args.quick else "full", text)
    print(f"\n{text}\n(written to {written})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
