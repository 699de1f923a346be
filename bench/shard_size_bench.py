"""`rayseg masks --shard-size`: auto (0) against fixed sizes, at both ends of input size (issue 12).

    python bench/shard_size_bench.py            # 160 and 8,000 images, ~3 min on 2 cores
    python bench/shard_size_bench.py --quick    # 160 and 1,000 images

Each run is `python -m rayseg masks --overwrite` as a subprocess, process start to exit (Ray
start-up included), best of --repeat rounds; each round runs every size, in a rotated order.
Small input: auto against the old default of 200 (one task: one core). Large input: auto
against small fixed shards (task overhead not amortised) and 500. Data: bench/make_coco.py
(COCO-shaped, 640x480). Writes bench/results/shard_size_bench.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from make_coco import DATA_DIR, write_coco
from subset_bench import measure

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "shard_size_bench.txt"


def ensure(num_images: int) -> Path:
    path = DATA_DIR / f"instances_shard{num_images}.json"
    if not path.exists():
        write_coco(path, num_images=num_images, num_annotations=round(num_images * 7.27))
    return path


def run_once(path: Path, out: str, shard_size: int) -> tuple[float, int]:
    argv = [sys.executable, "-m", "rayseg", "masks", "--annotations", str(path), "--out", out]
    argv += ["--shard-size", str(shard_size), "--overwrite"]
    result = measure(f"shard {shard_size}", argv, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"rayseg masks failed:\n{result.output_tail}")
    shards = len([n for n in os.listdir(Path(out) / "parquet") if n.endswith(".parquet")])
    return result.seconds, shards


def best_interleaved(path: Path, out: str, sizes: list[int], repeat: int) -> dict[int, tuple]:
    """size -> (best seconds, shards); each round runs every size, in a rotated order."""
    best: dict[int, tuple[float, int]] = {}
    for r in range(repeat):
        for size in sizes[r % len(sizes) :] + sizes[: r % len(sizes)]:
            seconds, shards = run_once(path, out, size)
            if size not in best or seconds < best[size][0]:
                best[size] = (seconds, shards)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    large = 1000 if args.quick else 8000
    cases = [(160, [0, 200]), (large, [0, 8, 500])]
    lines = [
        f"=== shard_size_bench{' quick' if args.quick else ''}: "
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')}; nproc {os.cpu_count()}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ===",
        f"{'images':>7} {'--shard-size':>12} {'shards':>6} {'seconds':>8} {'images/s':>9}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for num_images, sizes in cases:
            path = ensure(num_images)
            best = best_interleaved(path, f"{tmp}/out{num_images}", sizes, args.repeat)
            for size in sizes:
                seconds, shards = best[size]
                label = "0 (auto)" if size == 0 else str(size)
                lines.append(
                    f"{num_images:>7} {label:>12} {shards:>6} {seconds:>8.2f} "
                    f"{num_images / seconds:>9.1f}"
                )
                print(lines[-1], flush=True)
    lines.append(f"(process start to exit, best of {args.repeat}; Ray start-up included)")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
