"""Training throughput: a plain PyTorch loop vs `rayseg train` with 1 and N Ray Train workers.

    python bench/train_bench.py                              # LR-ASPP, 96 px crops, synthetic data
    python bench/train_bench.py --data OUT/masks --model deeplabv3_resnet50 --crop-size 480 \
        --batch-size 8 --workers 4 --use-gpu                  # on a GPU cluster
    python bench/train_bench.py --first-epoch-pairs 3 --json PATH     # the first epoch's wait

(a) plain: one process, the same decode + augment (rayseg.ingest) in a torch DataLoader with
    one loader process, the same model, optimizer, schedule and step (rayseg.loop.train_one_epoch).
(b) `rayseg train` (run_train) with 1 worker, (c) with --workers workers, on the same rows.
Equal compute: (a) uses as many torch threads as one Ray worker gets.

Per run, epochs after the first (warm-up) are summed: images/s over the training loop, and the
time blocked in the batch iterator as a share of it, in total and without each epoch's first
batch (each epoch's data tasks start anew: a fixed cost per epoch, the rest is the steady
state); for `rayseg train` also the first (warm-up) epoch's share of time waiting for data.
Targets: (b) within 10% of (a); data wait under 5% of step time.
--first-epoch-pairs N: only (b), N times without rayseg.prestart and N times with it, each run in
a Ray of its own: the first epoch's data wait against the later epochs' (issue 22).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rayseg import ingest  # noqa: E402
from rayseg.config import MasksConfig, SynthConfig, TrainConfig  # noqa: E402
from rayseg.loop import (  # noqa: E402
    EpochStats,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from rayseg.models import build_model, class_map_from_meta  # noqa: E402
from rayseg.split import split_ids  # noqa: E402

TARGET_OVERHEAD = 0.10
TARGET_WAIT = 0.05


def make_data(folder: Path, num_images: int, *, width: int = 160, height: int = 120) -> str:
    """Synthetic shapes rendered to masks with embedded images (cached per count and size)."""
    from rayseg.masks import run_masks
    from rayseg.synth import run_synth

    size = "" if (width, height) == (160, 120) else f"-{width}x{height}"
    masks = folder / f"masks-{num_images}{size}"
    if not (masks / "manifest.json").exists():
        synth = folder / f"synth-{num_images}{size}"
        run_synth(SynthConfig(out=str(synth), num_images=num_images, width=width, height=height))
        run_masks(
            MasksConfig(
                annotations=str(synth / "annotations.json"),
                out=str(masks),
                images_dir=str(synth / "images"),
                shard_size=max(1, num_images // 4),
            )
        )
    return str(masks)


class Rows(torch.utils.data.Dataset):
    """Encoded rows held in memory; each item decoded and augmented as in Ray Data's tasks."""

    def __init__(self, summary: ingest.DataSummary, ids: np.ndarray, lut: np.ndarray, crop: int):
        tables = [
            pq.read_table(p, filesystem=summary.location.fs, columns=["image_id", "image", "mask"])
            for p in summary.paths
        ]
        wanted = set(ids.tolist())
        rows = [r for t in tables for r in t.to_pylist() if r["image_id"] in wanted]
        self.rows, self.lut, self.crop = rows, lut, crop

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        r = self.rows[i]
        batch = {k: np.array([r[k]], dtype=object) for k in ("image", "mask")}
        batch["image_id"] = np.array([r["image_id"]])
        out = ingest.train_batch(batch, lut=self.lut, crop_size=self.crop)
        return {k: v[0] for k, v in out.items()}


