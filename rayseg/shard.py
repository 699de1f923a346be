"""Stage 3 (the Ray part of `rayseg masks`): plan shards of images, render them as Ray tasks.

Input: a parsed instances file (rayseg.coco). plan_jobs cuts it into ShardJobs that carry only
their images' annotation bytes; render_shard (plain Python) renders one and writes under OUT
`masks/*.png`, `parquet/part-NNNNN.parquet` and, last, `_shards/shard-NNNNN.json` (the commit
point: a rerun redoes exactly the shards without a record). run_jobs runs them as Ray tasks with
progress; rayseg.masks is the command around it (resume, manifest).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import cv2
import numpy as np

from rayseg import export, layout, naming, storage, waits
from rayseg.coco import CocoIndex, decode_annotation
from rayseg.coco_apart import AnnotationGroups
from rayseg.config import MasksConfig
from rayseg.errors import RaysegError
from rayseg.progress import Progress
from rayseg.rayconnect import connect_ray
from rayseg.records import Problem
from rayseg.render import Shape, ValueScheme, Window, render_mask


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    height: int
    width: int
    annotations: tuple[bytes, ...]  # the annotations' original JSON bytes
    stem: str  # the image's unique output name stem (rayseg.naming.unique_stems)


@dataclass(frozen=True)
class ImageColumns(Sequence[ImageRecord]):
    """A shard's image records as columns and one blob of annotation bytes: what the driver
    builds and Ray pickles, without making a record object per image (0.43 ms less driver CPU
    for 200 COCO images than building records and flattening them to pickle); the records are
    made when read, in the task."""

    heads: tuple[tuple[int, str, int, int, str], ...]  # id, file_name, height, width, stem
    counts: tuple[int, ...]  # annotations per image
    lengths: tuple[int, ...]  # bytes per annotation, in blob order
    blob: bytes  # the annotations' original JSON bytes, image by image

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self) -> Iterator[ImageRecord]:
        view, cuts = memoryview(self.blob), itertools.accumulate(self.lengths, initial=0)
        pieces = iter([bytes(view[a:b]) for a, b in itertools.pairwise(cuts)])
        for (i, name, h, w, stem), n in zip(self.heads, self.counts, strict=True):
            yield ImageRecord(i, name, h, w, tuple(itertools.islice(pieces, n)), stem)

    @overload
    def __getitem__(self, k: int) -> ImageRecord: ...
    @overload
    def __getitem__(self, k: slice) -> tuple[ImageRecord, ...]: ...
    def __getitem__(self, k):
        return tuple(self)[k]  # each read makes them anew: tasks iterate, tests index


@dataclass(frozen=True)
class ShardJob:
    """All one task needs: its images' records, never the whole file."""

    shard: int
    out: str
    images: Sequence[ImageRecord]  # ImageColumns when planned by ShardJobs
    scheme: ValueScheme
    category_names: dict[int, str]
    rasterizer: str
    overlap: str
    crowd: str
    naming: str
    palette: bool
    images_dir: str | None
    layout: str = "rayseg"
    max_pixels: int | None = None
    max_vertices: int | None = None
    follow_image_links: bool = False


def scheme_meta(scheme: ValueScheme, names: dict[int, str]) -> dict[str, Any]:
    """The value scheme as stored in Parquet metadata and the manifest."""
    return {
        "values": scheme.name,
        "dtype": scheme.dtype,
        "ignore_value": scheme.ignore_value,
        "background_value": scheme.background_value,
        "classes": [
            {"value": v, "category_id": c, "name": names.get(c, str(c))}
            for c, v in sorted(scheme.values.items())
        ],
    }


def render_image(
    rec: ImageRecord, job: ShardJob
) -> tuple[np.ndarray, list[Problem], dict[int, Window]]:
    """One image's mask, its per-annotation problems and the windows of the values drawn
    (render_mask's)."""
    shapes: list[Shape] = []
    problems: list[Problem] = []
    for raw in rec.annotations:
        try:
            ann = decode_annotation(raw)
        except Exception as e:  # noqa: BLE001 - one malformed record must not stop the image
            problems.append(Problem(f"malformed annotation ({e})", image_id=rec.id))
            continue
        value = job.scheme.values.get(ann.category_id)
        if value is None:  # a category left out by --classes: not drawn, by request
            continue
        shapes.append(Shape(ann.id, value, ann.segmentation, bool(ann.iscrowd)))
    windows: dict[int, Window] = {}
    mask, render_problems = render_mask(
        rec.height,
        rec.width,
        shapes,
        rasterizer=job.rasterizer,
        overlap=job.overlap,
        crowd=job.crowd,
        ignore_value=job.scheme.ignore_value,
        dtype=job.scheme.dtype,
        max_vertices=job.max_vertices,
        windows=windows,
    )
    problems += [dataclasses.replace(p, image_id=rec.id) for p in render_problems]
    return mask, problems, windows


