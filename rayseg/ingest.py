"""Ingest: masks Parquet (docs/ARCHITECTURE.md) -> each worker's decoded, augmented batches.

scan_data(data) reads only the small columns (image ids, sizes) on the driver, to split, size and
check the data before any worker starts. The per-image work is pure numpy/cv2 (decode_pair,
augment, pad_into); train_batch / val_batch apply it to a batch of rows. train_tasks / val_tasks
plan a worker's batches of one epoch as a PartTask per Parquet part, and task_batches is one
task's work: rayseg.feed runs these as Ray tasks (task_objects; no Ray here).

Batches carry uint8 pixels: image (B, S, S, 3) RGB, mask (B, S, S) train ids (255 = ignore),
image_id (B,), problem (B,) (0 = fine, else a PROBLEMS code). Mask values become train ids through
a lookup table (rayseg.models.ClassMap.train_lut). The model's float input is made on the training
device by rayseg.models.normalize (ImageNet mean/std): 4x less data to move.
A row whose image or mask does not decode keeps its place as an all-ignore sample, so it adds
nothing to loss or metrics, and is counted by the training loop.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayseg import raycompat, storage
from rayseg.errors import RaysegError
from rayseg.records import TRAIN_IGNORE, Problem

# torchvision's segmentation recipe: random resize 0.5-2.0x, flip, random crop padded with ignore.
# The recipe scales a fixed base size (520 px short side); here each image's own size is scaled,
# so small images are not blown up to COCO size.
SCALE_RANGE = (0.5, 2.0)
FLIP_PROBABILITY = 0.5

# CPUs a GPU training worker should reserve (`--cpus-per-worker` on GPU), from
# bench/ingest_bench.py (issue 22, bench/results/ingest_bench.json): the worker's side of this
# ingest (taking batches from the object store as torch tensors) takes a small share of a core
# at the 272 images/s of one H200 ("consumer_cores_at_gpu_rate"). Decoding runs in data tasks
# on the CPUs the worker does not reserve, so reserving more would take them from the decoder:
# a node needs DATA_CPUS_PER_GPU further CPUs per GPU.
GPU_CPUS_PER_WORKER = 1
# CPUs that decode 272 images/s (deeplabv3_resnet50's bf16 step on one H200) beside each GPU:
# 1.16-1.33 ("cores_per_gpu_272", measured on 2 x86-64 cores; 1.37-1.65 on a slowed machine),
# rounded up.
DATA_CPUS_PER_GPU = 2

# A batch: the columns above, each an array of the batch's length.
Batch = dict[str, np.ndarray]

# Codes in a batch's "problem" column.
PROBLEMS = {
    1: "row has no image bytes (masks ran without --images-dir)",
    2: "image does not decode",
    3: "mask does not decode to a single-channel label PNG",
    4: "mask size differs from image size",
}


def problem_record(image_id: int, code: int) -> Problem:
    """The Problem behind a batch's nonzero "problem" code (batches carry numbers, not text)."""
    return Problem(PROBLEMS[code], image_id=int(image_id))


# A file's (size, mtime_ns): a part rewritten since the scan (other pixels under the same ids
# too) differs in one, as make and rsync tell.
Stamp = tuple[int, int]


def stamp_of(info) -> Stamp:
    """A pyarrow FileInfo -> its Stamp."""
    return info.size, info.mtime_ns


@dataclass(frozen=True)
class DataSummary:
    """What the driver knows about a masks Parquet folder without decoding pixels."""

    location: storage.Location
    paths: tuple[str, ...]
    meta: dict[str, Any]
    image_ids: np.ndarray  # (N,) int64
    heights: np.ndarray  # (N,) int32
    widths: np.ndarray  # (N,) int32
    rows_without_image: int
    parts: np.ndarray  # (N,) int32: the index in `paths` of the part each row is in
    stamps: tuple[Stamp, ...]  # each part's (size, mtime_ns) when scanned: read_rows checks them
    groups: np.ndarray  # (N,) int32: the row group of its part each row is in

    @property
    def num_rows(self) -> int:
        return len(self.image_ids)


