"""Training ingest per CPU core: the work alone, a torch DataLoader, and rayseg's Ray Data ingest.

    python bench/ingest_bench.py --images 2000 --json bench/results/ingest_bench.json
    python bench/ingest_bench.py --data OUT/masks --json x.json   # any `rayseg masks --images-dir`

The work is rayseg's training recipe per image: JPEG + PNG decode, random resize 0.5-2x, 480 crop
padded with ignore, flip, batch of 16 (rayseg.ingest.train_batch). Synthetic data: 640x480 JPEGs
(rayseg synth), Parquet parts of 200 rows (the `rayseg masks` default for large inputs).
All in one process tree, on the same rows, epochs after the first ("steady state"):
(a) work alone: train_batch in this process, one thread, no Ray, no torch.
(b) torch DataLoader, num_workers = cores, persistent workers, rows in memory (fork-shared),
    the same per-image work in __getitem__, default collate. The peer users would pick instead.
(c) rayseg: ingest.train_dataset, consumed as `rayseg train` consumes it (streaming_split as Ray
    Train does, then iter_torch_batches with train.py's arguments).
(d) rayseg before issue 22: the same wiring with the previous per-image recipe (resize the whole
    image, then crop; numpy look-up table), kept here as `before_train_batch`.
Per core = images/s / cores. The waits: (c) again, paced by a simulated step that takes 75% of
(c)'s steady rate, with a validation pause between epochs during which the next epoch's first
batch is fetched (rayseg.loop.Prefetched, as train.py does): the share of each epoch's time spent
blocked on data, first epoch and later epochs.
Cheap wins are timed per image in this process (ms): decode at half size, crop before resize,
the look-up table, OpenCV threads.
Cores per GPU = the GPU step rate (272 images/s: deeplabv3_resnet50, 480 px, batch 16, bf16 +
channels_last + torch.compile on one H200, bench/results/gpu_bench_h200.json) / (c) per core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rayseg import ingest, storage  # noqa: E402
from rayseg.models import class_map_from_meta  # noqa: E402

GPU_RATE = 272.0
PACE = 0.75  # the simulated step consumes this share of (c)'s steady rate
VAL_PAUSE_S = 2.0  # simulated validation between epochs


def make_data(folder: Path, num_images: int) -> str:
    """Synthetic 640x480 images -> masks Parquet with embedded JPEGs (cached per count)."""
    from rayseg.config import MasksConfig, SynthConfig
    from rayseg.masks import run_masks
    from rayseg.synth import run_synth

    masks = folder / f"ingest-masks-{num_images}"
    if not (masks / "manifest.json").exists():
        synth = folder / f"ingest-synth-{num_images}"
        run_synth(SynthConfig(out=str(synth), num_images=num_images, width=640, height=480))
        run_masks(
            MasksConfig(
                annotations=str(synth / "annotations.json"),
                out=str(masks),
                images_dir=str(synth / "images"),
                shard_size=200,
            )
        )
    return str(masks)


def load_rows(summary: ingest.DataSummary) -> dict[str, np.ndarray]:
    """Every row's encoded columns in memory (object arrays of bytes), as a Ray Data batch."""
    tables = [
        pq.read_table(p, filesystem=summary.location.fs, columns=["image_id", "image", "mask"])
        for p in summary.paths
    ]
    cols = {k: [v for t in tables for v in t[k].to_pylist()] for k in ("image", "mask")}
    rows = {k: np.array(v, dtype=object) for k, v in cols.items()}
    rows["image_id"] = np.concatenate([t["image_id"].to_numpy() for t in tables])
    return rows


# ---- the recipe before issue 22, for (d) and the wins -------------------------------------


def before_augment(image, mask, *, crop_size, rng):
    """Resize the whole image, pad, then crop and flip (rayseg.ingest.augment until issue 22)."""
    s = rng.uniform(*ingest.SCALE_RANGE)
    h, w = mask.shape
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    image, mask = before_pad(image, mask, max(crop_size, size[1]), max(crop_size, size[0]))
    y = int(rng.integers(0, mask.shape[0] - crop_size + 1))
    x = int(rng.integers(0, mask.shape[1] - crop_size + 1))
    image = image[y : y + crop_size, x : x + crop_size]
    mask = mask[y : y + crop_size, x : x + crop_size]
    if rng.random() < ingest.FLIP_PROBABILITY:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def before_pad(image, mask, height, width):
    h, w = mask.shape
    if (h, w) == (height, width):
        return image, mask
    out_image = np.zeros((height, width, 3), np.uint8)
    out_mask = np.full((height, width), ingest.TRAIN_IGNORE, np.uint8)
    out_image[:h, :w] = image
    out_mask[:h, :w] = mask
    return out_image, out_mask