FEW_VALUES = 16  # up to this many, counting value by value beats a histogram of the mask


def value_counts(mask: np.ndarray, windows: Mapping[int, Window] | None = None) -> dict[int, int]:
    """Pixels per mask value. `windows`: the non-zero values the mask should hold, each with a
    window said to hold all its pixels (render_mask's). When they are few, each value is counted
    in its window and the zeros are the rest; that result stands only if it accounts for every
    non-zero pixel: a value not named, or a pixel outside its window, sends it to the full
    histogram."""
    if windows is not None and len(windows) <= FEW_VALUES:
        nonzero = int(np.count_nonzero(mask))
        counts = {0: mask.size - nonzero} if nonzero < mask.size else {}
        found = 0
        for v, (top, left, bottom, right) in windows.items():
            if v == 0:
                continue
            n = int(np.count_nonzero(mask[top:bottom, left:right] == v))
            if n:
                counts[int(v)] = n
                found += n
        if found == nonzero:
            return counts
    if mask.dtype == np.uint8 and mask.size < 2**24:
        # calcHist counts in float32, exact below 2**24 pixels, and beats np.bincount here.
        counts = cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel().astype(np.int64)
        values = np.flatnonzero(counts)
        return {int(v): int(counts[v]) for v in values}
    if mask.dtype == np.uint8:
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        return {int(v): int(counts[v]) for v in values}
    values, counts = np.unique(mask, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts, strict=True)}


def read_image(
    rec: ImageRecord, images_dir: str, *, follow_links: bool = False
) -> tuple[bytes | None, str | None]:
    """The image's encoded bytes if it exists, decodes and has the recorded size; a name that
    leaves the images folder is refused unopened (rayseg.storage.image_location)."""
    loc = storage.image_location(images_dir, rec.file_name, follow_links=follow_links)
    if loc is None:
        return None, f"image file {rec.file_name!r} is {storage.OUTSIDE_IMAGES}"
    try:
        data = storage.read_bytes(loc)
    except FileNotFoundError:
        return None, f"image file {loc.uri} is missing"
    except OSError as e:
        return None, f"image file {loc.uri} is unreadable ({e})"
    img = storage.decode_image(data)
    if img is None:
        return None, f"image file {loc.uri} does not decode"
    if img.shape[:2] != (rec.height, rec.width):
        return None, (
            f"image file {loc.uri} is {img.shape[1]}x{img.shape[0]}, "
            f"annotations say {rec.width}x{rec.height}"
        )
    return data, None


# Errors of the machine or the storage, not of one record: the shard fails (Ray retries it, a
# rerun redoes it) instead of listing every later image as a problem.
_RECORD_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.EISDIR, errno.ENOTDIR}


class _Skipped(Exception):
    """A record that is listed as a problem and not written."""