def scan_data(data: str) -> DataSummary:
    """A masks output dir or its parquet/ folder -> DataSummary; RaysegError if unusable."""
    loc = storage.parquet_location(data)
    parts = storage.parquet_files(loc)
    stamps = tuple(map(stamp_of, loc.fs.get_file_info([p.path for p in parts])))
    meta = storage.read_mask_meta(data)
    tables, groups = [], []
    for p in parts:
        with pq.ParquetFile(p.path, filesystem=p.fs) as part:
            tables.append(part.read(["image_id", "height", "width"]))
            groups.append(row_groups(part.metadata))
    ids = np.concatenate([t["image_id"].to_numpy() for t in tables]).astype(np.int64)
    heights = np.concatenate([t["height"].to_numpy() for t in tables]).astype(np.int32)
    widths = np.concatenate([t["width"].to_numpy() for t in tables]).astype(np.int32)
    if len(ids) == 0:
        raise RaysegError(f"{loc.uri}: the dataset is empty (0 rows in {len(parts)} Parquet parts)")
    dupes = np.unique(ids)[np.unique(ids, return_counts=True)[1] > 1]
    if len(dupes):
        raise RaysegError(f"{loc.uri}: image id {int(dupes[0])} appears in more than one row")
    missing = sum(rows - with_image for rows, with_image in map(image_counts, parts))
    if missing == len(ids):
        raise RaysegError(
            f"{loc.uri}: rows carry no images; rerun `rayseg masks` with --images-dir"
        )
    part_of = np.repeat(np.arange(len(tables), dtype=np.int32), [t.num_rows for t in tables])
    paths = tuple(p.path for p in parts)
    groups = np.concatenate(groups)
    return DataSummary(loc, paths, meta, ids, heights, widths, missing, part_of, stamps, groups)


def row_groups(md: pq.FileMetaData) -> np.ndarray:
    """(rows,) int32: the row group each row of a Parquet part is in, from its footer."""
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    return np.repeat(np.arange(md.num_row_groups, dtype=np.int32), sizes)


def image_counts(part: storage.Location) -> tuple[int, int]:
    """(rows, rows with image bytes) of one Parquet part, from its footer statistics when present.

    Parts without statistics for `image` have that column read; a part without it has no images.
    """
    md = pq.ParquetFile(part.path, filesystem=part.fs).metadata
    # Parquet column indices count leaves of nested columns, so find "image" by its path.
    paths = [md.schema.column(i).path for i in range(md.num_columns)]
    if "image" not in paths:
        return md.num_rows, 0
    col = paths.index("image")
    nulls = 0
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(col).statistics
        if stats is None or not stats.has_null_count:
            table = pq.read_table(part.path, columns=["image"], filesystem=part.fs)
            return md.num_rows, md.num_rows - table["image"].null_count
        nulls += stats.null_count
    return md.num_rows, md.num_rows - nulls