def before_train_batch(batch, *, lut, crop_size):
    cv2.setNumThreads(1)
    rng = np.random.default_rng()
    n = len(batch["image_id"])
    images = np.zeros((n, crop_size, crop_size, 3), np.uint8)
    masks = np.full((n, crop_size, crop_size), ingest.TRAIN_IGNORE, np.uint8)
    problem = np.zeros(n, np.uint8)
    for i in range(n):
        try:
            image, mask = ingest.decode_pair(batch["image"][i], batch["mask"][i])
        except ingest.SampleError as e:
            problem[i] = e.code
            continue
        images[i], masks[i] = before_augment(image, lut[mask], crop_size=crop_size, rng=rng)
    return {
        "image": images,
        "mask": masks,
        "image_id": np.asarray(batch["image_id"], np.int64),
        "problem": problem,
    }


def before_dataset(summary, ids, *, lut, crop_size, batch_size):
    return ingest.read_rows(summary, ids, shuffle=True).map_batches(
        before_train_batch,
        fn_kwargs={"lut": lut, "crop_size": crop_size},
        batch_size=batch_size,
        batch_format="numpy",
    )


# ---- (a) the work alone, and the wins -------------------------------------------------------


def work_alone(rows, fn, lut, crop: int, batch: int, limit: int) -> float:
    """images/s of fn (a train_batch) over the first `limit` rows, this thread only."""
    cv2.setNumThreads(1)
    n = min(limit, len(rows["image_id"]))
    start = time.perf_counter()
    for i in range(0, n, batch):
        fn({k: v[i : i + batch] for k, v in rows.items()}, lut=lut, crop_size=crop)
    return n / (time.perf_counter() - start)


