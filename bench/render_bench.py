"""Mask rendering throughput (issue 10): the original script, pycocotools, the minimal pipeline and
`rayseg masks`, on 8,000 images and on a whole train2017-sized file.

    python bench/render_bench.py                # both parts, ~6 min on 2 quiet cores
    python bench/render_bench.py --parts 8k     # the 8,000-image comparison only, ~2.5 min
    python bench/render_bench.py --parts whole  # the whole train2017-sized file only, ~3.5 min
    python bench/render_bench.py --quick        # 500- and 3,000-image smoke test, < 1 min

Part 8k (make_coco.py --preset render: 8,000 images, 58,160 annotations), every method on all of it:
(a) the original: per annotation a PIL "L" image, ImageDraw.polygon with fill category_id*100 (it
    saturates at 255: the original bug), np.maximum into the mask, crowds skipped (it could not read
    RLE), PIL PNG save; serial, after json.load.
(b) pycocotools: COCO(file), annToMask per annotation, np.maximum of category_id*mask, cv2 PNG;
    serial.
(m) the minimal pipeline (bench/minimal.py render_minimal) in this process: one core's rate, the
    external baseline for what a core can do. Its masks' PNG-encode-only time is reported beside it,
    and (mN): N = all cores' render_minimal processes at once, each on every Nth image, into one
    folder: what this machine's cores and file system give a minimal pipeline (file creation in
    one folder does not always scale with cores).
(c) `python -m rayseg masks --overwrite` as a subprocess, process start to exit, per rasterizer.
Targets: (c opencv) >= 4x (a) end to end; (c coco) >= 0.5x (c opencv) end to end.

Part whole (make_coco.py --preset train2017: 118,287 images, 860,001 annotations): (m) on the
file's first 8,000 images, then (c opencv) on the whole file on all cores. Targets: (c) end to end
>= 90% of cores x (m)'s rate; the `rayseg masks` driver's peak RSS <= 1.5x the file.

The driver's peak is its own VmHWM, polled from /proc while it runs; beside it, the peak of its RSS
plus that of its non-Ray child processes (rayseg's parse child), sampled every 0.1 s. The Ray
processes (GCS, raylet, workers) are not counted. Each (c)'s rendering phase (first shard start
to last shard end) is read back from its shard records.
Results: printed, and each part's block replaced in bench/results/render_bench.txt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
from make_coco import DATA_DIR, ensure_preset, write_coco
from minimal import encode_only, group_by_image, render_masks, render_minimal

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_IMAGES = {"8k": 500, "whole": 3000}
MINIMAL_IMAGES = 8000  # the whole part's per-core baseline: the file's first 8,000 images
TARGET_SPEEDUP = 4.0  # (c opencv) vs (a), 8,000 images on 2 cores
TARGET_COCO_RATIO = 0.5
TARGET_MINIMAL_SHARE = 0.9  # whole file: (c) end to end / (cores x minimal)
TARGET_MEMORY_RATIO = 1.5  # whole file: driver peak RSS / file size


@dataclass(frozen=True)
class Result:
    label: str
    images: int  # images the rate stands for
    seconds: float  # end-to-end, extrapolated when measured < images
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def extrapolate(label: str, load_s: float, loop_s: float, measured: int, total: int) -> Result:
    seconds = load_s + loop_s / measured * total
    note = f"load {load_s:.1f} s"
    if measured < total:
        note += f"; loop timed on {measured} of {total} images, extrapolated per image"
    return Result(label, total, seconds, note)


# ---- machine info and the results file (shared by driver_bench and scale_bench) ----


def cores() -> int:
    return len(os.sched_getaffinity(0))


def machine_line() -> str:
    one, five, fifteen = os.getloadavg()
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; nproc {cores()}; "
        f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
    )


def write_results(name: str, key: str, text: str) -> Path:
    """Replace block `key` of bench/results/<name>.txt (other blocks are kept)."""
    path = RESULTS_DIR / f"{name}.txt"
    marker = f"=== {name} "
    blocks: dict[str, str] = {}
    if path.exists():
        current = None
        for line in path.read_text().splitlines(keepends=True):
            if line.startswith(marker):
                current = line[len(marker) :].split(":", 1)[0].strip()
                blocks[current] = ""
            if current is not None:
                blocks[current] += line
    blocks[key] = f"{marker}{key}: {machine_line()} ===\n{text.rstrip()}\n\n"
    RESULTS_DIR.mkdir(exist_ok=True)
    path.write_text("".join(blocks.values()))
    return path


# ---- the file: counts, and the first N images with their annotations as dicts ----


class _Records(msgspec.Struct):
    images: list[msgspec.Raw]
    annotations: list[msgspec.Raw]


class _AnnImage(msgspec.Struct):
    image_id: int


def count_records(path: Path) -> tuple[int, int]:
    counts = msgspec.json.decode(path.read_bytes(), type=_Records)
    return len(counts.images), len(counts.annotations)


def first_images(
    path: Path, limit: int
) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """The file's first `limit` image dicts and their annotation dicts (the rest stays raw)."""
    raw = msgspec.json.decode(path.read_bytes(), type=_Records)
    images = [msgspec.json.decode(r) for r in raw.images[:limit]]
    wanted = {im["id"] for im in images}
    head = msgspec.json.Decoder(_AnnImage)
    anns = [msgspec.json.decode(r) for r in raw.annotations if head.decode(r).image_id in wanted]
    return images, group_by_image({"annotations": anns})


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
        "(a) original: PIL, serial", load_s, loop_s, len(images), len(data["images"])
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
    measured = min(limit, len(image_ids))
    return extrapolate("(b) pycocotools, serial", load_s, loop_s, measured, len(image_ids))