def shard_ids(ids: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Round-robin: shard k gets ids[k::num_shards] (every id in exactly one shard)."""
    return [np.asarray(ids[k::num_shards], np.int64) for k in range(num_shards)]


def check_crop(summary: DataSummary, ids: np.ndarray, crop_size: int) -> None:
    """A crop larger than every image (both sides) would train on padding: refuse it."""
    keep = np.isin(summary.image_ids, ids)
    largest = int(np.maximum(summary.heights[keep], summary.widths[keep]).max())
    if crop_size > largest:
        raise RaysegError(
            f"crop_size {crop_size} is larger than every image (largest side {largest} px in "
            f"{summary.location.uri}); choose --crop-size <= {largest}"
        )


def val_canvas(summary: DataSummary, ids: np.ndarray) -> tuple[int, int]:
    """(H, W) that holds every validation image unscaled: they are padded to it, not resized."""
    keep = np.isin(summary.image_ids, ids)
    return int(summary.heights[keep].max()), int(summary.widths[keep].max())


# ---- per image (pure) ---------------------------------------------------------------------


class SampleError(Exception):
    """A row whose image or mask cannot be used: `code` (a PROBLEMS key) for batches, `reason`
    (the PROBLEMS text, or a more precise one) for people."""

    def __init__(self, code: int, detail: str | None = None) -> None:
        self.code = code
        self.reason = detail or PROBLEMS[code]
        super().__init__(self.reason)


def decode_pair(
    image_bytes: bytes | None, mask_bytes: bytes | None
) -> tuple[np.ndarray, np.ndarray]:
    """Encoded image + mask PNG -> (H, W, 3) uint8 RGB, (H, W) mask values; else SampleError.

    The one row decoder: training (here) and evaluation (rayseg.evaluate) skip the same rows.
    """
    if not image_bytes:
        raise SampleError(1)
    image = storage.decode_image(image_bytes)
    if image is None:
        raise SampleError(2)
    try:
        mask = storage.decode_png(mask_bytes) if mask_bytes else None
    except (ValueError, cv2.error, OSError):
        mask = None
    if mask is None or mask.ndim != 2:
        raise SampleError(3)
    if mask.shape != image.shape[:2]:
        (h, w), (mh, mw) = image.shape[:2], mask.shape
        raise SampleError(4, f"mask is {mw}x{mh} but the image is {w}x{h}")
    return image, mask


def augment(
    image: np.ndarray, mask: np.ndarray, *, crop_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random resize (SCALE_RANGE), pad to the crop (image 0, mask ignore), random crop, flip."""
    out_image = np.zeros((crop_size, crop_size, 3), np.uint8)
    out_mask = np.full((crop_size, crop_size), TRAIN_IGNORE, np.uint8)
    augment_into(image, mask, out_image, out_mask, rng=rng)
    return out_image, out_mask


def augment_into(
    image: np.ndarray,
    mask: np.ndarray,
    out_image: np.ndarray,
    out_mask: np.ndarray,
    *,
    rng: np.random.Generator,
) -> None:
    """augment, written into a (S, S, 3) image and (S, S) mask that already hold 0 and ignore.

    Only the crop is resampled (issue 22: 1.6x less CPU than resizing the whole image, then
    cropping and copying, bench/ingest_bench.py): the same random draws, the same masks as
    cv2.resize's nearest neighbour, the image within 1 level of cv2.resize's bilinear
    (warpAffine quantises sample positions to 1/32 px).
    """
    crop = out_mask.shape[0]
    h, w = mask.shape
    s = rng.uniform(*SCALE_RANGE)
    rw, rh = max(1, round(w * s)), max(1, round(h * s))  # the resized image
    y = int(rng.integers(0, max(crop, rh) - crop + 1))
    x = int(rng.integers(0, max(crop, rw) - crop + 1))
    flip = rng.random() < FLIP_PROBABILITY
    vh, vw = min(crop, rh - y), min(crop, rw - x)  # the crop's part inside the resized image
    rows = nearest_index(h, rh)[y : y + vh]
    cols = nearest_index(w, rw)[x : x + vw]
    fx, fy = w / rw, h / rh  # source pixels per resized pixel
    # Output pixel (i, j) samples the source at (resized pixel centre) * f - 0.5, as resize does;
    # a flip reads the columns right to left and puts the padding on the left.
    left = crop - vw if flip else 0
    if flip:
        cols = cols[::-1]
        warp = [[-fx, 0.0, (x + vw - 0.5) * fx - 0.5], [0.0, fy, (y + 0.5) * fy - 0.5]]
    else:
        warp = [[fx, 0.0, (x + 0.5) * fx - 0.5], [0.0, fy, (y + 0.5) * fy - 0.5]]
    out_mask[:vh, left : left + vw] = mask[rows[:, None], cols]
    cv2.warpAffine(
        image,
        np.array(warp),
        (vw, vh),
        dst=out_image[:vh, left : left + vw],
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,  # resize clamps samples past the edge the same way
    )


@functools.lru_cache(maxsize=4096)
def nearest_index(size: int, new_size: int) -> np.ndarray:
    """(new_size,) source index of each pixel of cv2.resize(..., INTER_NEAREST) along one axis.

    Taken from cv2.resize itself, so masks equal a resize of the whole mask, bit for bit.
    """
    index = np.arange(size, dtype=np.int32)[:, None]
    out = cv2.resize(index, (1, new_size), interpolation=cv2.INTER_NEAREST)[:, 0].astype(np.intp)
    out.flags.writeable = False  # shared through the cache
    return out


def to_train_ids(mask: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Mask values -> train ids through `lut` (cv2.LUT for 8-bit masks: 3x numpy's indexing)."""
    if mask.dtype == np.uint8 and lut.dtype == np.uint8:
        return cv2.LUT(mask, lut[:256])
    return lut[mask]


def pad_into(
    image: np.ndarray, mask: np.ndarray, out_image: np.ndarray, out_mask: np.ndarray
) -> None:
    """Place image and mask top-left in a canvas that holds 0 (image) and ignore (mask)."""
    h, w = mask.shape
    out_image[:h, :w] = image
    out_mask[:h, :w] = mask


# ---- per batch of rows ----------------------------------------------------------------------


def train_batch(
    batch: dict[str, np.ndarray], *, lut: np.ndarray, crop_size: int, out: Batch | None = None
) -> dict[str, np.ndarray]:
    """Rows (image_id, image, mask bytes) -> augmented (B, S, S, 3) images and (B, S, S) masks.

    out: a batch made before and handed over, whose arrays this one may be written into."""
    rng = np.random.default_rng()

    def one(image, mask, out_image, out_mask) -> None:
        augment_into(image, mask, out_image, out_mask, rng=rng)

    return _map_rows(batch, lut, crop_size, crop_size, one, out)


def val_batch(
    batch: dict[str, np.ndarray],
    *,
    lut: np.ndarray,
    height: int,
    width: int,
    out: Batch | None = None,
) -> dict[str, np.ndarray]:
    """Rows -> unscaled images padded to the (height, width) canvas, masks padded with ignore.

    out: as train_batch's."""
    return _map_rows(batch, lut, height, width, pad_into, out)


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    return (rows[i : i + size] for i in range(0, len(rows), size))


def _take(part: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in part.items()}


def _map_rows(batch, lut: np.ndarray, height: int, width: int, transform, out: Batch | None):
    """Each row decoded, its mask made train ids, and `transform` writes it into its batch slot
    (`out`'s arrays where they are of its shape)."""
    cv2.setNumThreads(1)  # rayseg.feed runs one task per CPU already
    n = len(batch["image_id"])
    if out is not None and out["image"].shape == (n, height, width, 3):
        images, masks = out["image"], out["mask"]
        images.fill(0)
        masks.fill(TRAIN_IGNORE)
    else:
        images = np.zeros((n, height, width, 3), np.uint8)
        masks = np.full((n, height, width), TRAIN_IGNORE, np.uint8)
    problem = np.zeros(n, np.uint8)
    for i in range(n):
        try:
            image, mask = decode_pair(batch["image"][i], batch["mask"][i])
        except SampleError as e:
            problem[i] = e.code
            continue
        transform(image, to_train_ids(mask, lut), images[i], masks[i])
    return {
        "image": images,
        "mask": masks,
        "image_id": np.asarray(batch["image_id"], np.int64),
        "problem": problem,
    }


# ---- per epoch: each worker's batches, as a task per Parquet part (pure) -----------------------


@dataclass(frozen=True)
class PartTask:
    """One data-loading task: the Parquet parts it reads and its batches' image ids, in order."""

    paths: tuple[str, ...]
    batches: tuple[np.ndarray, ...]  # (B,) int64 image ids each
    stamps: tuple[Stamp, ...] = ()  # each path's at the scan (part_tasks); () checks none
    groups: tuple[tuple[int, ...], ...] = ()  # each path's row groups to read; () reads all


def train_tasks(
    summary: DataSummary,
    ids: np.ndarray,
    *,
    rank: int,
    world: int,
    batch_size: int,
    seed: int,
    epoch: int,
) -> list[PartTask]:
    """Worker `rank`'s training batches of one epoch, as a task per Parquet part.

    As torch's DistributedSampler with set_epoch: every worker draws the same random order of
    `ids` from (seed, epoch), cuts it into `world` runs of floor(N / world) images (the last
    N % world of the order sit the epoch out) and takes run `rank`, in full batches (a partial
    last batch is dropped). So every image is in at most one worker's batches, every worker
    takes the same number of steps, and a resumed run sees the orders an unbroken one would.
    The order is the parts in a random order, each part's images in a random order: a run spans
    few parts. A batch is made by the task of the part its first image is in, which also reads
    the next part where the batch runs over into it: only the row groups of the images it
    takes there (spanning_from_few_groups).
    """
    rng = np.random.default_rng([seed, epoch])
    rows = np.flatnonzero(np.isin(summary.image_ids, ids))
    part_rank = rng.permutation(len(summary.paths))
    order = rows[np.lexsort((rng.random(len(rows)), part_rank[summary.parts[rows]]))]
    n = len(order) // world
    steps = n // batch_size
    order = spanning_from_few_groups(
        summary, order, run=n, used=steps * batch_size, batch_size=batch_size, world=world
    )
    mine = order[rank * n : rank * n + steps * batch_size].reshape(steps, batch_size)
    return part_tasks(summary, list(mine))


def spanning_from_few_groups(
    summary: DataSummary, order: np.ndarray, *, run: int, used: int, batch_size: int, world: int
) -> np.ndarray:
    """`order` (rows of summary) where the images that a batch begun in one part takes from the
    next part are drawn from as few of its row groups as hold them: the groups in the order in
    which the part's images draw them. The rest of the part follows, in the order's own draw.

    Worker k's batches are order[k * run : k * run + used] in runs of batch_size. The task of
    the part a batch begins in then reads those groups of the next part, not all of it (issue
    22: a 200-image part of COCO-sized JPEGs is 44 MB; a row group holds 64 images).
    """
    order = order.copy()
    # where each part's images begin in the order (but the first part's), and where they end
    bounds = np.append(np.flatnonzero(np.diff(summary.parts[order])) + 1, len(order))
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        worker, at = divmod(int(start), run) if run else (world, 0)
        into = at % batch_size  # images of the batch before this part's first one
        if worker >= world or at >= used or into == 0:
            continue  # no batch runs over into this part
        taken = min(end - start, batch_size - into)
        rows = order[start:end]
        groups = summary.groups[rows]
        values, firsts, counts = np.unique(groups, return_index=True, return_counts=True)
        drawn = np.argsort(firsts)  # the groups in the order the part's images draw them
        enough = values[drawn][: np.searchsorted(np.cumsum(counts[drawn]), taken) + 1]
        ahead = np.flatnonzero(np.isin(groups, enough))[:taken]
        rest = np.setdiff1d(np.arange(len(rows)), ahead, assume_unique=True)
        order[start:end] = rows[np.concatenate([ahead, rest])]
    return order


def val_tasks(summary: DataSummary, ids: np.ndarray, *, batch_size: int) -> list[PartTask]:
    """Validation batches of `ids` (every one, once), in Parquet order: a task per part holding
    any, its last batch possibly short."""
    rows = np.flatnonzero(np.isin(summary.image_ids, ids))
    batches = [
        chunk
        for part in np.unique(summary.parts[rows])
        for chunk in _chunks(rows[summary.parts[rows] == part], batch_size)
    ]
    return part_tasks(summary, batches)


def part_tasks(summary: DataSummary, batches: list[np.ndarray]) -> list[PartTask]:
    """Batches of rows (indices into summary) -> a PartTask per run of batches whose first row
    is in the same part; each reads the row groups its rows are in, of the parts they are in."""
    tasks = []
    for _, group in itertools.groupby(batches, key=lambda rows: summary.parts[rows[0]]):
        group = list(group)
        taken = np.concatenate(group)
        parts = dict.fromkeys(int(p) for p in summary.parts[taken])
        tasks.append(
            PartTask(
                paths=tuple(summary.paths[p] for p in parts),
                batches=tuple(summary.image_ids[rows] for rows in group),
                stamps=tuple(summary.stamps[p] for p in parts),
                groups=tuple(  # of each part, the row groups of the rows taken from it
                    tuple(np.unique(summary.groups[taken[summary.parts[taken] == p]]).tolist())
                    for p in parts
                ),
            )
        )
    return tasks


# Said where a Parquet part no longer matches the driver's scan of the data.
CHANGED = "the data changed while training read it (rerun `rayseg train` to read it anew)"


def read_rows(
    paths: tuple[str, ...],
    fs,
    stamps: tuple[Stamp, ...] = (),
    groups: tuple[tuple[int, ...], ...] = (),
) -> dict[str, np.ndarray]:
    """image_id (N,) int64, image and mask (N,) of bytes (None where absent) of Parquet parts:
    of each part its row groups `groups` name (all where there are none).

    A part gone, unreadable or rewritten since the driver scanned the data (its Stamp differs
    from `stamps`) is a RaysegError naming it. The stamp is taken after the read: a part
    replaced before it is caught, and one replaced during it too.
    """
    columns = ["image_id", "image", "mask"]
    # Pre-buffering coalesces an object store's reads; on a local disk it only adds a copy made
    # by Arrow's I/O threads (issue 22, bench/paired_bench.py --change memory).
    pre_buffer = not isinstance(fs, pafs.LocalFileSystem)
    tables = []
    for k, path in enumerate(paths):
        try:
            with pq.ParquetFile(path, filesystem=fs, pre_buffer=pre_buffer) as part:
                if groups and len(groups[k]) < part.num_row_groups:
                    tables.append(part.read_row_groups(groups[k], columns, use_threads=False))
                else:  # the whole part: one read is faster than one per row group
                    tables.append(part.read(columns, use_threads=False))
            rewritten = stamps and stamp_of(fs.get_file_info(path)) != stamps[k]
        except (OSError, pa.ArrowException) as e:
            raise RaysegError(f"{path}: {CHANGED} ({e})") from None
        if rewritten:
            raise RaysegError(
                f"{path}: {CHANGED} (its size or modification time is not the scan's)"
            )
    table = pa.concat_tables(tables)
    return {
        "image_id": np.array(table["image_id"].to_pylist(), np.int64),
        "image": _objects(table["image"].to_pylist()),
        "mask": _objects(table["mask"].to_pylist()),
    }


def _objects(values: list) -> np.ndarray:
    """A list as a 1-D object array (np.array would make equal-length bytes a 2-D array)."""
    out = np.empty(len(values), object)
    out[:] = values
    return out


def task_batches(
    task: PartTask, fs, make_batch: Callable[..., Batch], *, spare: list[Batch] | None = None
) -> Iterator[Batch]:
    """A task's work: read its parts, then make_batch (train_batch or val_batch, its options
    bound) of each batch's rows, in order. spare: batches already handed over (copied), taken
    from as they come: make_batch(rows, out=one of them)."""
    rows = read_rows(task.paths, fs, task.stamps, task.groups)
    where = {int(image_id): k for k, image_id in enumerate(rows["image_id"])}
    for ids in task.batches:
        try:
            at = np.array([where[int(i)] for i in ids], np.intp)
        except KeyError as e:
            raise RaysegError(
                f"{', '.join(task.paths)}: image {e.args[0]} is no longer in these Parquet "
                f"parts: {CHANGED}"
            ) from None
        into = {"out": spare.pop()} if spare else {}
        yield make_batch(_take(rows, at), **into)


def made_batches(task: PartTask, fs, make_batch: Callable[..., Batch]) -> list[Batch]:
    """task_batches, all at once (one Ray object): rayseg.prestart's first batches."""
    return list(task_batches(task, fs, make_batch))


def split_first(task: PartTask) -> tuple[PartTask, PartTask | None]:
    """(the task's first batch as a task of its own, the rest or None): the first is made
    before the training workers start (rayseg.prestart), the rest by the worker's Feed. Both
    read the same parts; every batch is in exactly one."""
    head = replace(task, batches=task.batches[:1])
    rest = replace(task, batches=task.batches[1:]) if len(task.batches) > 1 else None
    return head, rest


def without_first(tasks: list[PartTask], head: PartTask) -> list[PartTask] | None:
    """`tasks` less their first batch, where `head` is that batch (split_first of the first
    task, made elsewhere); None where it is not: then no batch may be left out."""
    first, rest = split_first(tasks[0])
    same = first.paths == head.paths and len(head.batches) == 1
    if not (same and np.array_equal(first.batches[0], head.batches[0])):
        return None
    return [rest, *tasks[1:]] if rest else tasks[1:]


def task_batch_groups(
    task: PartTask, fs, make_batch: Callable[..., Batch], *, group: int, reuse: bool = False
) -> Iterator[list[Batch]]:
    """task_batches, the first alone (to arrive soon), then twice as many at a time up to
    `group` (what rayseg.feed hands over per Ray object).

    reuse: each group's arrays are written over once the next group is begun, for a consumer
    that copies a group when it is yielded (a Ray task's yield puts it into the object store).
    The task then allocates `group` batches, not one per batch: returning and faulting in their
    memory cost 3-4% of the images per CPU second (issue 22, bench/paired_bench.py)."""
    spare: list[Batch] | None = [] if reuse else None
    batches: list[Batch] = []
    size = 1
    for batch in task_batches(task, fs, make_batch, spare=spare):
        batches.append(batch)
        if len(batches) == size:
            yield batches
            if spare is not None:
                spare += batches
            batches, size = [], min(2 * size, group)
    if batches:
        yield batches


def task_objects(
    task: PartTask, fs, make_batch: Callable[..., Batch], *, group: int
) -> Iterator[list[dict[str, Any]]]:
    """rayseg.feed's Ray task: task_batch_groups, its arrays reused (the yield copies each group
    into Ray's object store), each array over raycompat.CHUNK bytes in chunks that the task's
    own thread copies there (raycompat.InChunks). They are arrays again where they are read."""
    keep_freed_memory()
    for batches in task_batch_groups(task, fs, make_batch, group=group, reuse=True):
        yield [{k: raycompat.in_chunks(v) for k, v in b.items()} for b in batches]


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Freed memory a data task's process keeps for its next tasks: a 200-image part's columns as
# read, its bytes, decoded images and batches come to about 200 MB.
KEEP_FREED_BYTES = 256 << 20


@functools.cache
def keep_freed_memory() -> None:
    """This process keeps the memory it frees, up to KEEP_FREED_BYTES, for its next tasks.

    Each task reads ~44 MB per part and makes its batches. With glibc's defaults and Arrow's
    mimalloc, freed memory went back to the kernel and every task faulted in fresh, zeroed pages:
    about 5% of a data task's CPU, as system time (issue 22, bench/paired_bench.py --change
    memory). Here Arrow allocates with malloc (its system pool) and glibc's malloc keeps freed
    blocks of up to KEEP_FREED_BYTES on its heap. A process's memory then stays at its peak,
    at most KEEP_FREED_BYTES above what it holds. Without glibc (no mallopt), nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    if all(mallopt(option, KEEP_FREED_BYTES) for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)):
        pa.set_memory_pool(pa.system_memory_pool())