def time_per_image(fn, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return 1e3 * (time.perf_counter() - start) / count


def wins(rows, lut, crop: int, count: int = 300) -> dict[str, float]:
    """ms per image of each step and each cheap win, one thread unless named."""
    imgs, msks = rows["image"][:count], rows["mask"][:count]
    pairs = [ingest.decode_pair(a, b) for a, b in zip(imgs, msks, strict=True)]
    full = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    half = cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION
    cv2.setNumThreads(1)
    out = {
        "jpeg_decode_full": time_per_image(
            lambda i: cv2.imdecode(np.frombuffer(imgs[i], np.uint8), full), count
        ),
        "jpeg_decode_half_dct": time_per_image(
            lambda i: cv2.imdecode(np.frombuffer(imgs[i], np.uint8), half), count
        ),
        "png_decode": time_per_image(lambda i: storage.decode_png(msks[i]), count),
        "lut_numpy": time_per_image(lambda i: lut[pairs[i][1]], count),
        "lut_cv2": time_per_image(lambda i: ingest.to_train_ids(pairs[i][1], lut), count),
    }
    for name, aug in (("resize_then_crop", before_augment), ("crop_then_resize", ingest.augment)):
        out[name] = time_per_image(
            lambda i, aug=aug: aug(
                pairs[i][0], pairs[i][1], crop_size=crop, rng=np.random.default_rng(i)
            ),
            count,
        )
    batches = {k: v[:count] for k, v in rows.items()}
    for name, fn in (("before", before_train_batch), ("after", ingest.train_batch)):
        out[f"train_batch_{name}"] = 1e3 / work_alone(batches, fn, lut, crop, 16, count)
    cv2.setNumThreads(cv2.getNumberOfCPUs())
    out["resize_then_crop_all_cv2_threads"] = time_per_image(
        lambda i: before_augment(
            pairs[i][0], pairs[i][1], crop_size=crop, rng=np.random.default_rng(i)
        ),
        count,
    )
    cv2.setNumThreads(1)
    return {k: round(v, 3) for k, v in out.items()}


# ---- (b) torch DataLoader -------------------------------------------------------------------


class RowDataset:
    """torch map-style dataset over rows held in memory: item i -> one decoded, augmented row."""

    def __init__(self, rows, lut, crop: int) -> None:
        self.rows, self.lut, self.crop = rows, lut, crop

    def __len__(self) -> int:
        return len(self.rows["image_id"])

    def __getitem__(self, i: int):
        one = {k: v[i : i + 1] for k, v in self.rows.items()}
        out = ingest.train_batch(one, lut=self.lut, crop_size=self.crop)
        return {k: v[0] for k, v in out.items()}


def dataloader(rows, lut, crop: int, batch: int, workers: int, epochs: int) -> float:
    """(b): steady images/s of a torch DataLoader with `workers` processes."""
    import torch

    loader = torch.utils.data.DataLoader(
        RowDataset(rows, lut, crop),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=4,
    )
    rates = [rate(loader) for _ in range(epochs + 1)][1:]
    del loader
    return float(np.median(rates))


def rate(batches) -> float:
    n, start = 0, time.perf_counter()
    for b in batches:
        n += len(b["image_id"])
    return n / (time.perf_counter() - start)


# ---- (c), (d) Ray Data, consumed as rayseg train consumes it --------------------------------


def torch_batches(split, batch: int):
    """train.py's iter_torch_batches call (rayseg.train.train_batches), on CPU."""
    return split.iter_torch_batches(
        batch_size=batch,
        drop_last=True,
        local_shuffle_buffer_size=4 * batch,
        prefetch_batches=2,
        device="cpu",
    )


def ray_rate(ds, batch: int, epochs: int) -> float:
    """Steady images/s: the median of `epochs` passes after a first one."""
    (split,) = ds.streaming_split(1, equal=True)  # Ray Train's DataConfig does this per worker
    rates = [rate(torch_batches(split, batch)) for _ in range(epochs + 1)][1:]
    return float(np.median(rates))


def ray_waits(ds, batch: int, epochs: int, step_rate: float) -> list[float]:
    """Share of each epoch's time blocked on data, behind a step of `step_rate` images/s."""
    from rayseg.loop import Prefetched

    (split,) = ds.streaming_split(1, equal=True)
    shares = []
    batches = Prefetched(torch_batches(split, batch))
    for epoch in range(epochs):
        waited, start = 0.0, time.perf_counter()
        it = iter(batches)
        while True:
            t = time.perf_counter()
            b = next(it, None)
            waited += time.perf_counter() - t
            if b is None:
                break
            time.sleep(len(b["image_id"]) / step_rate)  # the GPU step
        shares.append(waited / (time.perf_counter() - start))
        if epoch + 1 < epochs:
            batches = Prefetched(torch_batches(split, batch))  # starts during validation
            time.sleep(VAL_PAUSE_S)
    return shares


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic images to make")
    p.add_argument("--data", help="a `rayseg masks` output with embedded images instead")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--crop-size", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--epochs", type=int, default=2, help="timed passes after the first")
    p.add_argument("--gpu-rate", type=float, default=GPU_RATE, help="images/s one GPU trains")
    args = p.parse_args()
    import ray

    from rayseg.runtime import connect_ray

    data = args.data or make_data(REPO / "bench" / "_data", args.images)
    summary = ingest.scan_data(data)
    lut = class_map_from_meta(summary.meta).train_lut()
    ids = np.unique(summary.image_ids)
    rows = load_rows(summary)
    crop, bs, cores = args.crop_size, args.batch_size, args.cpus
    log = lambda s: print(s, flush=True)  # noqa: E731

    win = wins(rows, lut, crop)
    log(f"wins (ms per image): {win}")
    limit = min(len(ids), 800)
    alone = work_alone(rows, ingest.train_batch, lut, crop, bs, limit)
    alone_before = work_alone(rows, before_train_batch, lut, crop, bs, limit)
    log(f"(a) work alone: {alone:.1f} images/s (before: {alone_before:.1f})")
    loader = dataloader(rows, lut, crop, bs, cores, args.epochs)
    log(f"(b) DataLoader, {cores} workers: {loader:.1f} images/s")

    connect_ray(None, cores)
    ray.data.DataContext.get_current().enable_progress_bars = False
    after = ray_rate(ingest.train_dataset(summary, ids, lut=lut, crop_size=crop, batch_size=bs),
                     bs, args.epochs)
    log(f"(c) rayseg: {after:.1f} images/s")
    before = ray_rate(before_dataset(summary, ids, lut=lut, crop_size=crop, batch_size=bs),
                      bs, args.epochs)
    log(f"(d) rayseg before: {before:.1f} images/s")
    waits = ray_waits(
        ingest.train_dataset(summary, ids, lut=lut, crop_size=crop, batch_size=bs),
        bs, args.epochs + 1, PACE * after,
    )
    log(f"waits behind a {PACE * after:.1f} images/s step: {[round(w, 3) for w in waits]}")
    ray.shutdown()

    per = lambda r: round(r / cores, 1)  # noqa: E731
    result = {
        "cores": cores,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()},
        "images": int(len(ids)),
        "crop_size": crop,
        "batch_size": bs,
        "epochs_timed": args.epochs,
        "work_alone": {
            "images_per_s_per_core": round(alone, 1),
            "before_images_per_s_per_core": round(alone_before, 1),
        },
        "dataloader": {"images_per_s_per_core": per(loader), "num_workers": cores},
        "rayseg": {
            "images_per_s_per_core": per(after),
            "vs_cores_x_work_alone": round(after / (cores * alone), 3),
            "vs_dataloader": round(after / loader, 3),
            "first_epoch_wait": round(waits[0], 3),
            "later_epoch_wait": round(float(np.median(waits[1:])), 3),
            "paced_step_images_per_s": round(PACE * after, 1),
        },
        "rayseg_before": {"images_per_s_per_core": per(before)},
        "wins_ms_per_image": win,
        "gpu_rate": args.gpu_rate,
        "cores_per_gpu_272": round(args.gpu_rate / (after / cores), 2),
    }
    log(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
