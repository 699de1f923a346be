"""Per-core render throughput: rayseg's render task against the minimal pipeline (issue 10).

    python bench/percore_bench.py                 # 1,000 images of the render preset, 7 repeats
    python bench/percore_bench.py --images 300 --repeats 3

In this one process, on the same first N images of the file, interleaved repeats of:
  minimal   bench/minimal.py render_minimal: windowed fillPoly, np.maximum, cv2 PNG, open/write
            (and, for reference only, the same with rayseg's zlib-ng PNG encoder in place of cv2's)
  opencv    rayseg.shard.render_shard of one ShardJob (--rasterizer opencv): annotation decode,
            render_mask, pixel histogram, PNG encode, atomic mask writes, Parquet part, shard record
  coco      the same with --rasterizer coco
each into a fresh folder (as `rayseg masks --overwrite`). Reported: the best pass of each as
images/s per core, the ratios (targets: opencv >= 1.0x minimal, coco >= 0.5x opencv) and, timing
each of render_shard's steps alone, ms per image of its parts. Writes
bench/results/percore_bench.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from make_coco import DATA_DIR, ensure_preset
from minimal import encode_only, group_by_image, render_masks, render_minimal

from rayseg import storage
from rayseg.coco import decode_annotation
from rayseg.config import MasksConfig
from rayseg.masks import plan_masks
from rayseg.rasterize import read_geometry
from rayseg.render import Shape, render_mask
from rayseg.shard import ImageRecord, ShardJob, render_image, render_shard, value_counts

RESULTS = Path(__file__).resolve().parent / "results" / "percore_bench.txt"
TARGET_VS_MINIMAL = 1.0
TARGET_COCO_RATIO = 0.5


def make_job(path: Path, out: str, rasterizer: str, num_images: int) -> ShardJob:
    cfg = MasksConfig(annotations=str(path), out=out, rasterizer=rasterizer, shard_size=num_images)
    return plan_masks(cfg).jobs[0]


def fresh_out(parent: Path) -> str:
    out = tempfile.mkdtemp(dir=parent)
    for sub in ("masks", "parquet", "_shards"):
        os.makedirs(os.path.join(out, sub))
    return out


def timed(fn: Callable[[str], object], out: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of fn(out); out is made before the clocks start."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(out)
    return time.perf_counter() - wall, time.process_time() - cpu


def profile_parts(job: ShardJob, out: str, repeats: int) -> list[tuple[str, float]]:
    """CPU ms per image of render_shard's steps, each timed alone over all images (best of
    repeats).

    The same calls render_shard makes per image, in its order; render_mask on pre-decoded shapes
    gives the annotation decode by difference. Only opencv has no separate fill: it fills
    straight into the mask while composing.
    """
    records = job.images
    shapes = [_shapes(rec, job) for rec in records]
    rendered = [render_image(rec, job) for rec in records]
    masks = [m for m, _, _ in rendered]
    pngs = [storage.encode_png(m) for m in masks]
    target = storage.locate(out)
    options = {"rasterizer": job.rasterizer, "overlap": job.overlap, "crowd": job.crowd}
    options |= {"ignore_value": job.scheme.ignore_value, "dtype": job.scheme.dtype}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("decode + render_mask", lambda: [render_image(rec, job) for rec in records]),
        (
            "render_mask",
            lambda: [
                render_mask(r.height, r.width, s, **options)
                for r, s in zip(records, shapes, strict=True)
            ],
        ),
        (
            "  read geometry",
            lambda: [
                read_geometry(r.height, r.width, shape.segmentation)
                for r, s in zip(records, shapes, strict=True)
                for shape in s
            ],
        ),
        ("histogram", lambda: [value_counts(m, v) for m, _, v in rendered]),
        ("PNG encode", lambda: [storage.encode_png(m) for m in masks]),
        (
            "mask file write",
            lambda: [
                storage.write_bytes(target.join("masks", f"{k}.png"), png)
                for k, png in enumerate(pngs)
            ],
        ),
    ]
    ms = {label: 1e3 * _best(fn, repeats) / len(records) for label, fn in steps}
    ms["  annotation decode"] = ms["decode + render_mask"] - ms["render_mask"]
    ms["  fill + compose"] = ms["render_mask"] - ms["  read geometry"]
    order = [
        "render_mask",
        "  read geometry",
        "  fill + compose",
        "  annotation decode",
        "histogram",
        "PNG encode",
        "mask file write",
    ]
    return [(label, ms[label]) for label in order]


def _best(fn: Callable[[], object], repeats: int) -> float:
    return min(timed(lambda _: fn(), "")[1] for _ in range(repeats))


def _shapes(rec: ImageRecord, job: ShardJob) -> list[Shape]:
    anns = [decode_annotation(raw) for raw in rec.annotations]
    return [
        Shape(a.id, job.scheme.values[a.category_id], a.segmentation, bool(a.iscrowd))
        for a in anns
        if a.category_id in job.scheme.values
    ]


def measure(
    path: Path,
    images: list[dict[str, Any]],
    groups: dict[int, list[dict[str, Any]]],
    scratch: Path,
    repeats: int,
) -> tuple[
    dict[str, float], dict[str, float], dict[str, list[tuple[float, float]]], dict[str, Any]
]:
    """Best wall and CPU seconds of each pipeline, every pass, and render_shard's step profile."""
    n = len(images)
    jobs = {r: make_job(path, fresh_out(scratch), r, n) for r in ("opencv", "coco")}
    runs: dict[str, Callable[[str], object]] = {
        "minimal": lambda out: render_minimal(images, groups, os.path.join(out, "masks")),
        "minimal_ng": lambda out: render_minimal(
            images, groups, os.path.join(out, "masks"), encode=storage.encode_png
        ),
        "opencv": lambda out: render_shard(_moved(jobs["opencv"], out)),
        "coco": lambda out: render_shard(_moved(jobs["coco"], out)),
    }
    passes: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up
        run(fresh_out(scratch))
    for _ in range(repeats):
        for label, run in runs.items():
            passes[label].append(timed(run, fresh_out(scratch)))
    best = {k: min(wall for wall, _ in v) for k, v in passes.items()}
    best_cpu = {k: min(cpu for _, cpu in v) for k, v in passes.items()}
    profiles = {r: profile_parts(jobs[r], fresh_out(scratch), repeats) for r in jobs}
    return best, best_cpu, passes, profiles


