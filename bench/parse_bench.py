"""Does each of the apart parse's two speed-ups earn its place end to end? (issue 25)

    python bench/parse_bench.py [FILE] [--rounds 3] [--json bench/results/parse_bench.json]

The apart parse (rayseg.coco_apart, the `rayseg masks` driver's) had two speed-ups:
- offsets: a run's record offsets by arithmetic from the first gap (run_offsets), instead of
  searching for each record (search_offsets): kept;
- sha1 thread: the file's sha1 taken in a thread beside the scan (Sha1Thread here), instead of
  inline: dropped, it gained nothing end to end on the train2017-sized file, and can gain at
  most the hash itself, 0.25 CPU s of its ~3 CPU s parse (issue 25:
  bench/results/parse_bench_run1.json has the figures with it in; parse_bench.json without).
Variants: "as shipped"; "no offsets" (search_offsets only); "sha1 thread" (the thread put back).
Measured, each in a fresh process, rounds interleaved (every variant once per round, the order
rotated each round) so machine noise falls on all alike:
- parse: load_coco_apart alone (its child process and the index handed back), wall seconds in
  the process, and that process's CPU seconds with its children's;
- masks: `rayseg masks` from process start to exit (the CLI's own path: the parse in a child
  while Ray starts), with render_shard a no-op returning its record (the rendering is the same
  in every variant and would drown the parse's share in noise), wall seconds and CPU seconds
  (the process and its waited-for children: the parse child, the Ray it started and stopped).
Best of the rounds per variant per measure, and each variant's ratio to "as shipped". A speed-up
that gains less than 5% end to end is not worth its code. Without --annotations the train2017
preset of make_coco.py (118,287 images, 860,001 annotations, ~450 MB) is used.
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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VARIANTS = ("as shipped", "no offsets", "sha1 thread")


class Sha1Thread:
    """sha1 of the bytes handed over, in order, taken in a thread beside the parse (hashlib
    lets go of the GIL); one block waits while the one before it is hashed."""

    def __init__(self) -> None:
        self.sha = hashlib.sha1()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rayseg-sha1")
        self.pending: Future[None] | None = None

    def update(self, data: memoryview) -> None:
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self.sha.update, data)

    def hexdigest(self) -> str:
        self.pool.shutdown()
        return self.sha.hexdigest()


def apply_variant(variant: str) -> None:
    """Switch one speed-up off or on in this process (and, through the child's code, in the parse
    child load_coco_apart starts)."""
    from rayseg import coco_apart

    if variant == "no offsets":
        coco_apart.run_offsets = coco_apart.search_offsets
    elif variant == "sha1 thread":
        coco_apart.BlockScanner.HASH = Sha1Thread
    elif variant != "as shipped":
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
    import driver_bench
    from ray import cloudpickle

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


def timed_child(argv: list[str]) -> tuple[float, float, dict[str, Any]]:
    """Wall seconds from the child's start to its exit, its CPU seconds (user + system, its
    own and its waited-for children's: the parse child, Ray's processes it stopped; steadier
    than wall time on a shared machine), and its last JSON line."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if code != 0 or not lines:
        raise SystemExit(f"{argv} failed (exit {code}):\n{stderr[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, json.loads(lines[-1])


STAGES = ("parse", "parse_cpu", "masks", "masks_cpu")


def measure(
    path: Path, rounds: int, variants: tuple[str, ...], *, masks: bool
) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {v: {s: [] for s in STAGES} for v in variants}
    digests = set()
    with tempfile.TemporaryDirectory(prefix="parse_bench_") as out:
        for r in range(rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                me = [sys.executable, __file__, "--variant", variant, str(path)]
                _, parse_cpu, parsed = timed_child([*me, "--stage", "parse"])
                digests.add(parsed["digest"])
                seconds = cpu = float("nan")
                if masks:
                    seconds, cpu, _ = timed_child([*me, "--stage", "masks", "--out", out])
                run = (parsed["seconds"], parse_cpu, seconds, cpu)
                for stage, value in zip(STAGES, run, strict=True):
                    times[variant][stage].append(value)
                print(
                    f"  round {r + 1} {variant:>15}: parse {run[0]:6.2f} s ({run[1]:6.2f} CPU s)"
                    f", masks {run[2]:6.2f} s ({run[3]:6.2f} CPU s)",
                    flush=True,
                )
    if len(digests) != 1:
        raise SystemExit(f"the variants disagree on the file's sha1: {digests}")
    return times


def report(path: Path, times: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    measured = [s for s in STAGES if all(x == x for x in times["as shipped"][s])]  # not NaN
    times = {v: {s: st[s] for s in measured} for v, st in times.items()}
    best = {v: {stage: min(ts) for stage, ts in st.items()} for v, st in times.items()}
    rows = {}
    for variant in times:
        rows[variant] = {
            "runs": times[variant],
            "best": best[variant],
            "ratio_to_shipped": {s: best[variant][s] / best["as shipped"][s] for s in measured},
        }
    print(f"{'variant':>15}" + "".join(f" {s + ' s':>12} {'x shipped':>9}" for s in measured))
    for variant, row in rows.items():
        b, q = row["best"], row["ratio_to_shipped"]
        print(f"{variant:>15}" + "".join(f" {b[s]:>12.2f} {q[s]:>8.3f}x" for s in measured))
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
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, 'as shipped' first"
    )
    parser.add_argument("--parse-only", action="store_true", help="skip the masks runs")
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
    variants = tuple(args.variants.split(","))
    result = report(path, measure(path, args.rounds, variants, masks=not args.parse_only))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
