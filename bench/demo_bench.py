"""`rayseg demo` as a new user runs it (`make demo`): wall time, seconds per stage, mIoU.

    python bench/demo_bench.py                         # the shipped jobs/configs/demo.yaml
    python bench/demo_bench.py --config my_demo.yaml   # sections replacing the shipped ones

Runs the real command in a subprocess (a fresh Ray, as `make demo` does), then reads the
per-stage seconds the pipeline records in OUT/pipeline.json (metrics.stage_seconds). The load
average before and after is printed too: other work on the machine slows every stage. Target
(issue 12): under 300 s on a 2-core machine, held-out mIoU >= 0.6. Baseline before the issue:
678 s (11.3 min), mIoU 0.773.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = {"seconds": 678.0, "miou": 0.773}
TARGET_SECONDS = 300.0
MIN_MIOU = 0.6


def run_demo(out: Path, config: str | None) -> float:
    """Wall seconds of `rayseg demo --out OUT` (its own output goes to the terminal)."""
    command = [sys.executable, "-m", "rayseg", "demo", "--out", str(out)]
    if config:
        command += ["--config", config]
    start = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - start


def report(metrics: dict, wall: float, loads: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    lines = [f"{'stage':<10}{'seconds':>9}"]
    for name, seconds in metrics["stage_seconds"].items():
        lines.append(f"{name:<10}{seconds:>9.1f}")
    miou = metrics.get("miou") or float("nan")
    lines += [
        f"{'pipeline':<10}{metrics['seconds']:>9.1f}",
        f"{'wall':<10}{wall:>9.1f}  (target < {TARGET_SECONDS:.0f} s; "
        f"baseline {BASELINE['seconds']:.0f} s: x{BASELINE['seconds'] / wall:.2f})",
        f"mIoU {miou:.4f} on {metrics.get('evaluated_on')} (target >= {MIN_MIOU}; "
        f"baseline {BASELINE['miou']})",
        "load average before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
            *loads[0], *loads[1]
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", help="demo sections replacing the shipped ones")
    parser.add_argument("--out", help="output folder (default: a temporary one, removed)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="demo_bench_"))
    before = os.getloadavg()
    try:
        wall = run_demo(out, args.config)
        metrics = json.loads((out / "pipeline.json").read_text())["metrics"]
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    after = os.getloadavg()
    print(report(metrics, wall, (before, after)))
    if args.json:
        figures = {"wall_seconds": round(wall, 1), "load_before": before, "load_after": after}
        Path(args.json).write_text(json.dumps({**figures, **metrics}, indent=2) + "\n")


if __name__ == "__main__":
    main()