def main(argv: list[str] | None = None) -> int:
    # Per core: this process and any threads it starts share one CPU, as a Ray task does.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help="COCO instances file (default: render preset)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    path = args.file or ensure_preset("render")
    data = msgspec.json.decode(path.read_bytes())
    images, groups = data["images"][: args.images], group_by_image(data)
    n = len(images)
    anns = sum(len(groups.get(im["id"], ())) for im in images)
    scratch = Path(tempfile.mkdtemp(prefix="percore-", dir=DATA_DIR))
    try:
        best, best_cpu, passes, profiles = measure(path, images, groups, scratch, args.repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rate = {k: n / s for k, s in best.items()}
    cpu_rate = {k: n / s for k, s in best_cpu.items()}
    encode_ms = 1e3 * encode_only(render_masks(images, groups)) / n
    lines = [
        f"file: {path} (first {n} images, {anns} annotations); one process; "
        f"best of {args.repeats} interleaved passes after a warm-up; pinned to one core of "
        f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end",
        f"{'pipeline':<36}{'images/s':>10}{'ms/image':>10}{'median ms':>11}"
        f"{'CPU ms':>9}{'CPU im/s':>10}",
    ]
    names = {
        "minimal": "minimal (bench/minimal.py)",
        "minimal_ng": "  minimal with rayseg's PNG encoder",
        "opencv": "rayseg render_shard, opencv",
        "coco": "rayseg render_shard, coco",
    }
    for k, label in names.items():
        median = sorted(wall for wall, _ in passes[k])[len(passes[k]) // 2]
        lines.append(
            f"{label:<36}{rate[k]:>10.1f}{1e3 * best[k] / n:>10.2f}{1e3 * median / n:>11.2f}"
            f"{1e3 * best_cpu[k] / n:>9.2f}{cpu_rate[k]:>10.1f}"
        )
    lines.append(f"  (minimal's PNG encode alone: {encode_ms:.2f} ms/image)")
    vs_minimal = rate["opencv"] / rate["minimal"]
    medians = {k: sorted(wall for wall, _ in v)[len(v) // 2] for k, v in passes.items()}
    median_ratio = medians["minimal"] / medians["opencv"]
    coco_ratio = rate["coco"] / rate["opencv"]
    lines += [
        "  (CPU: user + system time of this process; steadier than wall time on a shared machine)",
        "",
        f"opencv / minimal: {vs_minimal:.2f}x wall, "
        f"{cpu_rate['opencv'] / cpu_rate['minimal']:.2f}x CPU   target >= {TARGET_VS_MINIMAL}x"
        f"   {'PASS' if vs_minimal >= TARGET_VS_MINIMAL else 'FAIL'} (wall)",
        f"opencv / minimal, median passes: {median_ratio:.2f}x wall (file creation on this disk "
        "varies between passes)",
        f"coco / opencv:    {coco_ratio:.2f}x wall, "
        f"{cpu_rate['coco'] / cpu_rate['opencv']:.2f}x CPU   target >= {TARGET_COCO_RATIO}x"
        f"   {'PASS' if coco_ratio >= TARGET_COCO_RATIO else 'FAIL'} (wall)",
        "",
        "render_shard's steps, ms per image (each alone over the same images, best CPU time):",
        f"{'step':<24}{'opencv':>10}{'coco':>10}",
    ]
    by_step = {r: dict(rows) for r, rows in profiles.items()}
    for label, _ in profiles["opencv"]:
        lines.append(f"{label:<24}{by_step['opencv'][label]:>10.3f}{by_step['coco'][label]:>10.3f}")
    parts = {r: sum(v for k, v in by_step[r].items() if not k.startswith(" ")) for r in by_step}
    whole = {r: 1e3 * best_cpu[r] / n for r in by_step}
    lines.append(
        f"{'rest (Parquet, record)':<24}"
        + "".join(
            f"{whole[r] - parts[r] - by_step[r]['  annotation decode']:>10.3f}" for r in by_step
        )
    )
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text + "\n")
    return 0


def _moved(job: ShardJob, out: str) -> ShardJob:
    return dataclasses.replace(job, out=out)


if __name__ == "__main__":
    sys.exit(main())
