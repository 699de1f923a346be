"""Stage 3 (the Ray part of `rayseg masks`): plan shards of images, render them as Ray tasks.

Input: a parsed instances file (rayseg.coco). plan_jobs cuts it into ShardJobs that carry only
their images' annotation bytes; render_shard (plain Python) renders one and writes under OUT
`masks/*.png`, `parquet/part-NNNNN.parquet` and, last, `_shards/shard-NNNNN.json` (the commit
point: a rerun redoes exactly the shards without a record). run_jobs runs them as Ray tasks with
progress; rayseg.masks is the command around it (resume, manifest).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from rayseg import export, storage
from rayseg.coco import CocoIndex, annotations_by_image, decode_annotation
from rayseg.config import MasksConfig
from rayseg.errors import RaysegError
from rayseg.records import Problem
from rayseg.render import Shape, ValueScheme, render_mask
from rayseg.runtime import Progress, connect_ray, forwarded_env


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    height: int
    width: int
    annotations: tuple[bytes, ...]  # the annotations' original JSON bytes


@dataclass(frozen=True)
class ShardJob:
    """All one task needs: its images' records, never the whole file."""

    shard: int
    out: str
    images: tuple[ImageRecord, ...]
    scheme: ValueScheme
    category_names: dict[int, str]
    rasterizer: str
    overlap: str
    crowd: str
    naming: str
    palette: bool
    images_dir: str | None
    layout: str = "rayseg"


def mask_file_name(file_name: str, categories: list[int], naming: str) -> str:
    stem = export.stem(file_name)
    if naming == "stem":
        return f"{stem}.png"
    return f"{stem}_mask_cats_{'_'.join(str(c) for c in categories)}.png"


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


def render_image(rec: ImageRecord, job: ShardJob) -> tuple[np.ndarray, list[Problem]]:
    """One image's mask and its per-annotation problems."""
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
    mask, render_problems = render_mask(
        rec.height,
        rec.width,
        shapes,
        rasterizer=job.rasterizer,
        overlap=job.overlap,
        crowd=job.crowd,
        ignore_value=job.scheme.ignore_value,
        dtype=job.scheme.dtype,
    )
    problems += [dataclasses.replace(p, image_id=rec.id) for p in render_problems]
    return mask, problems


def value_counts(mask: np.ndarray) -> dict[int, int]:
    """Pixels per mask value."""
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


def read_image(rec: ImageRecord, images_dir: str) -> tuple[bytes | None, str | None]:
    """The image's encoded bytes if it exists, decodes and has the recorded size."""
    loc = storage.locate(images_dir).join(rec.file_name)
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


def render_shard(job: ShardJob) -> dict[str, Any]:
    """Render, write PNGs and the Parquet part, then the shard record (the commit point)."""
    start = time.monotonic()
    out = storage.locate(job.out)
    palette = storage.label_palette() if job.palette else None
    inverse = {v: c for c, v in job.scheme.values.items()}
    rows, problems, failed = [], [], []
    pixels: Counter[int] = Counter()
    for rec in job.images:
        image_bytes = None
        if job.images_dir:
            image_bytes, reason = read_image(rec, job.images_dir)
            if reason:
                problems.append(Problem(reason, image_id=rec.id))
                failed.append(rec.id)
                continue
        mask, image_problems = render_image(rec, job)
        problems.extend(image_problems)
        counts = value_counts(mask)
        pixels.update(counts)
        categories = sorted(inverse[v] for v in counts if v in inverse)
        name = mask_file_name(rec.file_name, categories, job.naming)
        png = storage.encode_png(mask, palette=palette)
        storage.write_bytes(out.join("masks", name), png)
        if job.layout == "voc":
            export.write_voc_pair(out, export.stem(rec.file_name), image_bytes, mask)
        rows.append(
            {
                "image_id": rec.id,
                "file_name": rec.file_name,
                "height": rec.height,
                "width": rec.width,
                "category_ids": categories,
                "value_pixels": [{"value": v, "pixels": n} for v, n in sorted(counts.items())],
                "mask_path": f"masks/{name}",
                "mask": png,
                "image": image_bytes,
            }
        )
    meta = scheme_meta(job.scheme, job.category_names)
    storage.write_parquet(out.join("parquet", part_name(job.shard)), storage.mask_table(rows, meta))
    record = {
        "shard": job.shard,
        "images": len(job.images),
        "written": [r["image_id"] for r in rows],
        "failed": failed,
        "problems": [p.to_dict() for p in problems],
        "class_pixels": {str(v): n for v, n in sorted(pixels.items())},
        "node": socket.gethostname(),
        "node_id": _node_id(),
        "pid": os.getpid(),
        "seconds": round(time.monotonic() - start, 3),
    }
    storage.write_json(out.join("_shards", shard_record_name(job.shard)), record)
    return record


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - the node id is informational only
        pass
    return None


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def shard_record_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def plan_jobs(
    index: CocoIndex,
    cfg: MasksConfig,
    scheme: ValueScheme,
    names: dict[int, str] | None = None,
) -> list[ShardJob]:
    """Deterministic shards of `shard_size` images, in the file's image order.

    `names`: category id -> name of the drawn classes (default: the file's categories)."""
    if cfg.shard_size <= 0:
        raise RaysegError(f"--shard-size must be positive, got {cfg.shard_size}")
    groups = annotations_by_image(index)
    records = [
        ImageRecord(
            im.id,
            im.file_name,
            im.height,
            im.width,
            tuple(bytes(index.ann_raw[i]) for i in groups.get(im.id, ())),
        )
        for im in index.images
    ]
    if names is None:
        names = {c.id: c.name for c in index.categories}
    out = storage.locate(cfg.out).uri  # absolute: tasks may run in another directory
    return [
        ShardJob(
            shard=k,
            out=out,
            images=tuple(records[s : s + cfg.shard_size]),
            scheme=scheme,
            category_names=names,
            rasterizer=cfg.rasterizer,
            overlap=cfg.overlap,
            crowd=cfg.crowd,
            naming=cfg.naming,
            palette=cfg.palette,
            images_dir=storage.locate(cfg.images_dir).uri if cfg.images_dir else None,
            layout=cfg.layout,
        )
        for k, s in enumerate(range(0, len(records), cfg.shard_size))
    ]


def run_jobs(
    jobs: list[ShardJob], cfg: MasksConfig, *, total_images: int
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Render shards as Ray tasks; a worker that dies is retried by Ray (max_retries)."""
    if not jobs:
        return [], []
    import ray

    connect_ray(cfg.address, cfg.num_cpus)
    options: dict[str, Any] = {"name": "render_shard", "num_cpus": 1, "max_retries": 3}
    if env := forwarded_env(cfg.out):
        options["runtime_env"] = env
    task = ray.remote(render_shard).options(**options)
    pending = {task.remote(job): job for job in jobs}
    progress = Progress(sum(len(j.images) for j in jobs), "masks")
    records, errors = [], []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
        for ref in ready:
            job = pending.pop(ref)
            try:
                records.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - reported after the other shards finish
                errors.append((job.shard, _short(e)))
            progress.update(len(job.images))
    progress.close()
    return records, errors


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
