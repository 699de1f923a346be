"""Training ingest throughput per CPU core on COCO-sized images, and the CPUs one GPU needs.

    python bench/ingest_bench.py                       # 400 synthetic 640x480 JPEGs, crop 480
    python bench/ingest_bench.py --data OUT/masks      # any `rayseg masks --images-dir` output

The pipeline is rayseg's training ingest: Parquet -> JPEG + PNG decode -> random resize 0.5-2x ->
480 crop -> flip -> batch of 16 (rayseg.ingest.train_dataset).
(a) one process, one thread, no Ray: rayseg.ingest.train_batch over the rows (the work itself).
(b) the Ray Data dataset with --cpus CPUs, iterated as Ray Train's workers do (iter_batches),
    per core = images/s / cpus: Ray Data's scheduling and object transfer included.
The CPUs that sustain a GPU step rate R (default 272 images/s: deeplabv3_resnet50, 480 px,
batch 16, bf16 + channels_last + torch.compile on one H200, bench/results/gpu_bench_h200.json)
are R / (b)'s per-core rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train_bench import make_data  # noqa: E402  (bench/ is on sys.path when run as a script)

from rayseg import ingest  # noqa: E402
from rayseg.models import class_map_from_meta  # noqa: E402

GPU_RATE = 272.0


def single_core(summary: ingest.DataSummary, lut: np.ndarray, crop: int, batch: int) -> float:
    """(a): images/s of train_batch in this process, one OpenCV thread."""
    import cv2

    cv2.setNumThreads(1)
    rows = [
        t
        for p in summary.paths
        for t in [
            pq.read_table(p, filesystem=summary.location.fs, columns=["image_id", "image", "mask"])
        ]
    ]
    n = 0
    start = time.perf_counter()
    for table in rows:
        for chunk in table.to_batches(max_chunksize=batch):
            cols = {
                k: np.array(chunk.column(k).to_pylist(), dtype=object) for k in ("image", "mask")
            }
            cols["image_id"] = np.asarray(chunk.column("image_id").to_pylist())
            ingest.train_batch(cols, lut=lut, crop_size=crop)
            n += chunk.num_rows
    return n / (time.perf_counter() - start)


def ray_data(summary, ids, lut: np.ndarray, crop: int, batch: int, cpus: int, epochs: int):
    """(b): images/s of the Ray Data dataset over `epochs` passes after one warm-up pass."""
    import ray

    from rayseg.runtime import connect_ray

    connect_ray(None, cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ingest.train_dataset(summary, ids, lut=lut, crop_size=crop, batch_size=batch)
    rates = []
    for epoch in range(epochs + 1):
        n, start = 0, time.perf_counter()
        for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2):
            n += len(b["image_id"])
        if epoch:  # the first pass pays Ray Data's start-up
            rates.append(n / (time.perf_counter() - start))
    ray.shutdown()
    return float(np.median(rates))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a `rayseg masks` output with embedded images")
    p.add_argument("--num-images", type=int, default=400)
    p.add_argument("--crop-size", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--epochs", type=int, default=2, help="timed passes after a warm-up pass")
    p.add_argument("--gpu-rate", type=float, default=GPU_RATE, help="images/s one GPU trains")
    args = p.parse_args()
    data = args.data or make_data(REPO / "bench" / "_data", args.num_images, width=640, height=480)
    summary = ingest.scan_data(data)
    lut = class_map_from_meta(summary.meta).train_lut()
    ids = np.unique(summary.image_ids)
    one = single_core(summary, lut, args.crop_size, args.batch_size)
    many = ray_data(summary, ids, lut, args.crop_size, args.batch_size, args.cpus, args.epochs)
    per_core = many / args.cpus
    result = {
        "images": int(len(ids)),
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "cpus": args.cpus,
        "single_core_images_per_s": round(one, 1),
        "ray_data_images_per_s": round(many, 1),
        "ray_data_images_per_s_per_core": round(per_core, 1),
        "ray_data_vs_single_core": round(per_core / one, 3),
        "gpu_rate": args.gpu_rate,
        "cpus_per_gpu": round(args.gpu_rate / per_core, 1),
    }
    print(
        f"(a) one core, no Ray: {one:.1f} images/s\n"
        f"(b) Ray Data, {args.cpus} CPUs: {many:.1f} images/s = {per_core:.1f} per core "
        f"({per_core / one:.0%} of (a))\n"
        f"CPUs to feed {args.gpu_rate:.0f} images/s: {args.gpu_rate / per_core:.1f}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