# ---- (m) the minimal pipeline, one core ----


@dataclass(frozen=True)
class MinimalRate:
    images: int
    seconds: float  # best pass of render_minimal (fill, encode, write)
    encode_seconds: float  # PNG encoding alone of the same masks
    parallel_seconds: float  # best pass of cores() render_minimal processes at once, one folder

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def parallel_rate(self) -> float:
        return self.images / self.parallel_seconds


def measure_minimal(
    path: Path, work: Path, limit: int, repeats: int, *, processes: int | None = None
) -> MinimalRate:
    """render_minimal on the file's first `limit` images in this process: the best of `repeats`
    passes, each into a fresh folder; then the PNG-encode-only time of the same masks."""
    images, groups = first_images(path, limit)
    passes = []
    for k in range(repeats):
        out = work / f"minimal_{k}"
        start = time.perf_counter()
        render_minimal(images, groups, out)
        passes.append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
    parallel = []
    n = processes or cores()
    for k in range(repeats):
        out = work / f"minimal_all_{k}"
        start = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(n) as pool:
            pool.starmap(render_minimal, [(images[i::n], groups, out) for i in range(n)])
        parallel.append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
    encode = 0.0
    for s in range(0, len(images), 500):  # 500 masks at a time: 8,000 would be ~2.5 GB
        encode += encode_only(render_masks(images[s : s + 500], groups))
    return MinimalRate(len(images), min(passes), encode, min(parallel))


# ---- (c) rayseg masks ----


@dataclass(frozen=True)
class RaysegRun:
    rasterizer: str
    seconds: float = 0.0  # process start to exit
    driver_peak_bytes: int = 0  # the driver's own VmHWM
    tree_peak_bytes: int = 0  # the driver's RSS + its non-Ray children's (the parse child)
    phase_images: int = 0
    phase_seconds: float = 0.0
    task_seconds: float = 0.0
    error: str = ""


