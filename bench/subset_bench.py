"""Load-and-subset cost on a train2017-sized file: pycocotools, plain json, `rayseg subset`.

    python bench/subset_bench.py [--annotations FILE] [--num-images 8000] [--repeat 1]

Each method runs in its own fresh Python process, timed from process start to exit. Peak memory is
that child's own ru_maxrss, read with os.wait4 on its pid (RUSAGE_CHILDREN would report the
largest of all children so far, not this one). The file is read once first so every method starts
from a warm page cache. Without --annotations the train2017 preset of make_coco.py is used
(generated first if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from make_coco import DATA_DIR, ensure_preset

REPO = Path(__file__).resolve().parent.parent
TARGET_SPEEDUP = 5.0
TARGET_MEMORY_RATIO = 1.5


@dataclass(frozen=True)
class Measurement:
    label: str
    seconds: float
    cpu_seconds: float  # user + system: steadier than wall time when other work shares the cores
    peak_rss_bytes: int
    returncode: int
    output_tail: str


def measure(label: str, argv: list[str], *, cwd: Path) -> Measurement:
    """Run argv to completion; wall seconds and that child's own peak RSS."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped by wait4
        log.seek(0)
        tail = log.read()[-2000:].decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    rss = usage.ru_maxrss * 1024  # KiB on Linux
    return Measurement(label, seconds, cpu, rss, proc.returncode, tail)


def run_json(argv: list[str], what: str, **kwargs: Any) -> dict[str, Any]:
    """Run a benchmark's child process; its last stdout line starting with `{` is its result."""
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return json.loads(lines[-1])


def best_of(label: str, argv: list[str], *, cwd: Path, repeat: int) -> Measurement:
    runs = [measure(label, argv, cwd=cwd) for _ in range(repeat)]
    failed = [r for r in runs if r.returncode != 0]
    if failed:
        return failed[0]
    fastest = min(runs, key=lambda r: r.seconds)
    cpu = min(r.cpu_seconds for r in runs)
    rss = max(r.peak_rss_bytes for r in runs)
    return Measurement(label, fastest.seconds, cpu, rss, 0, fastest.output_tail)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def commands(
    python: str, path: Path, subset_out: Path, num_images: int
) -> list[tuple[str, list[str]]]:
    return [
        (
            "(i)   pycocotools COCO(path)",
            [
                python,
                "-c",
                "import sys; from pycocotools.coco import COCO; COCO(sys.argv[1])",
                str(path),
            ],
        ),
        (
            "(ii)  json.load(open(path))",
            [python, "-c", "import json, sys; json.load(open(sys.argv[1]))", str(path)],
        ),
        (
            f"(iii) rayseg subset --num-images {num_images}",
            [
                python,
                "-m",
                "rayseg",
                "subset",
                "--annotations",
                str(path),
                "--out",
                str(subset_out),
                "--num-images",
                str(num_images),
            ],
        ),
    ]


def verdict(value: float, target: float, *, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "PASS" if ok else "FAIL"


def print_table(path: Path, results: list[Measurement]) -> None:
    size = path.stat().st_size
    print(f"\nfile: {path} ({size / 1e6:.1f} MB); load average {os.getloadavg()[0]:.1f} at the end")
    print(
        f"{'method':<42} {'wall s':>8} {'CPU s':>7} {'peak RSS GB':>12} {'RSS / file':>11}  status"
    )
    for r in results:
        status = "ok" if r.returncode == 0 else f"exit {r.returncode}"
        print(
            f"{r.label:<42} {r.seconds:>8.2f} {r.cpu_seconds:>7.2f} "
            f"{r.peak_rss_bytes / 1e9:>12.2f} {r.peak_rss_bytes / size:>10.2f}x  {status}"
        )
    coco, plain, rayseg = results
    print()
    if rayseg.returncode != 0:
        print("rayseg subset failed; its output ends with:\n" + rayseg.output_tail)
        return
    speedup = coco.seconds / rayseg.seconds
    memory = rayseg.peak_rss_bytes / size
    print(
        f"speed-up (iii) vs (i) pycocotools: {speedup:6.1f}x   target >= {TARGET_SPEEDUP:.0f}x   "
        f"{verdict(speedup, TARGET_SPEEDUP, at_least=True)}"
    )
    print(f"speed-up (iii) vs (ii) json.load:  {plain.seconds / rayseg.seconds:6.1f}x")
    print(f"CPU-time ratio (i) / (iii):        {coco.cpu_seconds / rayseg.cpu_seconds:6.1f}x")
    print(
        f"peak memory (iii) / file size:     {memory:6.2f}x   target <= {TARGET_MEMORY_RATIO}x  "
        f"{verdict(memory, TARGET_MEMORY_RATIO, at_least=False)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, help="default: make_coco.py's train2017 preset")
    parser.add_argument("--num-images", type=int, default=8000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per method; the fastest is kept"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the children")
    args = parser.parse_args(argv)
    path = args.annotations or ensure_preset("train2017")
    warm_page_cache(path)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DATA_DIR, prefix="subset_bench_") as tmp:
        results = []
        for label, cmd in commands(args.python, path, Path(tmp) / "subset.json", args.num_images):
            print(f"running {label.split(maxsplit=1)[1]} ...", flush=True)
            results.append(best_of(label, cmd, cwd=REPO, repeat=args.repeat))
    print_table(path, results)
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
