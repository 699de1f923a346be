"""Training ingest per CPU core: the work alone, a torch DataLoader, and rayseg's Ray Data ingest.

    python bench/ingest_bench.py --images 2000 --json bench/results/ingest_bench.json
    python bench/ingest_bench.py --data OUT/masks --json x.json   # any `rayseg masks --images-dir`

The work is rayseg's training recipe per image: JPEG + PNG decode, random resize 0.5-2x, 480 crop
padded with ignore, flip, batch of 16 (rayseg.ingest.train_batch). Synthetic data: 640x480 JPEGs
(rayseg synth), Parquet parts of 200 rows (the `rayseg masks` default for large inputs).
All in one process tree, on the same rows, epochs after the first ("steady state"); (b) and (c)
taken in turn, then the waits, then (c') and (d) in turn (after (d)'s many small tasks, Ray's
worker processes ran (c)'s tasks ~7% slower: a cost of sharing one Ray with (d), not of (c)):
(a) work alone: train_batch in this process, one thread, no Ray, no torch: timed before Ray
    starts (400 rows, 5 rounds), and again on every row in the rounds of (b) and (c)
    ("same_rounds": the machine's drift during the run hits all three alike; Ray then idles
    beside it).
(a2) the work alone in `cores` processes at once (forked before Ray starts), each on its share
    of the rows, nothing handed over: what the cores give the work in parallel with no
    pipeline at all, beside cores x (a). Taken in the same rounds.
(b) torch DataLoader, num_workers = cores, persistent workers, rows in memory (fork-shared),
    the same per-image work in __getitem__, default collate. The peer users would pick instead.
(c) rayseg: what `rayseg train` feeds a worker (rayseg.feed.Feed of ingest.train_tasks): a Ray
    task per Parquet part, read, decoded and augmented, its batches streamed to this process as
    numpy arrays in Ray's object store, as many tasks at once as cores.
(c') rayseg_raydata: this recipe through the Ray Data wiring that (c) replaced (read_parquet ->
    map_batches of a whole part, fused; streaming_split as Ray Train's DataConfig does, then
    iter_torch_batches with a local shuffle buffer of 4 batches).
(d) rayseg before issue 22: Ray Data's read -> filter by id -> map_batches of 16 rows (a task
    per batch) with the per-image recipe before it (resize the whole image, then crop; numpy
    look-up table), kept here as `before_train_batch`.
Per core: images per CPU second of the whole process tree (this process, its DataLoader workers,
Ray's gcs, raylet, actors and task workers; for (a) this thread), beside wall images/s / cores:
on a machine that others load too, wall time counts their share and CPU time does not.
The waits: (c) again on --wait-images images, paced by a simulated step at half (c)'s wall rate.
As train.py does, the first epoch's tasks start before the model is built (deeplabv3_resnet50
here, on CPU), and the next epoch's start before a validation pause between epochs: the share
of each epoch's time spent blocked on data, the first epoch and the later ones; then the same
under Ray Train (a TorchTrainer of one worker making its Feeds as `rayseg train` does), first
without rayseg.prestart, then with it, as `rayseg train` runs.
Cheap wins are timed per image in this thread (CPU ms): decode at half size (JPEG DCT scaling),
crop before resize, the look-up table, OpenCV threads (CPU of all threads).
Cores per GPU = the GPU step rate (272 images/s: deeplabv3_resnet50, 480 px, batch 16, bf16 +
channels_last + torch.compile on one H200, bench/results/gpu_bench_h200.json) / (c) per core;
gpu_cpus_per_worker = the consumer's CPU at that rate, rounded up (the tasks decode elsewhere).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rayseg import feed, ingest, prestart, storage  # noqa: E402
from rayseg.models import build_model, class_map_from_meta  # noqa: E402

GPU_RATE = 272.0
MODEL = "deeplabv3_resnet50"  # the model GPU_RATE is for
PACE = 0.5  # the simulated step consumes this share of (c)'s steady rate
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


def read_filtered(summary, ids):
    """The read before this change: Parquet rows, then a filter by image id (a Ray Data
    operator, so map_batches of a fixed batch size was not fused with the read)."""
    import ray.data
    from ray.data.expressions import col

    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            list(summary.paths), filesystem=summary.location.fs, shuffle="files"
        )
    finally:
        context.use_datasource_v2 = v2
    ds = ds.select_columns(["image_id", "image", "mask"])
    return ds.filter(expr=col("image_id").is_in([int(i) for i in ids]))


def before_dataset(summary, ids, *, fn, lut, crop_size, batch_size):
    """read_filtered -> map_batches(fn) of batch_size rows: a task per batch (before)."""
    return read_filtered(summary, ids).map_batches(
        fn,
        fn_kwargs={"lut": lut, "crop_size": crop_size},
        batch_size=batch_size,
        batch_format="numpy",
    )


def raydata_part(part, *, ids, lut, crop_size, batch_size):
    """(c'): one Parquet part's rows -> train_batch batches of its rows in `ids`, in a new order."""
    order = np.random.default_rng().permutation(np.flatnonzero(np.isin(part["image_id"], ids)))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        yield ingest.train_batch(
            {k: v[rows] for k, v in part.items()}, lut=lut, crop_size=crop_size
        )


def raydata_dataset(summary, ids, *, lut, crop_size, batch_size):
    """(c'): read_parquet -> map_batches(raydata_part) of whole parts, which Ray Data fuses into a
    task per part, with the DataContext settings rayseg had for it."""
    import ray.data

    context = ray.data.DataContext.get_current()
    settings = {"use_datasource_v2": False, "op_resource_reservation_enabled": False}
    before = {k: getattr(context, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(context, k, v)
        ds = ray.data.read_parquet(
            list(summary.paths),
            filesystem=summary.location.fs,
            columns=["image_id", "image", "mask"],
            shuffle="files",
            override_num_blocks=len(summary.paths),
        )
    finally:
        for k, v in before.items():
            setattr(context, k, v)
    return ds.map_batches(
        raydata_part,
        fn_kwargs={"ids": ids, "lut": lut, "crop_size": crop_size, "batch_size": batch_size},
        batch_size=None,
        batch_format="numpy",
    )


def epoch_tasks(summary, ids, *, batch_size: int, epoch: int) -> list[ingest.PartTask]:
    return ingest.train_tasks(
        summary, ids, rank=0, world=1, batch_size=batch_size, seed=0, epoch=epoch
    )


def feed_epochs(summary, ids, *, lut, crop_size: int, batch_size: int, in_flight: int,
                made=None):  # fmt: skip
    """(c): epoch -> rayseg.feed.Feed of that epoch's ingest.train_tasks (one worker), on CPU.
    made: the first epoch's first batch, made before (prestart.take_first), as train.py."""
    import torch

    make = functools.partial(ingest.train_batch, lut=lut, crop_size=crop_size)

    def epoch_of(epoch: int) -> feed.Feed:
        tasks = epoch_tasks(summary, ids, batch_size=batch_size, epoch=epoch)
        return feed.Feed(
            tasks, fs=summary.location.fs, make_batch=make, in_flight=in_flight, num_cpus=1.0,
            device=torch.device("cpu"), made=made if epoch == 1 else None,
        )  # fmt: skip

    return epoch_of


# ---- (a) the work alone, and the wins -------------------------------------------------------


def alone_batches(rows, fn, lut, crop: int, batch: int):
    """fn (a train_batch) over the rows, batch by batch, in this thread: the work alone (as an
    epoch of `interleaved` too)."""
    cv2.setNumThreads(1)
    for i in range(0, len(rows["image_id"]), batch):
        yield fn({k: v[i : i + batch] for k, v in rows.items()}, lut=lut, crop_size=crop)


def work_alone(rows, fn, lut, crop: int, batch: int, limit: int) -> tuple[float, float]:
    """(images/s, images per CPU second) of alone_batches over `limit` rows, one thread."""
    n = min(limit, len(rows["image_id"]))
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in alone_batches({k: v[:n] for k, v in rows.items()}, fn, lut, crop, batch):
        pass
    return n / (time.perf_counter() - start), n / (time.thread_time() - cpu)


def time_per_image(fn, count: int, clock=time.thread_time) -> float:
    """CPU ms per call of fn(i), this thread (steady under load from elsewhere)."""
    start = clock()
    for i in range(count):
        fn(i)
    return 1e3 * (clock() - start) / count


def wins(rows, lut, crop: int, count: int = 300) -> dict[str, float]:
    """ms per image of each step and each cheap win, one thread unless named."""
    imgs, msks = rows["image"][:count], rows["mask"][:count]
    pairs = [ingest.decode_pair(a, b) for a, b in zip(imgs, msks, strict=True)]
    full = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    half = cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION
    cv2.setNumThreads(1)
    for i in range(count):  # warm-up: page in the bytes, load the codecs
        cv2.imdecode(np.frombuffer(imgs[i], np.uint8), full)
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
    images = np.zeros((2, crop, crop, 3), np.uint8)  # a batch's slots
    masks = np.full((2, crop, crop), ingest.TRAIN_IGNORE, np.uint8)

    def resize_then_crop(i: int) -> None:  # then copied into the batch, as before
        images[0].fill(0), masks[0].fill(ingest.TRAIN_IGNORE)  # as a fresh batch holds
        rng = np.random.default_rng(i)
        images[0], masks[0] = before_augment(*pairs[i], crop_size=crop, rng=rng)

    def crop_then_resize(i: int) -> None:  # written into the batch
        images[1].fill(0), masks[1].fill(ingest.TRAIN_IGNORE)  # as a fresh batch holds
        ingest.augment_into(*pairs[i], images[1], masks[1], rng=np.random.default_rng(i))

    out["resize_then_crop_into_batch"] = time_per_image(resize_then_crop, count)
    out["crop_then_resize_into_batch"] = time_per_image(crop_then_resize, count)
    batches = {k: v[:count] for k, v in rows.items()}
    for name, fn in (("before", before_train_batch), ("after", ingest.train_batch)):
        out[f"train_batch_{name}"] = 1e3 / work_alone(batches, fn, lut, crop, 16, count)[1]
    for threads in (1, cv2.getNumberOfCPUs()):  # CPU of all threads: what the other tasks lose
        cv2.setNumThreads(threads)
        out[f"resize_then_crop_process_cpu_{threads}_cv2_threads"] = time_per_image(
            lambda i: before_augment(
                pairs[i][0], pairs[i][1], crop_size=crop, rng=np.random.default_rng(i)
            ),
            count,
            time.process_time,
        )
    cv2.setNumThreads(1)
    return {k: round(v, 3) for k, v in out.items()}


class AloneProcesses:
    """(a2): the work alone in `n` processes at once (forked before Ray starts), each on every
    n-th row, its batches made and dropped: nothing handed over, no pipeline. What the cores
    give the work in parallel, next to n x (a) in one thread."""

    def __init__(self, rows, lut, crop: int, batch: int, n: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.pipes, self.pids = [], set()
        for k in range(n):
            here, there = context.Pipe()
            share = {key: v[k::n] for key, v in rows.items()}
            process = context.Process(
                target=self.serve, args=(there, share, lut, crop, batch), daemon=True
            )
            process.start()
            self.pipes.append(here)
            self.pids.add(process.pid)

    @staticmethod
    def serve(pipe, rows, lut, crop: int, batch: int) -> None:
        while pipe.recv():
            batches = alone_batches(rows, ingest.train_batch, lut, crop, batch)
            pipe.send(sum(len(b["image_id"]) for b in batches))

    def epoch(self):
        """One epoch in all processes at once, as one batch of as many ids (for `epoch`)."""
        for pipe in self.pipes:
            pipe.send(True)
        yield {"image_id": np.zeros(sum(pipe.recv() for pipe in self.pipes), np.int64)}

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(False)


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


def make_loader(rows, lut, crop: int, batch: int, workers: int):
    """(b): a torch DataLoader with `workers` persistent processes."""
    import torch

    return torch.utils.data.DataLoader(
        RowDataset(rows, lut, crop),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=4,
    )


def cpu_seconds(exclude: set[int]) -> dict[int, float]:
    """CPU seconds so far of this process and its descendants (Ray's gcs, raylet and workers,
    DataLoader workers), leaving out `exclude`."""
    import psutil  # Ray's own copy (ray/thirdparty_files), on sys.path once ray is imported

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        if p.pid in exclude:
            continue
        try:
            t = p.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        out[p.pid] = t.user + t.system
    return out


def epoch(batches, exclude: set[int]) -> tuple[float, float, float]:
    """One pass: (images/s, images per CPU second of the whole process tree, consumer (this
    process's) CPU seconds per image). The CPU figure is what a core gives when others load the
    machine too: wall time then counts their share, CPU time does not."""
    n, cpu0 = 0, cpu_seconds(exclude)
    start, mine = time.perf_counter(), time.process_time()
    for b in batches:
        n += len(b["image_id"])
    wall, mine = time.perf_counter() - start, time.process_time() - mine
    cpu1 = cpu_seconds(exclude)
    used = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
    return n / wall, n / max(used, 1e-9), mine / max(n, 1)


# ---- (c), (d) Ray Data, consumed as rayseg train consumes it --------------------------------


def torch_batches(split, batch: int):
    """(c'): the iter_torch_batches call train.py made with Ray Data, on CPU."""
    return split.iter_torch_batches(
        batch_size=batch,
        drop_last=True,
        local_shuffle_buffer_size=4 * batch,
        prefetch_batches=2,
        device="cpu",
    )


def ray_descendants(pids: set[int]) -> set[int]:
    """Every process below `pids` now (Ray's workers start and end under the raylet)."""
    import psutil

    out = set()
    for pid in pids:
        try:
            out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return out


def split_one(ds):
    (split,) = ds.streaming_split(1, equal=True)  # Ray Train's DataConfig does this per worker
    return split


def interleaved(runs: dict, rounds: int, exclude: dict) -> dict[str, dict[str, float]]:
    """Each run's epochs taken in turn (a b c a b c ...), so load from elsewhere hits all alike.

    runs: name -> callable returning one epoch's batches; exclude: name -> pids that are not
    its own (the other pipeline's workers). The first round is a warm-up. Returns name ->
    medians over the later rounds.
    """
    seen: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
    for r in range(rounds + 1):
        for name, batches in runs.items():
            got = epoch(batches(), exclude[name]())
            print(f"  round {r} {name}: {got[0]:.1f} images/s, {got[1]:.1f} per CPU s", flush=True)
            if r:
                seen[name].append(got)
    return {
        k: {
            "images_per_s": float(np.median([x[0] for x in v])),
            "images_per_cpu_s": float(np.median([x[1] for x in v])),
            "all_images_per_s": [round(x[0], 1) for x in v],
            "all_images_per_cpu_s": [round(x[1], 1) for x in v],
            "consumer_cpu_s_per_image": float(np.median([x[2] for x in v])),
        }
        for k, v in seen.items()
    }


def paced_epochs(make, batch: int, epochs: int, step_rate: float, build) -> list[float]:
    """Share of each epoch's time blocked on data, behind a step of `step_rate` images/s. As in
    train.py, the first epoch's tasks start (make(1)), then the model is built (`build`), then
    the epochs run, the next one's tasks started before a validation pause."""
    batches = make(1)
    build()
    shares = []
    for e in range(epochs):
        waited, start, it = 0.0, time.perf_counter(), iter(batches)
        while True:
            t = time.perf_counter()
            b = next(it, None)
            waited += time.perf_counter() - t
            if b is None:
                break
            time.sleep(len(b["image_id"]) / step_rate)  # the GPU step
        shares.append(waited / (time.perf_counter() - start))
        if e + 1 < epochs:
            batches = make(e + 2)  # starts during validation
            time.sleep(VAL_PAUSE_S)
    return shares


def waits_here(make, batch: int, epochs: int, step_rate: float, build) -> tuple[list[float], float]:
    """(paced_epochs of make(epoch) in this process, seconds `build` took)."""
    took = []

    def timed_build() -> None:
        start = time.perf_counter()
        build()
        took.append(time.perf_counter() - start)

    return paced_epochs(make, batch, epochs, step_rate, timed_build), took[0]


def paced_loop(config: dict) -> None:
    """Ray Train worker: paced_epochs of its Feeds, written to config["out"]."""
    made = config["first"] and prestart.take_first(config["first"], rank=0, epoch=1)
    shares = paced_epochs(
        feed_epochs(config["summary"], config["ids"], **config["feed"], made=made or None),
        config["batch"],
        config["epochs"],
        config["step_rate"],
        lambda: build_model(MODEL, config["classes"], aux_loss=False),
    )
    Path(config["out"]).write_text(json.dumps(shares))  # this machine: Result.metrics is None


def train_waits(summary, ids, feed_options: dict, *, batch: int, epochs: int, step_rate: float,
                classes: int, prestarted: bool) -> list[float]:  # fmt: skip
    """paced_loop under Ray Train: one worker holding no CPU (the data tasks get them all),
    making its Feeds inside Ray Train as rayseg train does; `prestarted`: after rayseg.prestart,
    as rayseg train does. Each call's workers get a runtime_env of their own, so that neither
    finds the processes the other left."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayseg import raycompat

    stage = "prestarted" if prestarted else "cold"
    worker_env = {"env_vars": {"RAYSEG_BENCH_STAGE": stage}}
    started, first = None, None
    if prestarted:  # as rayseg train, with this call's variable added to the workers' env
        env = raycompat.train_worker_env()
        env["env_vars"].update(worker_env["env_vars"])
        node = ray.get_runtime_context().get_node_id()
        tasks = epoch_tasks(summary, ids, batch_size=batch, epoch=1)
        first = prestart.FirstBatches(
            name="ingest-bench-first-batch", epoch=1, tasks={0: ingest.split_first(tasks[0])[0]},
            fs=summary.location.fs, num_cpus=1.0,
            make_batch=functools.partial(
                ingest.train_batch, lut=feed_options["lut"], crop_size=feed_options["crop_size"]
            ),
        )  # fmt: skip
        started = prestart.start({node: feed_options["in_flight"]}, env, first=first)
    out = REPO / "bench" / "_data" / "ray_train" / "waits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        paced_loop,
        train_loop_config={
            "summary": summary, "ids": ids, "feed": feed_options, "batch": batch,
            "epochs": epochs, "step_rate": step_rate, "classes": classes, "out": str(out),
            "first": first and first.name,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"memory": 2**28}  # no CPU: Ray wants one key
        ),
        run_config=ray.train.RunConfig(
            storage_path=str(REPO / "bench" / "_data" / "ray_train"),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env=worker_env,
        ),
    )  # fmt: skip
    trainer.fit()
    if started:
        prestart.stop(started)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic images to make")
    p.add_argument("--data", help="a `rayseg masks` output with embedded images instead")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--crop-size", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=4, help="timed epochs of each, after the first")
    p.add_argument("--gpu-rate", type=float, default=GPU_RATE, help="images/s one GPU trains")
    p.add_argument("--wait-images", type=int, default=1000, help="images per epoch for the waits")
    args = p.parse_args()
    import ray  # noqa: I001  (first: psutil below is Ray's own copy, ray/thirdparty_files)
    import psutil

    from rayseg.rayconnect import connect_ray

    data = args.data or make_data(REPO / "bench" / "_data", args.images)
    summary = ingest.scan_data(data)
    lut = class_map_from_meta(summary.meta).train_lut()
    ids = np.unique(summary.image_ids)
    rows = load_rows(summary)
    crop, bs, cores = args.crop_size, args.batch_size, args.cpus
    load_start = os.getloadavg()

    win = wins(rows, lut, crop)
    print(f"wins (ms per image): {win}", flush=True)
    sub = {k: v[: min(len(ids), 400)] for k, v in rows.items()}
    alone = {"after": [], "before": []}
    for _ in range(2 * args.rounds + 1):  # interleaved, like the pipelines below
        alone["after"].append(work_alone(sub, ingest.train_batch, lut, crop, bs, len(ids)))
        alone["before"].append(work_alone(sub, before_train_batch, lut, crop, bs, len(ids)))
    one = {k: [float(np.median([x[j] for x in v])) for j in (0, 1)] for k, v in alone.items()}
    print(f"(a) work alone (images/s, per CPU s): {one}", flush=True)

    in_parallel = AloneProcesses(rows, lut, crop, bs, cores)  # forked before Ray starts
    loader = make_loader(rows, lut, crop, bs, cores)
    iter(loader)  # fork its workers before Ray starts threads in this process
    loader_pids = {w.pid for w in loader._iterator._workers} | in_parallel.pids
    connect_ray(None, cores)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_pids = {p.pid for p in psutil.Process().children(recursive=True)}
    ray_pids -= loader_pids
    alone_pids = in_parallel.pids
    kw = {"lut": lut, "crop_size": crop, "batch_size": bs}
    feed_options = {**kw, "in_flight": cores}  # the tasks get every core, as Ray Data's did
    after = feed_epochs(summary, ids, **feed_options)
    epoch_numbers = itertools.count(1)
    raydata = split_one(raydata_dataset(summary, ids, **kw))
    before = split_one(before_dataset(summary, ids, fn=before_train_batch, **kw))
    runs = {
        "work_alone": lambda: alone_batches(rows, ingest.train_batch, lut, crop, bs),
        "work_alone_in_parallel": in_parallel.epoch,
        "dataloader": lambda: loader,
        "rayseg": lambda: after(next(epoch_numbers)),
    }
    history = {
        "rayseg_raydata": lambda: torch_batches(raydata, bs),
        "rayseg_before": lambda: torch_batches(before, bs),
    }
    not_dataloader = lambda: set(ray_pids) | ray_descendants(ray_pids)  # noqa: E731
    exclude = {k: (lambda: loader_pids) for k in [*runs, *history]}
    exclude["dataloader"] = lambda: not_dataloader() | alone_pids
    exclude["work_alone"] = lambda: loader_pids | not_dataloader()  # this process alone
    exclude["work_alone_in_parallel"] = lambda: (loader_pids - alone_pids) | not_dataloader()
    got = interleaved(runs, args.rounds, exclude)
    step = PACE * got["rayseg"]["images_per_s"]
    few = ids[: args.wait_images]
    classes = class_map_from_meta(summary.meta).num_classes
    waits, built = waits_here(
        feed_epochs(summary, few, **feed_options),
        bs,
        args.rounds + 1,
        step,
        lambda: build_model(MODEL, classes, aux_loss=False),  # on CPU: what train.py builds
    )
    print(f"waits behind a {step:.1f} images/s step: {[round(w, 3) for w in waits]}", flush=True)
    under_train = {}
    for prestarted in (False, True):
        under_train[prestarted] = train_waits(
            summary, few, feed_options, batch=bs, epochs=args.rounds + 1, step_rate=step,
            classes=classes, prestarted=prestarted,
        )  # fmt: skip
        print(
            f"the same under Ray Train{', prestarted' if prestarted else ''}: "
            f"{[round(w, 3) for w in under_train[prestarted]]}",
            flush=True,
        )
    # Last: Ray's worker processes that ran the 20-row tasks of (d) ran (c)'s tasks ~7% slower
    # afterwards (4.1 -> 4.45 ms of CPU per image, exploratory), a cost only this bench has.
    got.update(interleaved(history, args.rounds, exclude))
    rate = {k: v["images_per_s"] for k, v in got.items()}
    cpu_rate = {k: v["images_per_cpu_s"] for k, v in got.items()}
    in_parallel.close()
    ray.shutdown()

    def figures(name: str) -> dict[str, float]:
        return {
            "images_per_s_per_core": round(cpu_rate[name], 1),
            "wall_images_per_s_per_core": round(rate[name] / cores, 1),
        }

    consumer = got["rayseg"]["consumer_cpu_s_per_image"]
    per_core = cpu_rate["rayseg"]
    result = {
        "cores": cores,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "per_core_is": "images per CPU second of the whole process tree (wall_*: images/s / cores)",
        "images": int(len(ids)),
        "crop_size": crop,
        "batch_size": bs,
        "rounds_timed": args.rounds,
        "work_alone": {
            "images_per_s_per_core": round(one["after"][1], 1),
            "wall_images_per_s_per_core": round(one["after"][0], 1),
            "before_images_per_s_per_core": round(one["before"][1], 1),
            "before_wall_images_per_s_per_core": round(one["before"][0], 1),
            "same_rounds_images_per_s_per_core": round(cpu_rate["work_alone"], 1),
            "same_rounds_wall_images_per_s_per_core": round(rate["work_alone"], 1),
        },
        "work_alone_in_parallel": {
            **figures("work_alone_in_parallel"),
            "processes": cores,
            "wall_vs_cores_x_work_alone_same_rounds": round(
                rate["work_alone_in_parallel"] / (cores * rate["work_alone"]), 3
            ),
        },
        "dataloader": {**figures("dataloader"), "num_workers": cores},
        "rayseg": {
            **figures("rayseg"),
            "vs_cores_x_work_alone": round(per_core / one["after"][1], 3),
            "vs_dataloader": round(per_core / cpu_rate["dataloader"], 3),
            "wall_vs_cores_x_work_alone": round(rate["rayseg"] / (cores * one["after"][0]), 3),
            "wall_vs_dataloader": round(rate["rayseg"] / rate["dataloader"], 3),
            "vs_cores_x_work_alone_same_rounds": round(per_core / cpu_rate["work_alone"], 3),
            "wall_vs_cores_x_work_alone_same_rounds": round(
                rate["rayseg"] / (cores * rate["work_alone"]), 3
            ),
            "wall_vs_work_alone_in_parallel": round(
                rate["rayseg"] / rate["work_alone_in_parallel"], 3
            ),
            "first_epoch_wait": round(waits[0], 3),
            "later_epoch_wait": round(float(np.median(waits[1:])), 3),
            "paced_step_images_per_s": round(step, 1),
            "wait_epoch_images": int(len(few)),
            "model_build_s_before_first_epoch": round(built, 2),
            "under_ray_train_first_epoch_wait": round(under_train[True][0], 3),
            "under_ray_train_later_epoch_wait": round(float(np.median(under_train[True][1:])), 3),
            "under_ray_train_without_prestart_first_epoch_wait": round(under_train[False][0], 3),
            "under_ray_train_without_prestart_later_epoch_wait": round(
                float(np.median(under_train[False][1:])), 3
            ),
            "consumer_cpu_s_per_image": round(consumer, 5),
            "consumer_cores_at_gpu_rate": round(consumer * args.gpu_rate, 2),
        },
        "rayseg_raydata": {
            **figures("rayseg_raydata"),
            "vs_dataloader": round(cpu_rate["rayseg_raydata"] / cpu_rate["dataloader"], 3),
            "wall_vs_dataloader": round(rate["rayseg_raydata"] / rate["dataloader"], 3),
            "is": "this recipe through the Ray Data wiring that rayseg.feed replaced",
        },
        "rayseg_before": {
            **figures("rayseg_before"),
            "is": "the recipe and the Ray Data wiring before issue 22",
        },
        "epochs": {
            k: {"images_per_s": v["all_images_per_s"], "per_cpu_s": v["all_images_per_cpu_s"]}
            for k, v in got.items()
        },
        "work_alone_rounds": {k: [[round(x, 1) for x in r] for r in v] for k, v in alone.items()},
        "wins_cpu_ms_per_image": win,
        "gpu_rate": args.gpu_rate,
        "cores_per_gpu_272": round(args.gpu_rate / per_core, 2),
        # The worker's own share (consumer); decoding runs in data tasks on the other CPUs.
        "gpu_cpus_per_worker": max(1, math.ceil(consumer * args.gpu_rate)),
        "wall_cores_per_gpu_272": round(args.gpu_rate / (rate["rayseg"] / cores), 2),
    }
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