def plain_loop(data: str, cfg: TrainConfig, threads: int, loader_workers: int) -> list[EpochStats]:
    """(a): the training step of rayseg.loop in one process, no Ray."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    summary = ingest.scan_data(data)
    class_map = class_map_from_meta(summary.meta, cfg.classes)
    train_ids, _ = split_ids(summary.image_ids, cfg.val_fraction, seed=cfg.seed)
    rows = Rows(summary, train_ids, class_map.train_lut(), cfg.crop_size)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=loader_workers,
        persistent_workers=True,
        prefetch_factor=4,
        pin_memory=cfg.use_gpu,
    )
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    amp = cfg.use_gpu and cfg.amp
    model = build_model(cfg.model, class_map.num_classes, aux_loss=cfg.aux_loss).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    steps = len(loader)
    scheduler = make_scheduler(optimizer, total_steps=cfg.epochs * steps, warmup_steps=0)

    def on_device(batches):
        for b in batches:
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}

    stats = []
    for _ in range(cfg.epochs):
        stats.append(
            train_one_epoch(model, on_device(loader), optimizer, scheduler, device=device, amp=amp)
        )
        if cfg.use_gpu:
            torch.cuda.synchronize()
        print(
            f"plain epoch: loss {stats[-1].loss_sum / stats[-1].steps:.4f}, "
            f"{stats[-1].images / stats[-1].seconds:.1f} images/s",
            flush=True,
        )
    return stats


def ray_run(cfg: TrainConfig, out: Path) -> list[dict[str, Any]]:
    """(b)/(c): `rayseg train`; the per-epoch numbers come from its metrics.jsonl."""
    from rayseg.train import run_train

    run_train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rates(images: float, seconds: float, wait: float, first_wait: float) -> dict[str, float]:
    steady = seconds - first_wait
    return {
        "images_per_s": images / seconds,
        "steady_images_per_s": images / steady,
        "data_wait": wait / seconds,
        "steady_data_wait": (wait - first_wait) / steady,
        "startup_s_per_epoch": first_wait,
    }


def summarize_plain(stats: list[EpochStats]) -> dict[str, float]:
    warm = stats[1:] or stats
    return rates(
        sum(s.images for s in warm),
        sum(s.seconds for s in warm),
        sum(s.wait_seconds for s in warm),
        sum(s.first_wait_seconds for s in warm),
    ) | {"epochs": len(warm)}


def summarize_ray(history: list[dict[str, Any]]) -> dict[str, float]:
    warm = history[1:] or history
    out = rates(
        sum(r["images"] for r in warm),
        sum(r["train_seconds"] for r in warm),
        sum(r["data_wait_seconds"] for r in warm),
        sum(r["data_wait_first_batch_seconds"] for r in warm),
    )
    out["startup_s_per_epoch"] /= len(warm)
    out["first_epoch_data_wait"] = history[0]["data_wait_fraction"]  # the warm-up epoch's
    return out | {"epochs": len(warm)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="masks output dir (default: synthetic, made once)")
    p.add_argument("--images", type=int, default=480, help="synthetic images when no --data")
    p.add_argument("--model", default="lraspp_mobilenet_v3_large")
    p.add_argument("--crop-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    p.add_argument("--workers", type=int, default=2, help="workers for (c)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--plain-only", action="store_true", help="only (a): no Ray needed")
    p.add_argument("--loader-workers", type=int, default=1, help="(a)'s DataLoader processes")
    p.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--first-epoch-pairs",
        type=int,
        metavar="N",
        help="instead: N pairs of 1-worker runs, each in a fresh Ray, without and with "
        "rayseg.prestart: the epochs' data waits",
    )
    args = p.parse_args()

    base = TrainConfig(
        data=args.data,
        out="",
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        use_gpu=args.use_gpu,
        max_failures=0,
        num_to_keep=1,
    )
    results: dict[str, Any] = {
        "model": args.model,
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if args.use_gpu else "cpu",
    }
    if args.plain_only:
        results |= {"cpus": os.cpu_count(), "torch_threads_per_worker": torch.get_num_threads()}
        results["a_plain"] = run_plain(base, torch.get_num_threads(), args.loader_workers)
        report(results, args.workers)
        write_json(args.json, results)
        return

    import ray

    from rayseg.rayconnect import connect_ray, stop_ray
    from rayseg.train import worker_resources

    connect_ray(None, args.num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = args.data or make_data(REPO / "bench" / "_data" / "train_bench", args.images)
    base = dataclasses.replace(base, data=data)
    if args.first_epoch_pairs:
        stop_ray()  # each run starts a Ray of its own
        results["first_epoch_pairs"] = first_epoch_pairs(
            base, args.first_epoch_pairs, args.num_cpus
        )
        write_json(args.json, results)
        return
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    threads = worker_resources(base, node_cpus)[1]
    results |= {"cpus": sum(node_cpus), "torch_threads_per_worker": threads}
    results["a_plain"] = run_plain(base, threads, args.loader_workers)
    with tempfile.TemporaryDirectory() as tmp:
        for key, workers in (
            ("b_ray_1_worker", 1),
            (f"c_ray_{args.workers}_workers", args.workers),
        ):
            out = Path(tmp) / key
            cfg = dataclasses.replace(base, out=str(out), num_workers=workers)
            start = time.monotonic()
            results[key] = summarize_ray(ray_run(cfg, out))
            results[key]["wall_s"] = time.monotonic() - start
    ray.shutdown()
    report(results, args.workers)
    write_json(args.json, results)


def first_epoch_pairs(cfg: TrainConfig, pairs: int, num_cpus: int | None) -> dict[str, Any]:
    """`rayseg train` with 1 worker, each run in a Ray of its own (so none finds the data
    processes of another): without rayseg.prestart (patched out), then with it, `pairs` times.
    Each run's per-epoch data wait; the first epoch's against the median of the later ones."""
    from unittest import mock

    from rayseg import train
    from rayseg.rayconnect import connect_ray, stop_ray

    runs: dict[str, list[list[float]]] = {"without_prestart": [], "with_prestart": []}
    for _ in range(pairs):
        for key in runs:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / key
                connect_ray(None, num_cpus, dashboard=True)  # as run_train would
                try:
                    with (
                        mock.patch.multiple(
                            train.prestart, start=lambda *_, **__: None, stop=lambda _: None
                        )
                        if key == "without_prestart"
                        else contextlib.nullcontext()
                    ):
                        history = ray_run(
                            dataclasses.replace(cfg, out=str(out), num_workers=1), out
                        )
                finally:
                    stop_ray()
            runs[key].append([round(r["data_wait_fraction"], 4) for r in history])
            print(f"{key}: data wait per epoch {runs[key][-1]}", flush=True)
    return {
        key: {
            "waits_per_epoch": waits,
            "first_over_later": [round(w[0] / float(np.median(w[1:])), 2) for w in waits],
        }
        for key, waits in runs.items()
    }


def run_plain(cfg: TrainConfig, threads: int, loader_workers: int) -> dict[str, float]:
    start = time.monotonic()
    out = summarize_plain(plain_loop(cfg.data, cfg, threads, loader_workers))
    return out | {"wall_s": time.monotonic() - start}


def write_json(path: str | None, results: dict[str, Any]) -> None:
    out_dir = os.environ.get("OUT")
    for target in [path, out_dir and os.path.join(out_dir, "train_bench.json")]:
        if target:
            Path(target).write_text(json.dumps(results, indent=1) + "\n")


def report(results: dict[str, Any], workers: int) -> None:
    print(
        f"\n{results['model']}, crop {results['crop_size']}, batch {results['batch_size']}, "
        f"{results['device']}, {results['cpus']:g} CPUs, "
        f"{results['torch_threads_per_worker']} torch threads/worker"
    )
    print(
        f"{'run':<22}{'images/s':>10}{'steady':>10}{'wait':>8}{'steady wait':>13}"
        f"{'start-up/epoch':>16}"
    )
    for key, r in results.items():
        if isinstance(r, dict):
            print(
                f"{key:<22}{r['images_per_s']:>10.1f}{r['steady_images_per_s']:>10.1f}"
                f"{r['data_wait']:>8.1%}{r['steady_data_wait']:>13.1%}"
                f"{r['startup_s_per_epoch']:>15.1f}s"
            )
    if "b_ray_1_worker" not in results:
        return
    a, b = results["a_plain"], results["b_ray_1_worker"]
    for label, key in (("steady state", "steady_images_per_s"), ("with start-up", "images_per_s")):
        overhead = 1 - b[key] / a[key]
        ok = "ok" if overhead <= TARGET_OVERHEAD else "over target"
        print(
            f"Ray Train overhead vs plain loop ({label}): {overhead:+.1%} "
            f"(target <= {TARGET_OVERHEAD:.0%}: {ok})"
        )
    c = results[f"c_ray_{workers}_workers"]
    print(
        f"scaling 1 -> {workers} workers: "
        f"{c['steady_images_per_s'] / b['steady_images_per_s']:.2f}x (steady state)"
    )
    worst = max(r["steady_data_wait"] for k, r in results.items() if k.startswith(("b_", "c_")))
    print(f"data wait, steady state: worst {worst:.1%} (target < {TARGET_WAIT:.0%})")


if __name__ == "__main__":
    main()
