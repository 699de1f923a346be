"""Stage 3: plan shards of images, render them as Ray tasks, resume, report.

Input: a COCO instances file (parsed once, by the driver). Output under OUT (local or s3://):
`masks/*.png`, `parquet/part-NNNNN.parquet` (one per shard), `_shards/` (plan + one record per
finished shard), `manifest.json` and `config.yaml`. A shard counts as done only once its record
is written, after its PNGs and Parquet part, so a rerun redoes exactly the unfinished shards.
`render_shard` is plain Python; the Ray task is a thin wrapper around it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from rayseg import storage
from rayseg.coco import CocoIndex, annotations_by_image, decode_annotation, load_coco
from rayseg.config import MasksConfig, dump_yaml, to_dict
from rayseg.errors import RaysegError
from rayseg.render import Shape, ValueScheme, render_mask, value_scheme
from rayseg.runtime import Progress, connect_ray

# Settings that change what is written; a resumed run must match them all.
_OUTPUT_KEYS = (
    "rasterizer",
    "overlap",
    "values",
    "crowd",
    "naming",
    "palette",
    "images_dir",
    "shard_size",
)


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


def mask_file_name(file_name: str, categories: list[int], naming: str) -> str:
    stem = os.path.splitext(os.path.basename(file_name))[0]
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


def render_image(rec: ImageRecord, job: ShardJob) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image's mask and its per-annotation problems."""
    shapes, problems = [], []
    for raw in rec.annotations:
        try:
            ann = decode_annotation(raw)
        except Exception as e:  # noqa: BLE001 - one malformed record must not stop the image
            problems.append({"image_id": rec.id, "reason": f"malformed annotation ({e})"})
            continue
        shapes.append(
            Shape(ann.id, job.scheme.values[ann.category_id], ann.segmentation, bool(ann.iscrowd))
        )
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
    for p in render_problems:
        entry: dict[str, Any] = {"image_id": rec.id}
        if p.annotation_id is not None:
            entry["annotation_id"] = p.annotation_id
        entry["reason"] = p.reason
        problems.append(entry)
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
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
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
                problems.append({"image_id": rec.id, "reason": reason})
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
        rows.append(
            {
                "image_id": rec.id,
                "file_name": rec.file_name,
                "height": rec.height,
                "width": rec.width,
                "categories": categories,
                "class_pixels": [{"value": v, "pixels": n} for v, n in sorted(counts.items())],
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
        "problems": problems,
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


def plan_jobs(index: CocoIndex, cfg: MasksConfig, scheme: ValueScheme) -> list[ShardJob]:
    """Deterministic shards of `shard_size` images, in the file's image order."""
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
        )
        for k, s in enumerate(range(0, len(records), cfg.shard_size))
    ]


def fingerprint(index_digest: str, cfg: MasksConfig) -> dict[str, Any]:
    settings = {k: getattr(cfg, k) for k in _OUTPUT_KEYS}
    return {"annotations_sha1": index_digest, **settings}


def file_digest(path: str) -> str:
    return hashlib.sha1(storage.read_bytes(storage.locate(path))).hexdigest()


def prepare_output(out: storage.Location, plan: dict[str, Any], *, overwrite: bool) -> set[int]:
    """Check or start the output folder; returns the shards already done."""
    storage.check_writable(out)
    plan_loc = out.join("_shards", "plan.json")
    if overwrite:
        for sub in ("masks", "parquet", "_shards"):
            storage.delete_dir(out.join(sub))
        storage.delete(out.join("manifest.json"))
    elif storage.exists(plan_loc):
        previous = storage.read_json(plan_loc)
        changed = [k for k in plan if previous.get(k) != plan[k]]
        if changed:
            raise RaysegError(
                f"{out.uri} holds masks made with other settings ({', '.join(changed)} differ); "
                "rerun with --overwrite or choose another --out"
            )
    for sub in ("masks", "parquet", "_shards"):
        storage.make_dirs(out.join(sub))
        storage.remove_stray_temporaries(out.join(sub))
    storage.write_json(plan_loc, plan)
    done = set()
    for name in storage.list_files(out.join("_shards")):
        if name.startswith("shard-") and name.endswith(".json"):
            done.add(int(name[len("shard-") : -len(".json")]))
    return done


