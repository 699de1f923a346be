"""Does each of the apart parse's two speed-ups earn its place end to end? (issue 25)

    python bench/parse_bench.py [--annotations FILE] [--rounds 3] [--json bench/results/X.json]

The apart parse (rayseg.coco_apart, the `rayseg masks` driver's) has two optional speed-ups:
- offsets: a run's record offsets by arithmetic from the first gap (run_offsets), instead of
  searching for each record (search_offsets);
- sha1 thread: the file's sha1 taken in a thread beside the scan, instead of inline.
Each variant switches one off. Measured, each in a fresh process, rounds interleaved (every
variant once per round, the order rotated each round) so machine noise falls on all alike:
- parse: load_coco_apart alone (its child process and the index handed back), wall seconds;
- masks: `rayseg masks` from process start to exit (the CLI's own path: the parse in a child
  while Ray starts), with render_shard a no-op returning its record (the rendering is the same
  in every variant and would drown the parse's share in noise), wall seconds.
Best of the rounds per variant, and each variant's ratio to "both". A speed-up that gains less
than 5% end to end is not worth its code. Without --annotations the train2017 preset of
make_coco.py (118,287 images, 860,001 annotations, ~450 MB) is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VARIANTS = ("both", "no offsets", "no sha1 thread")


class InlineSha1:
    """The sha1 thread's interface, hashing in the caller's thread."""

    def __init__(self) -> None:
        self.sha = hashlib.sha1()

    def update(self, data: memoryview) -> None:
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def apply_variant(variant: str) -> None:
    """Switch one speed-up off in this process (and, through the child's code, in the parse
    child load_coco_apart starts)."""
    from rayseg import coco_apart

    if variant == "no offsets":
        coco_apart.run_offsets = coco_apart.search_offsets
    elif variant == "no sha1 thread":
        coco_apart.Sha1Thread = InlineSha1
    elif variant != "both":
        raise SystemExit(f"unknown variant {variant!r}")
    prefix = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import parse_bench; "
    switch = f"parse_bench.apply_variant({variant!r}); "
    coco_apart.CHILD_CODE = prefix + switch + coco_apart.CHILD_CODE


def parse_child(path: str, variant: str) -> dict[str, Any]:
    apply_variant(variant)
    from rayseg.coco_apart import load_coco_apart

    start = time.perf_counter()
    index = load_coco_apart(path)
    return {"seconds": time.perf_counter() - start, "digest": index.digest}


def masks_child(path: str, variant: str, out: str) -> dict[str, Any]:
    import cloudpickle
    import driver_bench

    import rayseg.masks
    import rayseg.shard
    from rayseg.cli import main

    apply_variant(variant)
    cloudpickle.register_pickle_by_value(driver_bench)  # Ray's workers cannot import bench/
    rayseg.shard.render_shard = driver_bench.noop_shard
    rayseg.masks.render_shard = driver_bench.noop_shard
    code = main(["masks", "--annotations", path, "--out", out, "--overwrite"])
    manifest = json.loads(Path(out, "manifest.json").read_text())
    return {"exit": code, "images": manifest["counts"]["images_valid"]}


def timed_child(argv: list[str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds from the child's start to its exit, and its last JSON line."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{argv} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, json.loads(lines[-1])


def measure(path: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {v: {"parse": [], "masks": []} for v in VARIANTS}
    digests = set()
    with tempfile.TemporaryDirectory(prefix="parse_bench_") as out:
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                me = [sys.executable, __file__, "--variant", variant, str(path)]
                _, parsed = timed_child([*me, "--stage", "parse"])
                times[variant]["parse"].append(parsed["seconds"])
                digests.add(parsed["digest"])
                seconds, _ = timed_child([*me, "--stage", "masks", "--out", out])
                times[variant]["masks"].append(seconds)
                print(
                    f"  round {r + 1} {variant:>15}: parse {parsed['seconds']:6.2f} s, "
                    f"masks {seconds:6.2f} s",
                    flush=True,
                )
    if len(digests) != 1:
        raise SystemExit(f"the variants disagree on the file's sha1: {digests}")
    return times


def report(path: Path, times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    best = {v: {stage: min(ts) for stage, ts in st.items()} for v, st in times.items()}
    rows = {}
    for variant in VARIANTS:
        rows[variant] = {
            "runs": times[variant],
            "best": best[variant],
            "ratio_to_both": {s: best[variant][s] / best["both"][s] for s in ("parse", "masks")},
        }
    print(f"{'variant':>15} {'parse s':>8} {'x both':>7} {'masks s':>8} {'x both':>7}")
    for variant, row in rows.items():
        b, q = row["best"], row["ratio_to_both"]
        print(
            f"{variant:>15} {b['parse']:>8.2f} {q['parse']:>6.3f}x "
            f"{b['masks']:>8.2f} {q['masks']:>6.3f}x"
        )
    return {
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "nproc": os.cpu_count(),
        "load_average": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "variants": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("annotations", nargs="?", help="COCO file (default: train2017 preset)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=("parse", "masks"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "parse":
        print(json.dumps(parse_child(args.annotations, args.variant)))
        return
    if args.stage == "masks":
        print(json.dumps(masks_child(args.annotations, args.variant, args.out)))
        return
    from make_coco import ensure_preset

    path = Path(args.annotations) if args.annotations else ensure_preset("train2017")
    print(f"parse_bench: {path.name}, {path.stat().st_size / 2**20:.0f} MiB, {args.rounds} rounds")
    result = report(path, measure(path, args.rounds))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