def render_shard(job: ShardJob) -> dict[str, Any]:
    """Render, write PNGs and the Parquet part, then the shard record (the commit point).

    A record that cannot be rendered, named or written is a listed problem; the others go on."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # a task holds one CPU: OpenCV's thread pool would spin on the others
    try:
        return _render_shard(job)
    finally:
        cv2.setNumThreads(threads)


def _render_shard(job: ShardJob) -> dict[str, Any]:
    start = time.monotonic()
    out = storage.locate(job.out)
    palette = storage.label_palette() if job.palette else None
    inverse = {v: c for c, v in job.scheme.values.items()}  # pixel value -> category id
    rows, problems, failed, files = [], [], [], []
    pixels: Counter[int] = Counter()
    for rec in job.images:
        try:
            row, png = render_record(rec, job, out, palette, inverse, problems)
        except _Skipped as e:
            problems.append(Problem(str(e), image_id=rec.id))
            failed.append(rec.id)
            continue
        except Exception as e:
            if not _is_record_error(e):
                raise
            problems.append(
                Problem(f"mask not written ({type(e).__name__}: {_short(e)})", image_id=rec.id)
            )
            failed.append(rec.id)
            continue
        pixels.update({p["value"]: p["pixels"] for p in row["value_pixels"]})
        rows.append(row)
        files.append([layout.mask_file(row["mask_path"]), len(png)])
    meta = scheme_meta(job.scheme, job.category_names)
    part_bytes = storage.write_parquet(
        layout.part_path(out, job.shard), storage.mask_table(rows, meta)
    )
    record = {
        "shard": job.shard,
        "images": len(job.images),
        "written": [r["image_id"] for r in rows],
        "failed": failed,
        "problems": [p.to_dict() for p in problems],
        "class_pixels": {str(v): n for v, n in sorted(pixels.items())},
        # What a rerun checks before it trusts this shard (rayseg.verify).
        "masks": files,
        "part_bytes": part_bytes,
        "node": socket.gethostname(),
        "node_ip": _node_ip(),  # hostnames repeat (containers, images); Ray's address does not
        "node_id": _node_id(),
        "pid": os.getpid(),
        "seconds": round(time.monotonic() - start, 3),
    }
    storage.write_json(layout.record_path(out, job.shard), record)
    return record


def render_record(
    rec: ImageRecord,
    job: ShardJob,
    out: storage.Location,
    palette: np.ndarray | None,
    inverse: dict[int, int],
    problems: list[Problem],
) -> tuple[dict[str, Any], bytes]:
    """One image: its Parquet row and PNG, written; raises _Skipped for a listed failure."""
    if job.max_pixels is not None and rec.height * rec.width > job.max_pixels:
        raise _Skipped(
            f"image is {rec.width}x{rec.height} = {rec.width * rec.height} pixels, "
            f"over --max-pixels {job.max_pixels}; not rendered"
        )
    image_bytes = None
    if job.images_dir:
        image_bytes, reason = read_image(rec, job.images_dir, follow_links=job.follow_image_links)
        if reason:
            raise _Skipped(reason)
    mask, image_problems, windows = render_image(rec, job)
    counts = value_counts(mask, windows)
    categories = sorted(inverse[v] for v in counts if v in inverse)
    name = naming.mask_name(rec.stem, categories, job.naming)
    png = storage.encode_png(mask, palette=palette)
    # In place, not via a temporary: until the shard record exists a rerun rewrites the file.
    storage.write_bytes(layout.mask_path(out, name), png, atomic=False)
    if job.layout == "voc":
        export.write_voc_pair(out, rec.stem, image_bytes, mask)
    problems.extend(image_problems)
    row = {
        "image_id": rec.id,
        "file_name": rec.file_name,
        "height": rec.height,
        "width": rec.width,
        "category_ids": categories,
        "value_pixels": [{"value": v, "pixels": n} for v, n in sorted(counts.items())],
        "mask_path": layout.mask_rel(name),
        "mask": png,
        "image": image_bytes,
    }
    return row, png


def _is_record_error(e: Exception) -> bool:
    if isinstance(e, OSError):
        return e.errno in _RECORD_ERRNOS
    return not isinstance(e, RaysegError)


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - the node id is informational only
        pass
    return None


def _node_ip() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - the address is informational only
        pass
    return None


# `--shard-size 0` (auto): about SHARDS_PER_CPU shards per CPU, so small inputs use every core
# and the last shards finish close together; between AUTO_MIN and AUTO_MAX images, so a task's
# fixed cost (~10 ms: scheduling, the Parquet part, the record) stays under 1-2% of its work.
SHARDS_PER_CPU = 4
AUTO_MIN, AUTO_MAX = 8, 200


def auto_shard_size(num_images: int, cpus: float) -> int:
    per_shard = -(-num_images // max(1, int(cpus) * SHARDS_PER_CPU))
    return max(AUTO_MIN, min(AUTO_MAX, per_shard))


class ShardJobs(Sequence[ShardJob]):
    """The run's shards in order, each ShardJob built when asked for: the driver never holds
    more than the shards in flight, not a copy of every annotation."""

    def __init__(self, index: CocoIndex, template: ShardJob, shard_size: int) -> None:
        self.index, self.template, self.shard_size = index, template, shard_size
        self.groups = AnnotationGroups.of(index)
        self.stems = naming.unique_stems((im.id, im.file_name) for im in index.images)

    def __len__(self) -> int:
        return -(-len(self.index.images) // self.shard_size)

    def num_images(self, k: int) -> int:
        return min(self.shard_size, len(self.index.images) - k * self.shard_size)

    @overload
    def __getitem__(self, k: int) -> ShardJob: ...
    @overload
    def __getitem__(self, k: slice) -> list[ShardJob]: ...
    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k %= len(self)
        first = k * self.shard_size
        shard_images = self.index.images[first : first + self.shard_size]
        groups = [self.groups.positions(p) for p in range(first, first + len(shard_images))]
        positions = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        annotations = self.index.ann_raw.read(positions)
        images = ImageColumns(
            tuple(
                (im.id, im.file_name, im.height, im.width, self.stems[p])
                for p, im in enumerate(shard_images, first)
            ),
            tuple(map(len, groups)),
            tuple(map(len, annotations)),
            b"".join(annotations),
        )
        return dataclasses.replace(self.template, shard=k, images=images)


def plan_jobs(
    index: CocoIndex,
    cfg: MasksConfig,
    scheme: ValueScheme,
    names: dict[int, str] | None = None,
    *,
    shard_size: int | None = None,
) -> ShardJobs:
    """Deterministic shards of `shard_size` images (default cfg.shard_size), in file order.

    `names`: category id -> name of the drawn classes (default: the file's categories)."""
    size = shard_size or cfg.shard_size
    if size <= 0:
        raise RaysegError(f"--shard-size must be positive, got {size}")
    if names is None:
        names = {c.id: c.name for c in index.categories}
    template = ShardJob(
        shard=-1,
        out=storage.locate(cfg.out).uri,  # absolute: tasks may run in another directory
        images=(),
        scheme=scheme,
        category_names=names,
        rasterizer=cfg.rasterizer,
        overlap=cfg.overlap,
        crowd=cfg.crowd,
        naming=cfg.naming,
        palette=cfg.palette,
        images_dir=storage.locate(cfg.images_dir).uri if cfg.images_dir else None,
        layout=cfg.layout,
        max_pixels=cfg.max_pixels,
        max_vertices=cfg.max_vertices,
        follow_image_links=cfg.follow_image_links,
    )
    return ShardJobs(index, template, size)


MIN_IN_FLIGHT = 16


def in_flight_limit(cpus: float) -> int:
    """Shards submitted but not finished: two per CPU keep every CPU busy while the driver
    collects, and at least MIN_IN_FLIGHT show an autoscaling cluster (cluster.yaml) that starts
    with few CPUs the demand to grow; the driver and object store hold only these (~1 MB each
    for 200 COCO images)."""
    return max(MIN_IN_FLIGHT, 2 * int(cpus))


def run_jobs(
    jobs: ShardJobs, todo: list[int], cfg: MasksConfig, progress: Progress | None
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Render the shards `todo` as Ray tasks, a bounded number at a time; a worker that dies is
    retried by Ray (max_retries), a shard stranded on a node lost without a word is submitted
    again by the driver (waits.LostNodes). `progress`: the run's bar (None when nothing was to
    do), which may already count shards rendered elsewhere; closed here."""
    if not todo:
        if progress is not None:
            progress.close()
        return [], []
    assert progress is not None, "the run's bar exists whenever a shard is to do"
    import ray

    connect_ray(cfg.address, cfg.num_cpus)
    # The driver's AWS_* reach the tasks through the job's runtime_env (runtime.job_env).
    render, options = (
        ray.remote(render_shard),
        {"name": "render_shard", "num_cpus": 1, "max_retries": 3},
    )
    task = render.options(**options)
    waiting = iter(todo)
    pending: dict[Any, int] = {}
    records, errors = [], []
    checked = -float("inf")
    lost = waits.LostNodes(
        "render_shard", what="shard", say=lambda line: print(f"masks: {line}", flush=True)
    )
    while True:
        if time.monotonic() - checked > 10.0:  # an autoscaling cluster grows: look again
            limit = in_flight_limit(ray.cluster_resources().get("CPU", 0))
            checked = time.monotonic()
            moved = lost.stranded(pending)
            if lost.lost:  # every shard from now on: away from the lost nodes (waits.LostNodes)
                task = render.options(**options, label_selector=waits.away_from(set(lost.lost)))
            for ref in moved:
                ray.cancel(ref)  # so Ray does not run it again once it notices the node is gone
                k = pending.pop(ref)
                pending[task.remote(jobs[k])] = k
        for k in itertools.islice(waiting, max(0, limit - len(pending))):
            pending[task.remote(jobs[k])] = k
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
        for ref in ready:
            k = pending.pop(ref)
            try:
                records.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - reported after the other shards finish
                errors.append((k, _short(e)))
            progress.update(jobs.num_images(k))
    progress.close()
    return records, errors


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