def status_field(pid: int, field: str) -> int:
    """A /proc/<pid>/status size in bytes (VmHWM, VmRSS); 0 once the process has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def non_ray_descendants(pid: int) -> list[int]:
    """pid's child processes, recursively, but not Ray's (gcs_server, raylet, workers, agents):
    those are the cluster's, not the driver's (e.g. rayseg's parse child is counted)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            for child in children:
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ")
                except OSError:
                    continue
                if b"/ray/" in cmdline or cmdline.startswith(b"ray::"):
                    continue
                found.append(child)
                todo.append(child)
    return found


class MemoryPoller:
    """Polls, every 0.1 s until stop(): the process's own peak (VmHWM) and the peak of its RSS
    plus its non-Ray descendants' RSS (sampled, so a spike shorter than 0.1 s can be missed)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.own_peak, self.tree_peak = pid, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(0.1):
            self.own_peak = max(self.own_peak, status_field(self.pid, "VmHWM"))
            tree = status_field(self.pid, "VmRSS")
            tree += sum(status_field(c, "VmRSS") for c in non_ray_descendants(self.pid))
            self.tree_peak = max(self.tree_peak, tree)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def run_driver(argv: list[str]) -> tuple[float, MemoryPoller, int, str]:
    """Run argv to its end: (seconds, its memory peaks, exit code, output tail)."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        memory = MemoryPoller(proc.pid)
        returncode = proc.wait()
        seconds = time.perf_counter() - start
        memory.stop()
        log.seek(0)
        tail = log.read()[-2000:].decode(errors="replace")
    return seconds, memory, returncode, tail


def run_rayseg(path: Path, out: Path, rasterizer: str, python: str) -> RaysegRun:
    argv = [python, "-m", "rayseg", "masks", "--annotations", str(path), "--out", str(out)]
    argv += ["--overwrite", "--rasterizer", rasterizer]
    seconds, memory, returncode, tail = run_driver(argv)
    if returncode != 0:
        return RaysegRun(rasterizer, error=f"exit {returncode}:\n{tail}")
    images, phase_s, task_s = rendering_phase(out / "_shards")
    return RaysegRun(
        rasterizer, seconds, memory.own_peak, memory.tree_peak, images, phase_s, task_s
    )


# rayseg's own start and stop (its stop ends Ray's autoscaler monitor first: 1 s less).
_BARE_RAY = "from rayseg import rayconnect as r; r.connect_ray(None, {cpus}); r.stop_ray()"


def ray_alone(python: str) -> float:
    """Seconds a process takes to start and stop embedded Ray as rayseg does, with no work."""
    start = time.perf_counter()
    subprocess.run([python, "-c", _BARE_RAY.format(cpus=cores())], check=True, capture_output=True)
    return time.perf_counter() - start


def rendering_phase(shards_dir: Path) -> tuple[int, float, float]:
    """(images, seconds from the first shard's start to the last one's end, summed task seconds).

    A shard record is written last, so its file time is the shard's end; its start is that minus
    the record's own `seconds`.
    """
    starts, ends, images, busy = [], [], 0, 0.0
    for record_path in shards_dir.glob("shard-*.json"):
        try:
            record = json.loads(record_path.read_text())
            seconds, written = float(record["seconds"]), record["written"]
        except (ValueError, KeyError, TypeError):
            continue  # a record without timing
        end = record_path.stat().st_mtime
        starts.append(end - seconds)
        ends.append(end)
        images += len(written)
        busy += seconds
    if not ends:
        return 0, 0.0, 0.0
    return images, max(ends) - min(starts), busy


# ---- report ----


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def file_line(path: Path, num_images: int, num_annotations: int) -> str:
    return (
        f"file: {path.name} ({num_images:,} images, {num_annotations:,} annotations, "
        f"{path.stat().st_size / 2**20:.1f} MiB)"
    )


def minimal_lines(m: MinimalRate) -> list[str]:
    return [
        f"{'(m) minimal pipeline, 1 core':<34} {m.images:>7} {m.seconds:>9.2f} {m.rate:>9.1f}  "
        f"best pass; x {cores()} cores = {m.rate * cores():.0f} images/s",
        f"{'    of which PNG encode only':<34} {m.images:>7} {m.encode_seconds:>9.2f} "
        f"{m.images / m.encode_seconds:>9.1f}  {m.encode_seconds / m.seconds:.0%} of (m)'s time",
        f"{f'(m{cores()}) minimal, {cores()} processes':<34} {m.images:>7} "
        f"{m.parallel_seconds:>9.2f} {m.parallel_rate:>9.1f}  best pass; all cores at once into "
        f"one folder: {m.parallel_rate / m.rate:.2f}x (m), what this machine gives {cores()} cores",
    ]


def rayseg_line(run: RaysegRun, images: int, file_bytes: int) -> list[str]:
    label = f"(c) rayseg masks {run.rasterizer}"
    if run.error:
        return [f"{label:<34} failed: {run.error}"]
    lines = [
        f"{label:<34} {images:>7} {run.seconds:>9.2f} {images / run.seconds:>9.1f}  process "
        f"start to exit; driver peak {run.driver_peak_bytes / 2**30:.2f} GiB = "
        f"{run.driver_peak_bytes / file_bytes:.2f}x the file, with its non-Ray children "
        f"{run.tree_peak_bytes / 2**30:.2f} GiB = {run.tree_peak_bytes / file_bytes:.2f}x"
    ]
    if run.phase_seconds:
        lines.append(
            f"{'    rendering phase':<34} {run.phase_images:>7} {run.phase_seconds:>9.2f} "
            f"{run.phase_images / run.phase_seconds:>9.1f}  first shard start to last end; "
            f"tasks busy {run.task_seconds:.1f} s in all"
        )
    return lines


def header() -> str:
    return f"{'method':<34} {'images':>7} {'seconds':>9} {'images/s':>9}  note"


def ratio_line(label: str, value: float, target: float | None, *, at_most: bool = False) -> str:
    text = f"  {label:<52} {value:7.2f}"
    if target is not None:
        ok = value <= target if at_most else value >= target
        text += f"   target {'<=' if at_most else '>='} {target:<4}  {verdict(ok)}"
    return text


def report_8k(
    path: Path,
    counts: tuple[int, int],
    baselines: list[Result],
    minimal: MinimalRate,
    runs: dict[str, RaysegRun],
    bare_ray: float,
) -> str:
    num_images, _ = counts
    size = path.stat().st_size
    lines = [file_line(path, *counts), header()]
    for r in baselines:
        lines.append(f"{r.label:<34} {r.images:>7} {r.seconds:>9.2f} {r.rate:>9.1f}  {r.note}")
    lines += minimal_lines(minimal)
    lines.append(
        f"{'(r) Ray start + stop alone':<34} {'':>7} {bare_ray:>9.2f} {'':>9}  process start to "
        "exit, embedded Ray as rayseg starts and stops it, no work"
    )
    for run in runs.values():
        lines += rayseg_line(run, num_images, size)
    lines.append("ratios:")
    ok = {k: r for k, r in runs.items() if not r.error}
    rate = {k: num_images / r.seconds for k, r in ok.items()}
    capacity = minimal.rate * cores()
    original = next((r for r in baselines if r.label.startswith("(a)")), None)
    if original and "opencv" in ok:
        value = rate["opencv"] / original.rate
        lines.append(ratio_line("(c opencv) / (a) original, end to end", value, TARGET_SPEEDUP))
        # What any pipeline on these cores gets: the minimal one on all of them, with no Ray.
        ceiling = original.seconds / (num_images / minimal.parallel_rate)
        lines.append(ratio_line(f"  ceiling: (a) / (m{cores()}), no Ray at all", ceiling, None))
    pyco = next((r for r in baselines if r.label.startswith("(b)")), None)
    if pyco and "opencv" in ok:
        lines.append(
            ratio_line("(c opencv) / (b) pycocotools, end to end", rate["opencv"] / pyco.rate, None)
        )
    if "opencv" in ok and "coco" in ok:
        value = rate["coco"] / rate["opencv"]
        lines.append(ratio_line("(c coco) / (c opencv), end to end", value, TARGET_COCO_RATIO))
    for k, r in ok.items():
        lines.append(
            ratio_line(f"(c {k}) end to end / ({cores()} cores x (m))", rate[k] / capacity, None)
        )
        if r.phase_seconds:
            phase = r.phase_images / r.phase_seconds / capacity
            lines.append(
                ratio_line(f"(c {k}) rendering phase / ({cores()} cores x (m))", phase, None)
            )
        lines.append(
            ratio_line(f"(c {k}) end to end / (m{cores()})", rate[k] / minimal.parallel_rate, None)
        )
    return "\n".join(lines)


def report_whole(path: Path, counts: tuple[int, int], minimal: MinimalRate, run: RaysegRun) -> str:
    num_images, _ = counts
    size = path.stat().st_size
    lines = [file_line(path, *counts), header()]
    lines += minimal_lines(minimal)
    lines += rayseg_line(run, num_images, size)
    if run.error:
        return "\n".join(lines)
    capacity = minimal.rate * cores()
    share = num_images / run.seconds / capacity
    lines.append("ratios:")
    lines.append(
        ratio_line(f"(c) end to end / ({cores()} cores x (m))", share, TARGET_MINIMAL_SHARE)
    )
    if run.phase_seconds:
        phase = run.phase_images / run.phase_seconds / capacity
        lines.append(ratio_line(f"(c) rendering phase / ({cores()} cores x (m))", phase, None))
    parallel = num_images / run.seconds / minimal.parallel_rate
    lines.append(
        ratio_line(f"(c) end to end / (m{cores()}), the same run's hardware", parallel, None)
    )
    for label, peak in (
        ("driver process peak RSS / file size", run.driver_peak_bytes),
        ("driver + its non-Ray children, peak RSS / file size", run.tree_peak_bytes),
    ):
        lines.append(ratio_line(label, peak / size, TARGET_MEMORY_RATIO, at_most=True))
    return "\n".join(lines)


# ---- the two parts ----


def quick_file(num_images: int) -> Path:
    path = DATA_DIR / f"instances_quick{num_images}.json"
    if not path.exists():
        write_coco(path, num_images=num_images, num_annotations=round(num_images * 7.27))
    return path


def part_8k(path: Path, work: Path, args: argparse.Namespace) -> str:
    counts = count_records(path)
    limit = args.baseline_images or counts[0]
    baselines: list[Result] = []
    if not args.skip_baselines:
        for name, run in (("pil", run_pil), ("pycocotools", run_pycocotools)):
            print(f"  {name} baseline on {min(limit, counts[0])} images ...", flush=True)
            (work / name).mkdir()
            baselines.append(run(path, work / name, limit))
            shutil.rmtree(work / name)
    print(f"  minimal pipeline on {counts[0]} images ...", flush=True)
    minimal = measure_minimal(path, work, counts[0], args.minimal_repeats)
    print("  Ray start and stop alone ...", flush=True)
    bare = min(ray_alone(args.python) for _ in range(2))
    runs = {}
    for rasterizer in [r for r in args.rasterizers.split(",") if r]:
        print(f"  rayseg masks --rasterizer {rasterizer} ...", flush=True)
        out = work / f"rayseg_{rasterizer}"
        runs[rasterizer] = run_rayseg(path, out, rasterizer, args.python)
    return report_8k(path, counts, baselines, minimal, runs, bare)


def part_whole(path: Path, work: Path, args: argparse.Namespace) -> str:
    counts = count_records(path)
    limit = min(MINIMAL_IMAGES if not args.quick else 1000, counts[0])
    print(f"  minimal pipeline on the first {limit} images ...", flush=True)
    minimal = measure_minimal(path, work, limit, args.minimal_repeats)
    print(f"  rayseg masks on all {counts[0]} images ...", flush=True)
    out = work / "rayseg_whole"
    run = run_rayseg(path, out, "opencv", args.python)
    return report_whole(path, counts, minimal, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="8k,whole", help="8k, whole or both (default)")
    parser.add_argument("--quick", action="store_true", help="small files: a smoke test")
    parser.add_argument("--annotations", type=Path, help="part 8k's file (default: render preset)")
    parser.add_argument("--whole-annotations", type=Path, help="default: the train2017 preset")
    parser.add_argument(
        "--baseline-images", type=int, default=0, help="time (a), (b) on this many (0: all)"
    )
    parser.add_argument("--minimal-repeats", type=int, default=2)
    parser.add_argument("--rasterizers", default="opencv,coco", help="part 8k's (c) runs")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the written masks")
    parser.add_argument("--python", default=sys.executable, help="interpreter for rayseg")
    args = parser.parse_args(argv)

    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - {"8k", "whole"}:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from 8k, whole")
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    failed = False
    for part in parts:
        if args.quick:
            path = quick_file(QUICK_IMAGES[part])
        elif part == "8k":
            path = args.annotations or ensure_preset("render")
        else:
            path = args.whole_annotations or ensure_preset("train2017")
        print(f"part {part}: {path}", flush=True)
        work = Path(tempfile.mkdtemp(dir=DATA_DIR, prefix="render_bench_"))
        try:
            text = (part_8k if part == "8k" else part_whole)(path, work, args)
        finally:
            if args.keep:
                print(f"outputs kept in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        key = f"{part} (quick)" if args.quick else part
        written = write_results("render_bench", key, text)
        print(f"\n{text}\n(written to {written})\n")
        failed |= "failed:" in text
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
