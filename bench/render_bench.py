"""Mask rendering throughput: the original PIL script, pycocotools, and `rayseg masks` (Ray).

    python bench/render_bench.py                        # 8,000-image render preset
    python bench/render_bench.py --baseline-images 2000 # time the serial baselines on 2,000 images
    python bench/render_bench.py --quick                # 500-image smoke test

(a) the original: per annotation a PIL "L" image, ImageDraw.polygon with fill category_id*100 (it
    saturates at 255: the original bug), np.maximum into the mask, crowds skipped (it could not read
    RLE), PIL PNG save; serial, after json.load.
(b) pycocotools: COCO(file), annToMask per annotation, np.maximum of category_id*mask, cv2 PNG;
    serial.
(c) `python -m rayseg masks --overwrite` as a subprocess, process start to exit, per rasterizer.
Capacity: the pure per-image path of a render task (decode, render_mask, encode_png; no files) in
this one process, times the number of cores: what the machine allows. (c)'s rendering phase is
read back from its shard records (duration) and their file times (end) and compared with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
from make_coco import DATA_DIR, ensure_preset, write_coco
from subset_bench import measure

REPO = Path(__file__).resolve().parent.parent
QUICK_IMAGES = 500
TARGET_SPEEDUP = 5.0
TARGET_COCO_RATIO = 0.5
TARGET_CAPACITY_SHARE = 0.8


@dataclass(frozen=True)
class Result:
    label: str
    images: int  # images the rate stands for
    seconds: float  # end-to-end, extrapolated when measured < images
    measured: int  # images actually rendered
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def group_by_image(data: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        groups[ann["image_id"]].append(ann)
    return groups


def extrapolate(label: str, load_s: float, loop_s: float, measured: int, total: int) -> Result:
    seconds = load_s + loop_s / measured * total
    note = f"load {load_s:.1f} s"
    if measured < total:
        note += f"; loop timed on {measured} of {total} images, extrapolated per image"
    return Result(label, total, seconds, measured, note)


# ---- (a) the original PIL script ----


def pil_mask(height: int, width: int, anns: list[dict[str, Any]]):
    from PIL import Image, ImageDraw

    mask = np.zeros((height, width), np.uint8)
    for ann in anns:
        segmentation = ann["segmentation"]
        if ann.get("iscrowd") or not isinstance(segmentation, list):
            continue
        layer = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(layer)
        for polygon in segmentation:
            draw.polygon(polygon, fill=ann["category_id"] * 100)
        mask = np.maximum(mask, np.asarray(layer))
    return Image.fromarray(mask)


def run_pil(path: Path, out: Path, limit: int) -> Result:
    start = time.perf_counter()
    with open(path) as f:
        data = json.load(f)
    groups = group_by_image(data)
    load_s = time.perf_counter() - start
    images = data["images"][:limit]
    start = time.perf_counter()
    for img in images:
        mask = pil_mask(img["height"], img["width"], groups.get(img["id"], []))
        mask.save(out / (Path(img["file_name"]).stem + ".png"))
    loop_s = time.perf_counter() - start
    return extrapolate(
        "(a) PIL polygons, serial (original)", load_s, loop_s, len(images), len(data["images"])
    )


# ---- (b) pycocotools ----


def run_pycocotools(path: Path, out: Path, limit: int) -> Result:
    import contextlib
    import io as stdio

    from pycocotools.coco import COCO

    start = time.perf_counter()
    with contextlib.redirect_stdout(stdio.StringIO()):
        coco = COCO(str(path))
    load_s = time.perf_counter() - start
    image_ids = [img["id"] for img in coco.dataset["images"]]
    start = time.perf_counter()
    for image_id in image_ids[:limit]:
        img = coco.imgs[image_id]
        mask = np.zeros((img["height"], img["width"]), np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = np.maximum(mask, coco.annToMask(ann) * np.uint8(ann["category_id"]))
        cv2.imwrite(str(out / (Path(img["file_name"]).stem + ".png")), mask)
    loop_s = time.perf_counter() - start
    return extrapolate(
        "(b) pycocotools annToMask, serial",
        load_s,
        loop_s,
        min(limit, len(image_ids)),
        len(image_ids),
    )


# ---- (c) rayseg masks ----


@dataclass(frozen=True)
class RaysegRun:
    result: Result | None
    phase_images: int = 0
    phase_seconds: float = 0.0
    task_seconds: float = 0.0
    error: str = ""


def run_rayseg(path: Path, out: Path, rasterizer: str, python: str, num_images: int) -> RaysegRun:
    argv = [
        python,
        "-m",
        "rayseg",
        "masks",
        "--annotations",
        str(path),
        "--out",
        str(out),
        "--overwrite",
        "--rasterizer",
        rasterizer,
    ]
    m = measure(f"rayseg masks {rasterizer}", argv, cwd=REPO)
    if m.returncode != 0:
        return RaysegRun(None, error=f"exit {m.returncode}:\n{m.output_tail}")
    result = Result(
        f"(c) rayseg masks --rasterizer {rasterizer}",
        num_images,
        m.seconds,
        num_images,
        f"process start to exit; max RSS of one process {m.peak_rss_bytes / 1e9:.2f} GB",
    )
    images, phase_s, task_s = rendering_phase(out / "_shards")
    return RaysegRun(result, images, phase_s, task_s)


def rendering_phase(shards_dir: Path) -> tuple[int, float, float]:
    """(images, seconds from the first shard's start to the last one's end, summed task seconds).

    A shard record is written last, so its file time is the shard's end; its start is that minus
    the record's own `seconds`.
    """
    starts, ends, images, busy = [], [], 0, 0.0
    for record_path in shards_dir.glob("*.json"):
        try:
            record = json.loads(record_path.read_text())
            seconds, written = float(record["seconds"]), record["written"]
        except (ValueError, KeyError, TypeError):
            continue  # the plan file, or a record without timing
        end = record_path.stat().st_mtime
        starts.append(end - seconds)
        ends.append(end)
        images += len(written)
        busy += seconds
    if not ends:
        return 0, 0.0, 0.0
    return images, max(ends) - min(starts), busy


# ---- capacity: the pure path in one process ----


def capacity(path: Path, rasterizer: str, sample: int, repeats: int) -> tuple[float, str]:
    """Images/s of the pure per-image path of a render task, on an even sample of the file.

    rayseg.shard.render_image (annotation decode + rayseg.render.render_mask) then
    rayseg.storage.encode_png, as each task does per image, minus the file writes. One warm-up pass,
    then the fastest of `repeats` passes, since other processes share the cores.
    """
    try:
        from rayseg.coco import load_coco
        from rayseg.config import MasksConfig
        from rayseg.render import value_scheme
        from rayseg.shard import plan_jobs, render_image
        from rayseg.storage import encode_png
    except ImportError as e:
        return 0.0, f"skipped: the rayseg pure path is not importable yet ({e})"
    index = load_coco(str(path))
    cfg = MasksConfig(
        annotations=str(path),
        out=str(DATA_DIR / "unused"),
        rasterizer=rasterizer,
        shard_size=len(index.images) or 1,
    )
    scheme = value_scheme([c.id for c in index.categories], cfg.values)
    (job,) = plan_jobs(index, cfg, scheme)
    step = max(1, len(job.images) // sample)
    records = job.images[::step][:sample]
    passes = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        for rec in records:
            mask, _ = render_image(rec, job)
            encode_png(mask)
        passes.append(time.perf_counter() - start)
    best = min(passes[1:])
    return len(records) / best, f"{len(records)} sampled images, best of {repeats} warm passes"


def shard_capacity(path: Path, rasterizer: str, shards: int, repeats: int) -> tuple[float, str]:
    """Images/s of a render task's whole job in one process, no Ray: rayseg.shard.render_shard
    (decode, render, histogram, PNG encode and write, Parquet part, shard record) on the first
    `shards` shards of 200 images spread over the file, into a fresh temporary folder each pass.
    Fastest of `repeats` passes after a warm-up."""
    import tempfile

    from rayseg.coco import load_coco
    from rayseg.config import MasksConfig
    from rayseg.render import value_scheme
    from rayseg.shard import plan_jobs, render_shard

    index = load_coco(str(path))
    passes = []
    for _ in range(1 + repeats):
        # A fresh folder each pass, as `rayseg masks --overwrite` writes into.
        with tempfile.TemporaryDirectory(dir=DATA_DIR) as tmp:
            cfg = MasksConfig(annotations=str(path), out=tmp, rasterizer=rasterizer, shard_size=200)
            for sub in ("masks", "parquet", "_shards"):
                os.makedirs(os.path.join(tmp, sub))
            scheme = value_scheme([c.id for c in index.categories], cfg.values)
            jobs = plan_jobs(index, cfg, scheme)[:: max(1, len(index.images) // 200 // shards)]
            jobs = jobs[:shards]
            start = time.perf_counter()
            for job in jobs:
                render_shard(job)
            passes.append(time.perf_counter() - start)
    images = sum(len(j.images) for j in jobs)
    return images / min(passes[1:]), f"{images} images, best of {repeats} warm passes"


def cores() -> int:
    return len(os.sched_getaffinity(0))


# ---- report ----


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_report(
    path: Path,
    num_images: int,
    num_annotations: int,
    results: list[Result],
    runs: dict[str, RaysegRun],
    capacities: dict[str, tuple[float, str]],
) -> None:
    print(
        f"\nfile: {path} ({num_images:,} images, {num_annotations:,} annotations, "
        f"{path.stat().st_size / 1e6:.1f} MB); {cores()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"{'method':<40} {'images':>7} {'seconds':>9} {'images/s':>9}  note")
    for r in results:
        print(f"{r.label:<40} {r.images:>7} {r.seconds:>9.2f} {r.rate:>9.1f}  {r.note}")
    for rasterizer, run in runs.items():
        if run.result is None:
            print(f"{'(c) rayseg masks --rasterizer ' + rasterizer:<40} failed: {run.error}")
            continue
        r = run.result
        print(f"{r.label:<40} {r.images:>7} {r.seconds:>9.2f} {r.rate:>9.1f}  {r.note}")
    phase_rates = print_capacity(runs, capacities)
    print_ratios(results, runs, capacities, phase_rates)


def print_capacity(
    runs: dict[str, RaysegRun], capacities: dict[str, tuple[float, str]]
) -> dict[str, float]:
    """One process's capacity per rasterizer, and each run's rendering-phase rate (returned)."""
    print("\ncapacity (a render task's whole job, rayseg.shard.render_shard, in one process):")
    phase_rates: dict[str, float] = {}
    for rasterizer, (rate, note) in capacities.items():
        if rate <= 0:
            print(f"  {rasterizer}: {note}")
            continue
        print(
            f"  {rasterizer:<7} 1 process {rate:8.1f} images/s x {cores()} cores = "
            f"{rate * cores():8.1f} images/s ({note})"
        )
    for rasterizer, run in runs.items():
        if run.result is None or not run.phase_seconds:
            continue
        phase_rates[rasterizer] = run.phase_images / run.phase_seconds
        print(
            f"  (c) {rasterizer:<7} rendering phase: {run.phase_images} images in "
            f"{run.phase_seconds:.2f} s = {phase_rates[rasterizer]:.1f} images/s "
            f"(tasks busy {run.task_seconds:.1f} s in all)"
        )
    return phase_rates


def print_ratios(
    results: list[Result],
    runs: dict[str, RaysegRun],
    capacities: dict[str, tuple[float, str]],
    phase_rates: dict[str, float],
) -> None:
    print("\nratios:")
    base = next((r for r in results if r.label.startswith("(a)")), None)
    opencv, coco = runs.get("opencv"), runs.get("coco")
    if base and opencv and opencv.result:
        speedup = opencv.result.rate / base.rate
        print(
            f"  (c opencv) vs (a) PIL, end to end:   {speedup:7.1f}x   target >= "
            f"{TARGET_SPEEDUP:.0f}x    {verdict(speedup >= TARGET_SPEEDUP)}"
        )
    pyco = next((r for r in results if r.label.startswith("(b)")), None)
    if pyco and opencv and opencv.result:
        print(f"  (c opencv) vs (b) pycocotools:       {opencv.result.rate / pyco.rate:7.1f}x")
    if opencv and coco and opencv.result and coco.result:
        ratio = coco.result.rate / opencv.result.rate
        print(
            f"  coco / opencv throughput, end to end: {ratio:6.2f}    target >= "
            f"{TARGET_COCO_RATIO}    {verdict(ratio >= TARGET_COCO_RATIO)}"
        )
        if "opencv" in phase_rates and "coco" in phase_rates:
            print(
                f"  coco / opencv, rendering phase:       "
                f"{phase_rates['coco'] / phase_rates['opencv']:6.2f}"
            )
    for rasterizer, phase_rate in phase_rates.items():
        rate = capacities.get(rasterizer, (0.0, ""))[0]
        if rate > 0:
            share = phase_rate / (rate * cores())
            print(
                f"  (c {rasterizer}) rendering phase / capacity: {share:6.0%}    target >= "
                f"{TARGET_CAPACITY_SHARE:.0%}    {verdict(share >= TARGET_CAPACITY_SHARE)}"
            )


def quick_file() -> Path:
    path = DATA_DIR / f"instances_quick{QUICK_IMAGES}.json"
    if not path.exists():
        write_coco(path, num_images=QUICK_IMAGES, num_annotations=round(QUICK_IMAGES * 7.27))
    return path


class _Records(msgspec.Struct):
    images: list[msgspec.Raw]
    annotations: list[msgspec.Raw]


def count_records(path: Path) -> tuple[int, int]:
    counts = msgspec.json.decode(path.read_bytes(), type=_Records)
    return len(counts.images), len(counts.annotations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, help="default: make_coco.py's render preset")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES}-image smoke test")
    parser.add_argument(
        "--baseline-images",
        type=int,
        default=0,
        help="time (a) and (b) on this many images and extrapolate (0: all)",
    )
    parser.add_argument("--capacity-images", type=int, default=400)
    parser.add_argument("--capacity-repeats", type=int, default=3)
    parser.add_argument("--rasterizers", default="opencv,coco")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the written masks")
    parser.add_argument("--python", default=sys.executable, help="interpreter for rayseg")
    args = parser.parse_args(argv)

    path = args.annotations or (quick_file() if args.quick else ensure_preset("render"))
    num_images, num_annotations = count_records(path)
    limit = args.baseline_images or num_images
    rasterizers = [r for r in args.rasterizers.split(",") if r]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=DATA_DIR, prefix="render_bench_"))
    results: list[Result] = []
    runs: dict[str, RaysegRun] = {}
    capacities: dict[str, tuple[float, str]] = {}
    try:
        if not args.skip_baselines:
            for name, run in (("pil", run_pil), ("pycocotools", run_pycocotools)):
                print(f"running {name} baseline on {min(limit, num_images)} images ...", flush=True)
                (work / name).mkdir()
                results.append(run(path, work / name, limit))
        for rasterizer in rasterizers:
            print(f"running rayseg masks --rasterizer {rasterizer} ...", flush=True)
            runs[rasterizer] = run_rayseg(
                path, work / f"rayseg_{rasterizer}", rasterizer, args.python, num_images
            )
            print(f"measuring capacity ({rasterizer}) ...", flush=True)
            pure_rate, pure_note = capacity(
                path, rasterizer, args.capacity_images, args.capacity_repeats
            )
            print(f"  pure path: {pure_rate:.1f} images/s in one process ({pure_note})")
            # The target compares with the task's whole job (files and Parquet included).
            capacities[rasterizer] = shard_capacity(path, rasterizer, 8, args.capacity_repeats)
    finally:
        if args.keep:
            print(f"outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_report(path, num_images, num_annotations, results, runs, capacities)
    return 0 if all(r.result for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