def run_masks(cfg: MasksConfig) -> dict[str, Any]:
    start = time.monotonic()
    index = load_coco(cfg.annotations)
    scheme = value_scheme([c.id for c in index.categories], cfg.values)
    if cfg.palette and scheme.dtype != "uint8":
        raise RaysegError(f"--palette needs 8-bit values; --values {cfg.values} gives 16-bit masks")
    if (
        cfg.images_dir
        and storage.locate(cfg.images_dir).is_local
        and not os.path.isdir(cfg.images_dir)
    ):
        raise RaysegError(f"{cfg.images_dir}: images folder not found")
    out = storage.locate(cfg.out)
    plan = fingerprint(file_digest(cfg.annotations), cfg)
    jobs = plan_jobs(index, cfg, scheme)
    done = prepare_output(out, {**plan, "num_shards": len(jobs)}, overwrite=cfg.overwrite)
    todo = [j for j in jobs if j.shard not in done]
    new_records, errors = run_jobs(todo, cfg, total_images=len(index.images))
    for sub in ("masks", "parquet", "_shards"):
        # A worker killed mid-write (and retried by Ray) leaves its temporary behind.
        storage.remove_stray_temporaries(out.join(sub))
    records = {r["shard"]: r for r in new_records}
    for k in sorted(done):
        records[k] = storage.read_json(out.join("_shards", shard_record_name(k)))
    manifest = build_manifest(cfg, index, scheme, jobs, records, new_shards=set(records) - done)
    manifest["counts"]["seconds"] = round(time.monotonic() - start, 2)
    storage.write_json(out.join("manifest.json"), manifest)
    storage.write_bytes(out.join("config.yaml"), dump_yaml(cfg).encode())
    print(summary_line(manifest, out.uri))
    if errors:
        first = errors[0]
        raise RaysegError(
            f"{len(errors)} of {len(jobs)} shards failed (first: shard {first[0]}: {first[1]}); "
            "the finished ones are kept: rerun the same command to retry the rest"
        )
    return manifest


def run_jobs(
    jobs: list[ShardJob], cfg: MasksConfig, *, total_images: int
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Render shards as Ray tasks; a worker that dies is retried by Ray (max_retries)."""
    if not jobs:
        return [], []
    import ray

    connect_ray(cfg.address, cfg.num_cpus)
    options: dict[str, Any] = {"name": "render_shard", "num_cpus": 1, "max_retries": 3}
    if env := _forwarded_env(cfg.out):
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


def _forwarded_env(out: str) -> dict[str, Any] | None:
    """Workers on other nodes need the driver's object-store credentials and endpoint."""
    if not out.startswith("s3://"):
        return None
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"env_vars": env} if env else None


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def build_manifest(
    cfg: MasksConfig,
    index: CocoIndex,
    scheme: ValueScheme,
    jobs: list[ShardJob],
    records: dict[int, dict],
    *,
    new_shards: set[int],
) -> dict[str, Any]:
    pixels: Counter[int] = Counter()
    problems = list(index.problems)
    written = resumed = failed = 0
    for k in sorted(records):
        r = records[k]
        pixels.update({int(v): n for v, n in r["class_pixels"].items()})
        problems.extend(r["problems"])
        if k in new_shards:
            written += len(r["written"])
        else:
            resumed += len(r["written"])
        failed += len(r["failed"])
    names = {c.id: c.name for c in index.categories}
    meta = scheme_meta(scheme, names)
    class_pixels = {
        "background": pixels.get(scheme.background_value, 0),
        "ignore": pixels.get(scheme.ignore_value, 0),
    }
    for c in meta["classes"]:
        class_pixels[c["name"]] = pixels.get(c["value"], 0)
    rendered_images = {i for r in records.values() for i in r["written"]}
    return {
        "config": to_dict(cfg),
        "value_scheme": meta,
        "counts": {
            "images_in": index.num_images_in_file,
            "images_valid": len(index.images),
            "masks_written": written,
            "resumed": resumed,
            "failed": failed + index.num_images_in_file - len(index.images),
            "rendered_total": len(rendered_images),
            "shards": len(jobs),
            "shards_done": len(records),
            "shards_run": len(new_shards),
            "problems": len(problems),
        },
        "class_pixels": class_pixels,
        "problems": problems,
    }


def summary_line(manifest: dict[str, Any], out_uri: str) -> str:
    c = manifest["counts"]
    return (
        f"masks: {c['images_valid']} images -> {c['masks_written']} written, "
        f"{c['resumed']} resumed, {c['failed']} failed, {c['problems']} problems "
        f"({c['shards_run']}/{c['shards']} shards run); outputs in {out_uri} "
        f"(masks/, parquet/, manifest.json)"
    )
