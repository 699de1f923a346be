"""Masks and training on separate hosts (the namespace cluster of tests/cluster) against the same
runs on ray.cluster_utils.Cluster (one host, one network stack), so the cost of real networking
shows. Needs root and Linux namespaces.

    sudo .venv/bin/python bench/nscluster_bench.py                 # 400 images, ~10 min on 2 cores
    sudo .venv/bin/python bench/nscluster_bench.py --images 200 --json out.json

Masks: `jobs/masks.py` submitted from the client host, images and outputs on S3 (moto on the
head), on 3, then
2, then 1 worker hosts of 1 CPU (hosts killed in between); images/s from submit to end, and the
bytes that crossed the switch (every worker port, both directions) per image, beside the bytes of
the objects the run wrote to S3. Training: `jobs/train.py`, 1 rank against 2 ranks on 2 hosts
(1 CPU each), images/s of the second epoch (the first pays Ray Data's start-up).
The same masks and training runs then go through `ray.cluster_utils.Cluster` (a 0-CPU head and
1-CPU nodes in this network namespace) with a local output folder. Every host shares this
machine's cores: with 2 cores, 3 worker hosts cannot run 3x faster than one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import demo_job  # noqa: E402
import nscluster  # noqa: E402

TRAIN = [
    "--model", "lraspp_mobilenet_v3_large", "--batch-size", "4", "--crop-size", "64",
    "--epochs", "2", "--lr", "0.05", "--cpus-per-worker", "1", "--val-fraction", "0.2",
]  # fmt: skip


def switch_bytes(c: nscluster.NsCluster) -> int:
    """Bytes through every worker port of the switch so far (both directions)."""
    total = 0
    for name in nscluster.WORKERS:
        out = subprocess.run(
            ["ip", "-n", c.switch, "-j", "-s", "link", "show", f"p-{name}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        stats = json.loads(out)[0]["stats64"]
        total += stats["rx"]["bytes"] + stats["tx"]["bytes"]
    return total


def second_epoch_rate(text: str) -> float:
    rates = [float(x) for x in re.findall(r"epoch 2/2 .*?([\d.]+) images/s", text)]
    if not rates:
        raise RuntimeError(f"no epoch 2 line in:\n{text[-3000:]}")
    return rates[-1]


def ns_runs(images: int) -> dict:
    results: dict = {"masks": {}, "train": {}}
    with nscluster.cluster() as c:
        annotations = demo_job.prepare_data(c, images)
        for hosts in (3, 2, 1):
            if hosts < 3:
                c.kill_host(nscluster.WORKERS[hosts])
                c.wait_for_nodes(1 + hosts)
            out = f"masks-{hosts}"
            before, began = switch_bytes(c), time.monotonic()
            run = demo_job.submit(c, "masks.py", "--annotations", annotations,
                                  "--out", f"s3://rayseg/{out}", "--shard-size", "20",
                                  "--images-dir", "s3://rayseg/images")  # fmt: skip
            seconds = time.monotonic() - began
            if run.returncode != 0:
                raise RuntimeError(run.stdout[-3000:])
            moved = switch_bytes(c) - before
            written = sum(demo_job.bucket(c, f"{out}/").values())
            results["masks"][hosts] = {
                "seconds": round(seconds, 1),
                "images_per_s": round(images / seconds, 1),
                "switch_bytes_per_image": round(moved / images),
                "s3_bytes_written_per_image": round(written / images),
            }
            print(f"namespace cluster, masks on {hosts} hosts: {results['masks'][hosts]}")
        for name in nscluster.WORKERS[1:]:
            c.revive(name)
        c.wait_for_nodes(4)
        for ranks in (1, 2):
            run = demo_job.submit(c, "train.py", "--data", "s3://rayseg/masks-3",
                                  "--out", f"s3://rayseg/train-{ranks}",
                                  "--num-workers", str(ranks), *TRAIN)  # fmt: skip
            if run.returncode != 0:
                raise RuntimeError(run.stdout[-3000:])
            results["train"][ranks] = {"images_per_s": second_epoch_rate(run.stdout)}
            print(f"namespace cluster, training with {ranks} ranks: {results['train'][ranks]}")
    return results


def local_runs(images: int) -> dict:
    """The same runs on ray.cluster_utils.Cluster, one fresh process per configuration."""
    results: dict = {"masks": {}, "train": {}}
    work = Path(tempfile.mkdtemp(prefix="nsbench-"))
    from rayseg.config import SynthConfig
    from rayseg.synth import run_synth

    run_synth(SynthConfig(out=str(work / "data"), num_images=images))
    for hosts in (3, 2, 1):
        results["masks"][hosts] = child(["masks", str(hosts), str(work), str(images)])
        print(f"cluster_utils, masks on {hosts} nodes: {results['masks'][hosts]}")
    for ranks in (1, 2):
        results["train"][ranks] = child(["train", str(ranks), str(work), str(images)])
        print(f"cluster_utils, training with {ranks} ranks: {results['train'][ranks]}")
    return results


def child(args: list[str]) -> dict:
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rs-", dir="/tmp")}
    run = subprocess.run([sys.executable, __file__, "--child", *args], env=env,
                         capture_output=True, text=True)  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(run.stdout[-2000:] + run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def child_main(what: str, count: int, work: Path, images: int) -> dict:
    import contextlib
    import io

    from ray.cluster_utils import Cluster

    from rayseg.cli import main

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3 if what == "train" else count):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    masks = work / "masks-local"
    if what == "masks":
        began = time.monotonic()
        argv = ["masks", "--annotations", str(work / "data" / "annotations.json"),
                "--out", str(work / f"masks-{count}"), "--shard-size", "20",
                "--images-dir", str(work / "data" / "images"),
                "--address", cluster.address]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 0
        seconds = time.monotonic() - began
        if count == 3:
            os.replace(work / "masks-3", masks)
        return {"seconds": round(seconds, 1), "images_per_s": round(images / seconds, 1)}
    out = io.StringIO()
    argv = ["train", "--data", str(masks), "--out", str(work / f"train-{count}"),
            "--num-workers", str(count), "--address", cluster.address, *TRAIN]  # fmt: skip
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return {"images_per_s": second_epoch_rate(out.getvalue())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "nscluster_bench.json"
    )
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        what, count, work, images = args.child
        print(json.dumps(child_main(what, int(count), Path(work), int(images))))
        return 0
    why = nscluster.why_unavailable()
    if why:
        print(f"nscluster_bench: {why}", file=sys.stderr)
        return 2
    result = {
        "machine": {"cores": os.cpu_count()},
        "images": args.images,
        "namespace_cluster": ns_runs(args.images),
        "cluster_utils": local_runs(args.images),
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
