"""Training: data-parallel training of a torchvision segmentation model with Ray Train (V2).

run_train(cfg) runs on the driver: it checks data, classes, crop, storage and any earlier run in
`--out` before a worker starts, builds the Ray Data datasets (rayseg.ingest), runs TorchTrainer,
and exports RUN/model.pt (rayseg.models.save_model format). train_loop_per_worker runs on each
worker: plain PyTorch (train_one_epoch, evaluate) around a few marked Ray Train calls.

Run directory (local or s3://): model.pt, metrics.jsonl (one line per epoch), curves.png,
config.yaml, split.json, summary.json, and Ray Train's epoch_NNNN/ checkpoints (checkpoint.pt +
checkpoint.json). Running the same command again with more epochs resumes from the latest one.
"""

from __future__ import annotations

import io as pyio
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rayseg import ingest, storage
from rayseg import metrics as M
from rayseg.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_PREFIX,
    EXPORT_NAME,
    latest_checkpoint_dir,
    model_record,
    read_record,
    to_bytes,
    unwrap,
)
from rayseg.config import TrainConfig, dump_yaml, to_dict
from rayseg.errors import RaysegError
from rayseg.models import (
    MODEL_BUILDERS,
    ClassMap,
    build_model,
    class_map_from_meta,
    forward_logits,
    normalize,
)
from rayseg.records import TRAIN_IGNORE

CHECKPOINT_INFO = "checkpoint.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
AUX_WEIGHT = 0.5  # torchvision's recipe weighs the auxiliary head's loss by 0.5
AUX_LR_SCALE = 10.0  # ... and trains it with 10x the base learning rate
POLY_POWER = 0.9
WARMUP_START = 0.01
PREFETCH_BATCHES = 2
SKIPPED_LISTED = 1000  # per epoch record; the count is always exact


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs, decided on the driver."""

    cfg: TrainConfig
    class_map: ClassMap
    run_uri: str
    steps_per_epoch: int
    threads: int
    num_train: int
    num_val: int


@dataclass
class EpochStats:
    """One worker's sums for one epoch; sum_across_workers makes them global."""

    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    first_wait_seconds: float = 0.0  # the pipeline's start-up, included in wait_seconds
    problems: dict[int, int] = field(default_factory=dict)  # image id -> ingest.PROBLEMS code


# ---- pure pieces ----------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Poly decay (1 - step/total)^0.9 per iteration, after an optional linear warmup."""
    poly = (1.0 - min(step, total_steps) / max(total_steps, 1)) ** POLY_POWER
    if step < warmup_steps:
        alpha = step / warmup_steps
        return poly * (WARMUP_START * (1.0 - alpha) + alpha)
    return poly


def pixel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels; 0 (not NaN) when every pixel is ignored."""
    total = F.cross_entropy(logits.float(), target, ignore_index=TRAIN_IGNORE, reduction="sum")
    return total / (target != TRAIN_IGNORE).sum().clamp(min=1)


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """torchvision's criterion: loss("out") + 0.5 * loss("aux") where there is an aux head."""
    loss = pixel_loss(outputs["out"], target)
    if "aux" in outputs:
        loss = loss + AUX_WEIGHT * pixel_loss(outputs["aux"], target)
    return loss


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Backbone + head at `lr`; the auxiliary head at 10x, as torchvision's recipe."""
    aux = getattr(model, "aux_classifier", None)
    aux_ids = {id(p) for p in aux.parameters()} if aux is not None else set()
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in aux_ids]
    groups: list[dict[str, Any]] = [{"params": main}]
    if aux_ids:
        aux_params = [p for p in aux.parameters() if p.requires_grad]
        groups.append({"params": aux_params, "lr": lr * AUX_LR_SCALE})
    return groups


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps)
    )


def epoch_record(
    epoch: int,
    stats: EpochStats,
    conf: np.ndarray,
    *,
    class_map: ClassMap,
    lr: float,
    val_seconds: float,
    val_problems: dict[int, int],
    world_size: int,
) -> dict[str, Any]:
    """One metrics.jsonl line: global (all-worker) numbers for one epoch."""
    scores = M.summarize(conf, class_map.names)
    problems = {**stats.problems, **val_problems}
    return {
        "epoch": epoch,
        "loss": stats.loss_sum / max(stats.steps, 1),
        "lr": lr,
        "val_miou": scores["miou"],
        "val_pixel_accuracy": scores["pixel_accuracy"],
        "val_iou": scores["iou"],
        "images_per_s": stats.images / max(stats.seconds, 1e-9),
        "train_seconds": stats.seconds,
        "val_seconds": val_seconds,
        "data_wait_seconds": stats.wait_seconds,
        "data_wait_fraction": stats.wait_seconds / max(stats.seconds, 1e-9),
        "data_wait_first_batch_seconds": stats.first_wait_seconds,
        "steps": stats.steps,
        "images": stats.images,
        "world_size": world_size,
        "skipped_rows": len(problems),
        "skipped": [
            {"image_id": i, "reason": ingest.PROBLEMS[c]}
            for i, c in sorted(problems.items())[:SKIPPED_LISTED]
        ],
    }


def epoch_line(rec: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {rec['epoch']}/{epochs}  loss {rec['loss']:.4f}  val mIoU {rec['val_miou']:.4f}  "
        f"pixel acc {rec['val_pixel_accuracy']:.4f}  {rec['images_per_s']:.1f} images/s  "
        f"data wait {rec['data_wait_fraction']:.1%}"
    )


def plot_curves(history: list[dict[str, Any]]) -> bytes:
    """PNG of training loss and validation mIoU per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_miou.plot(epochs, [r["val_miou"] for r in history], marker="o", color="tab:green")
    ax_miou.set(xlabel="epoch", ylabel="mIoU", title="validation mIoU", ylim=(0, 1))
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = pyio.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def read_history(run: storage.Location, *, upto_epoch: int) -> list[dict[str, Any]]:
    """metrics.jsonl lines of epochs <= upto_epoch (later ones belong to a lost attempt)."""
    loc = run.join(METRICS_NAME)
    if not storage.exists(loc):
        return []
    lines = storage.read_bytes(loc).decode().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def write_history(run: storage.Location, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in history)
    storage.write_bytes(run.join(METRICS_NAME), text.encode())
    storage.write_bytes(run.join(CURVES_NAME), plot_curves(history))


# ---- one epoch (plain PyTorch) -------------------------------------------------------------


def timed(batches: Iterable[dict[str, torch.Tensor]], stats: EpochStats) -> Iterator:
    """Yield batches, adding the time spent blocked on the iterator to stats.wait_seconds."""
    it = iter(batches)
    first = True
    while True:
        start = time.perf_counter()
        batch = next(it, None)
        waited = time.perf_counter() - start
        stats.wait_seconds += waited
        if first:
            stats.first_wait_seconds, first = waited, False
        if batch is None:
            return
        yield batch


class Prefetched:
    """Iterates `batches`, with the first batch already being fetched in a background thread.

    Ray Data starts a new execution for every epoch (seconds of task start-up); starting the
    next epoch's first batch before validation hides that start-up behind validation.
    """

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        self._it = iter(batches)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._first = self._pool.submit(next, self._it, None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        first = self._first.result()
        self._pool.shutdown()
        if first is None:
            return
        yield first
        yield from self._it


def note_problems(batch: dict[str, torch.Tensor], problems: dict[int, int]) -> None:
    bad = torch.nonzero(batch["problem"]).flatten().tolist()
    for i in bad:
        problems[int(batch["image_id"][i])] = int(batch["problem"][i])


def model_input(batch: dict[str, torch.Tensor], *, channels_last: bool) -> torch.Tensor:
    images = normalize(batch["image"])  # (B, H, W, 3) uint8 -> (B, 3, H, W) float
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    amp: bool,
) -> EpochStats:
    """One pass over this worker's batches; per-iteration LR steps. Returns local sums."""
    model.train()
    stats = EpochStats()
    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    for batch in timed(batches, stats):
        note_problems(batch, stats.problems)
        images = model_input(batch, channels_last=amp)
        target = batch["mask"].long()  # (B, H, W), 255 = ignore
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = segmentation_loss(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        stats.steps += 1
        stats.images += len(target)
    stats.loss_sum = float(loss_sum)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    num_classes: int,
    device: torch.device,
    amp: bool,
) -> tuple[torch.Tensor, dict[int, int]]:
    """(K, K) confusion matrix of this worker's validation batches, and rows that failed."""
    model.eval()
    conf = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    problems: dict[int, int] = {}
    for batch in batches:
        note_problems(batch, problems)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward_logits(model, model_input(batch, channels_last=amp))
        conf += M.confusion_matrix(logits.argmax(1), batch["mask"], num_classes)
    model.train()
    return conf, problems


# ---- across workers --------------------------------------------------------------------------


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_workers(
    stats: EpochStats, conf: torch.Tensor, val_problems: dict[int, int], val_seconds: float
) -> tuple[EpochStats, np.ndarray, dict[int, int], float]:
    """Global stats: sums of counts, the slowest worker's times, every worker's problems."""
    if not distributed():
        return stats, conf.cpu().numpy(), val_problems, val_seconds
    counts = torch.tensor(
        [stats.loss_sum, stats.steps, stats.images, stats.wait_seconds, stats.first_wait_seconds],
        dtype=torch.float64,
    )
    times = torch.tensor([stats.seconds, val_seconds], dtype=torch.float64)
    conf = conf.cpu()
    for t in (counts, conf):
        dist.all_reduce(t)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (stats.problems, val_problems))
    world = dist.get_world_size()
    merged = EpochStats(
        loss_sum=float(counts[0]) / world,  # mean over workers of per-worker loss sums
        steps=int(counts[1]) // world,
        images=int(counts[2]),
        seconds=float(times[0]),
        wait_seconds=float(counts[3]) / world,
        first_wait_seconds=float(counts[4]) / world,
        problems={k: v for train_p, _ in gathered for k, v in train_p.items()},
    )
    val_all = {k: v for _, val_p in gathered for k, v in val_p.items()}
    return merged, conf.numpy(), val_all, float(times[1])


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoint_header(name: str, class_map: ClassMap, epoch: int) -> dict[str, Any]:
    return {"model": name, "class_map": class_map.to_dict(), "epoch": epoch}


def write_checkpoint(
    folder: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    plan: Plan,
    epoch: int,
    record: dict[str, Any],
) -> None:
    """checkpoint.pt (the export record + training state) and a small checkpoint.json header."""
    cfg = plan.cfg
    state = model_record(model, name=cfg.model, class_map=plan.class_map, aux_loss=cfg.aux_loss)
    state.update(
        epoch=epoch,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        metrics={k: v for k, v in record.items() if k != "skipped"},
    )
    torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
    with open(os.path.join(folder, CHECKPOINT_INFO), "w") as f:
        json.dump(checkpoint_header(cfg.model, plan.class_map, epoch), f)


def check_same_run(header: dict[str, Any], *, model: str, class_map: ClassMap, where: str) -> None:
    """A checkpoint of another model or class mapping cannot be resumed: say which differs."""
    if header["model"] != model:
        raise RaysegError(
            f"{where} holds a {header['model']} checkpoint, not {model}; "
            "use another --out or the same --model"
        )
    theirs = ClassMap.from_dict(header["class_map"])
    if theirs != class_map:
        raise RaysegError(
            f"{where} was trained on classes {list(theirs.names[1:])} "
            f"(mask values {list(theirs.mask_values)}), not {list(class_map.names[1:])} "
            f"(mask values {list(class_map.mask_values)}); use another --out or the same "
            "--classes and masks"
        )


def restore(
    checkpoint_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    plan: Plan,
) -> int:
    """Load a checkpoint folder into model/optimizer/scheduler; returns its completed epochs."""
    loc = storage.locate(os.path.join(checkpoint_dir, CHECKPOINT_FILE))
    state = read_record(loc)
    check_same_run(state, model=plan.cfg.model, class_map=plan.class_map, where=checkpoint_dir)
    unwrap(model).load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])


# ---- Ray Train worker ------------------------------------------------------------------------


def say(line: str) -> None:
    """One progress line from a worker. Ray Train patches print() in workers to write both to
    its logger and to stdout (the driver shows it twice); the process's own stdout shows it once.
    """
    print(line, file=sys.__stdout__, flush=True)


def quiet_logs() -> None:
    # Ray Data logs a few INFO lines per dataset execution, i.e. per epoch and worker.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # MobileNet's depthwise weight grads come out in another stride order on CPU; DDP copes.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def build_training(
    plan: Plan, device: torch.device, *, world_size: int, channels_last: bool
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Model on `device`, optimizer, and the per-iteration LR schedule for the whole run."""
    cfg = plan.cfg
    model = build_model(
        cfg.model,
        plan.class_map.num_classes,
        aux_loss=cfg.aux_loss,
        weights=cfg.weights,
        weights_backbone=cfg.weights_backbone,
    )
    if world_size > 1 and cfg.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(
        optimizer,
        total_steps=cfg.epochs * plan.steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * plan.steps_per_epoch),
    )
    return model, optimizer, scheduler


def report_epoch(
    record: dict[str, Any],
    *,
    rank: int,
    plan: Plan,
    history: list[dict[str, Any]],
    state: tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
) -> None:
    """Rank 0 logs the epoch and reports it with a checkpoint; other ranks report without one.

    Every rank reports once per epoch: ray.train.report is a barrier across workers.
    """
    import ray.train

    epoch = record["epoch"]
    metrics = {k: record[k] for k in ("epoch", "loss", "images_per_s")}
    metrics["val_miou"] = 0.0 if math.isnan(record["val_miou"]) else record["val_miou"]
    name = f"{CHECKPOINT_PREFIX}{epoch:04d}"
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    history.append(record)
    write_history(storage.locate(plan.run_uri), history)
    say(epoch_line(record, plan.cfg.epochs))
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, *state, plan=plan, epoch=epoch, record=record)
        # Ray persists the folder as RUN/epoch_NNNN and keeps the best num_to_keep + the latest.
        checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: config = {"plan": Plan}."""
    import ray.train
    import ray.train.torch

    plan: Plan = config["plan"]
    cfg, class_map = plan.cfg, plan.class_map
    quiet_logs()
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # Ray
    torch.set_num_threads(plan.threads)
    torch.manual_seed(cfg.seed)
    amp = cfg.amp and device.type == "cuda"
    model, optimizer, scheduler = build_training(plan, device, world_size=world, channels_last=amp)

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()  # Ray: the latest one, on resume or restart
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_epoch = restore(folder, model, optimizer, scheduler, plan=plan)
        if rank == 0:
            say(f"resumed from epoch {start_epoch} ({checkpoint.path})")
    history = (
        read_history(storage.locate(plan.run_uri), upto_epoch=start_epoch) if rank == 0 else []
    )

    train_model = torch.compile(model) if cfg.compile else model
    train_model = ray.train.torch.prepare_model(train_model, move_to_device=False)  # Ray: DDP
    train_shard = ray.train.get_dataset_shard("train")  # Ray
    val_shard = ray.train.get_dataset_shard(f"val_{rank}")  # Ray: this worker's val images

    def train_batches() -> Prefetched:
        return Prefetched(
            train_shard.iter_torch_batches(
                batch_size=cfg.batch_size,
                drop_last=True,
                local_shuffle_buffer_size=4 * cfg.batch_size,
                prefetch_batches=PREFETCH_BATCHES,
                device=device,
            )
        )

    batches = train_batches() if start_epoch < cfg.epochs else None
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        stats = train_one_epoch(train_model, batches, optimizer, scheduler, device=device, amp=amp)
        if epoch < cfg.epochs:
            batches = train_batches()  # the next epoch starts up during validation
        val_start = time.perf_counter()
        val_batches = val_shard.iter_torch_batches(
            batch_size=cfg.batch_size, prefetch_batches=PREFETCH_BATCHES, device=device
        )
        conf, val_problems = evaluate(
            model, val_batches, num_classes=class_map.num_classes, device=device, amp=amp
        )
        stats, conf_np, val_problems, val_s = sum_across_workers(
            stats, conf, val_problems, time.perf_counter() - val_start
        )
        record = epoch_record(
            epoch,
            stats,
            conf_np,
            class_map=class_map,
            lr=scheduler.get_last_lr()[0],
            val_seconds=val_s,
            val_problems=val_problems,
            world_size=world,
        )
        report_epoch(
            record, rank=rank, plan=plan, history=history, state=(model, optimizer, scheduler)
        )


# ---- driver --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    train: ingest.DataSummary
    val: ingest.DataSummary
    train_ids: np.ndarray
    val_ids: np.ndarray


def check_settings(cfg: TrainConfig) -> None:
    if cfg.model not in MODEL_BUILDERS:
        raise RaysegError(f"model {cfg.model!r} unknown; choose one of {', '.join(MODEL_BUILDERS)}")
    for key in ("epochs", "batch_size", "crop_size", "num_workers"):
        if getattr(cfg, key) < 1:
            raise RaysegError(f"{key} is {getattr(cfg, key)}, expected a positive integer")
    if cfg.lr <= 0:
        raise RaysegError(f"lr is {cfg.lr}, expected > 0")
    if cfg.max_failures < -1 or cfg.num_to_keep < 1:
        raise RaysegError("max_failures must be >= -1 and num_to_keep >= 1")


def plan_split(cfg: TrainConfig, data: ingest.DataSummary, class_map: ClassMap) -> Split:
    """Training and validation images: --val-data, or a deterministic split by image id."""
    if cfg.val_data:
        val = ingest.scan_data(cfg.val_data)
        val_map = class_map_from_meta(val.meta, cfg.classes)
        if val_map != class_map:
            raise RaysegError(
                f"{cfg.val_data}: its masks map classes differently from {cfg.data} "
                f"({list(val_map.mask_values)} vs {list(class_map.mask_values)}); "
                "render both with the same `rayseg masks --values`"
            )
        return Split(data, val, np.unique(data.image_ids), np.unique(val.image_ids))
    if cfg.val_fraction <= 0:
        raise RaysegError("validation needs images: set --val-fraction > 0 or --val-data")
    train_ids, val_ids = ingest.split_ids(data.image_ids, cfg.val_fraction, seed=cfg.seed)
    return Split(data, data, train_ids, val_ids)


def steps_per_epoch(num_train: int, cfg: TrainConfig) -> int:
    # Ray Data's equal split gives each worker floor(N / W) rows; the last partial batch is dropped.
    steps = (num_train // cfg.num_workers) // cfg.batch_size
    if steps < 1:
        raise RaysegError(
            f"{num_train} training images are too few for --batch-size {cfg.batch_size} on "
            f"{cfg.num_workers} workers (each step needs {cfg.batch_size * cfg.num_workers})"
        )
    return steps


def storage_for(run: storage.Location) -> tuple[str, str]:
    """(Ray Train storage_path on run.fs, run name): RUN's parent folder and last part."""
    parent, _, name = run.path.rstrip("/").rpartition("/")
    if not parent or not name:
        raise RaysegError(
            f"{run.uri}: the run directory needs a parent folder (e.g. s3://b/runs/x)"
        )
    return parent, name


def done_epochs(
    run: storage.Location, *, model: str, class_map: ClassMap
) -> tuple[int, str | None]:
    """Epochs already in the run dir's latest checkpoint (0 if none); mismatches are errors."""
    latest = latest_checkpoint_dir(run)
    if latest is None:
        return 0, None
    info_loc = latest.join(CHECKPOINT_INFO)
    if storage.exists(info_loc):
        header = storage.read_json(info_loc)
    else:
        header = read_record(latest.join(CHECKPOINT_FILE))
    check_same_run(header, model=model, class_map=class_map, where=latest.uri)
    return int(header["epoch"]), latest.uri


def worker_resources(cfg: TrainConfig, node_cpus: list[float]) -> tuple[float, int]:
    """(CPUs reserved per worker, torch threads per worker), given the CPUs of each node.

    With GPUs a worker needs one CPU. CPU training gets all CPUs but one, shared out (no more
    than a node has): Ray Data decodes on the CPUs that Train did not reserve.
    """
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    elif cfg.use_gpu:
        cpus = 1.0
    else:
        cpus = max(0.5, min((sum(node_cpus) - 1) / cfg.num_workers, max(node_cpus)))
    return cpus, max(1, int(cpus))


def check_cluster(cfg: TrainConfig, cpus_per_worker: float) -> None:
    """Refuse a run that could never be scheduled, rather than wait for it forever."""
    import ray

    have = ray.cluster_resources()
    if cfg.use_gpu and have.get("GPU", 0) < cfg.num_workers:
        raise RaysegError(
            f"--use-gpu with {cfg.num_workers} workers needs {cfg.num_workers} GPUs; "
            f"the cluster has {int(have.get('GPU', 0))}"
        )
    need = cpus_per_worker * cfg.num_workers
    if need > have.get("CPU", 0):
        raise RaysegError(
            f"{cfg.num_workers} workers x {cpus_per_worker:g} CPUs need {need:g} CPUs; "
            f"the cluster has {have.get('CPU', 0):g} (lower --num-workers or --cpus-per-worker)"
        )


def check_storage_reachable(run: storage.Location) -> None:
    """Every node must see the run dir (Ray Train persists checkpoints there from workers)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
    if len(nodes) < 2:
        return
    marker = f".storage-probe-{os.getpid()}-{time.time_ns()}"
    storage.write_bytes(run.join(marker), b"ok")
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0)(_probe_storage)
        refs = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(run.uri, marker)
            for n in nodes
        }
        for address, ref in refs.items():
            problem = ray.get(ref, timeout=120)
            if problem:
                raise RaysegError(
                    f"{run.uri}: not reachable from node {address} ({problem}); "
                    "use storage every node shares (s3:// or a shared filesystem)"
                )
    finally:
        storage.delete(run.join(marker))


def _probe_storage(uri: str, marker: str) -> str | None:
    try:
        loc = storage.locate(uri)
        if not storage.exists(loc.join(marker)):
            return "a file the driver wrote there is not visible"
    except (OSError, RaysegError) as e:
        return str(e)
    return None


def forwarded_env(*uris: str | None) -> dict[str, Any]:
    """Object-store settings workers need (only for s3:// paths), as a runtime_env."""
    if not any(u and u.startswith("s3://") for u in uris):
        return {}
    keys = [k for k in os.environ if k.startswith("AWS_")]
    return {"env_vars": {k: os.environ[k] for k in keys}} if keys else {}


def build_trainer(plan: Plan, split: Split, run: storage.Location, cpus_per_worker: float):
    """TorchTrainer over the train dataset (split across workers) and per-rank val shards."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = plan.cfg
    datasets = {
        "train": ingest.train_dataset(
            split.train,
            split.train_ids,
            lut=plan.class_map.train_lut(),
            crop_size=cfg.crop_size,
            batch_size=cfg.batch_size,
        )
    }
    canvas = ingest.val_canvas(split.val, split.val_ids)
    for rank, ids in enumerate(ingest.shard_ids(split.val_ids, cfg.num_workers)):
        datasets[f"val_{rank}"] = ingest.val_dataset(
            split.val, ids, lut=plan.class_map.train_lut(), canvas=canvas, batch_size=cfg.batch_size
        )
    storage_path, name = storage_for(run)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=run.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="val_miou",
                checkpoint_score_order="max",
            ),
            worker_runtime_env=forwarded_env(cfg.data, cfg.val_data, cfg.out),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def fit(trainer) -> None:
    """trainer.fit(), with a worker's RaysegError surfacing as itself."""
    import ray.train

    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        for failure in getattr(e, "worker_failures", {}).values():
            cause = failure
            while cause is not None and not isinstance(cause, RaysegError):
                cause = cause.__cause__ or getattr(cause, "cause", None)
            if isinstance(cause, RaysegError):
                raise RaysegError(str(cause)) from None
        raise


def export_final(run: storage.Location) -> dict[str, Any]:
    """RUN/model.pt from the latest checkpoint: the model record without training state."""
    latest = latest_checkpoint_dir(run)
    if latest is None:
        raise RaysegError(f"{run.uri}: training wrote no checkpoint")
    state = read_record(latest.join(CHECKPOINT_FILE))
    keep = ("format", "model", "num_classes", "aux_loss", "class_map", "state_dict", "epoch")
    storage.write_bytes(run.join(EXPORT_NAME), to_bytes({k: state[k] for k in keep}))
    return state


def run_summary(run: storage.Location, history: list[dict[str, Any]]) -> dict[str, Any]:
    skipped: dict[int, str] = {}
    for rec in history:
        skipped.update({s["image_id"]: s["reason"] for s in rec.get("skipped", [])})
    last = history[-1] if history else {}
    return {
        "run": run.uri,
        "model_file": run.join(EXPORT_NAME).uri,
        "epochs": last.get("epoch", 0),
        "val_miou": last.get("val_miou"),
        "best_val_miou": max((r["val_miou"] for r in history), default=None),
        "images_per_s": last.get("images_per_s"),
        "data_wait_fraction": last.get("data_wait_fraction"),
        "skipped_rows": len(skipped),
        "skipped": [{"image_id": i, "reason": r} for i, r in sorted(skipped.items())],
    }


@dataclass(frozen=True)
class Checked:
    """What run_train learned before starting Ray: every input checked."""

    class_map: ClassMap
    split: Split
    steps_per_epoch: int
    run: storage.Location
    done_epochs: int
    latest: str | None


def check_inputs(cfg: TrainConfig) -> Checked:
    """Data, classes, split, crop, weights, output and any earlier run: RaysegError if unusable."""
    check_settings(cfg)
    data = ingest.scan_data(cfg.data)
    class_map = class_map_from_meta(data.meta, cfg.classes)
    split = plan_split(cfg, data, class_map)
    ingest.check_crop(split.train, split.train_ids, cfg.crop_size)
    steps = steps_per_epoch(len(split.train_ids), cfg)
    if cfg.weights or cfg.weights_backbone:
        build_model(
            cfg.model,
            class_map.num_classes,
            aux_loss=cfg.aux_loss,
            weights=cfg.weights,
            weights_backbone=cfg.weights_backbone,
        )
    run = storage.locate(cfg.out)
    storage.check_writable(run)
    storage_for(run)
    done, latest = done_epochs(run, model=cfg.model, class_map=class_map)
    return Checked(class_map, split, steps, run, done, latest)


def write_run_files(cfg: TrainConfig, checked: Checked) -> None:
    """The resolved config and the validation split, beside the checkpoints."""
    run, split = checked.run, checked.split
    storage.write_bytes(run.join("config.yaml"), dump_yaml(cfg).encode())
    split_record = {
        "data": split.train.location.uri,
        "val_data": split.val.location.uri,
        "val_fraction": None if cfg.val_data else cfg.val_fraction,
        "seed": cfg.seed,
        "train_images": len(split.train_ids),
        "val_image_ids": [int(i) for i in split.val_ids],
    }
    storage.write_json(run.join("split.json"), split_record)


def launch(cfg: TrainConfig, checked: Checked) -> None:
    """Connect to Ray, check the cluster can run it, and train."""
    import ray

    from rayseg.runtime import connect_ray

    connect_ray(cfg.address, cfg.num_cpus, dashboard=True)
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    cpus_per_worker, threads = worker_resources(cfg, node_cpus)
    check_cluster(cfg, cpus_per_worker)
    check_storage_reachable(checked.run)
    ray.data.DataContext.get_current().enable_progress_bars = False
    split = checked.split
    plan = Plan(
        cfg=cfg,
        class_map=checked.class_map,
        run_uri=checked.run.uri,
        steps_per_epoch=checked.steps_per_epoch,
        threads=threads,
        num_train=len(split.train_ids),
        num_val=len(split.val_ids),
    )
    print(
        f"training {cfg.model} on {plan.num_train} images ({plan.num_val} for validation), "
        f"{plan.class_map.num_classes} classes, {cfg.num_workers} workers x {cfg.batch_size} "
        f"images/step, {plan.steps_per_epoch} steps/epoch"
    )
    fit(build_trainer(plan, split, checked.run, cpus_per_worker))


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """`rayseg train`: check everything, train (or resume), export RUN/model.pt, summarise."""
    start = time.monotonic()
    checked = check_inputs(cfg)
    write_run_files(cfg, checked)
    run = checked.run
    if checked.done_epochs >= cfg.epochs:
        print(
            f"{run.uri} already has {checked.done_epochs} epochs (--epochs {cfg.epochs}): "
            "nothing to train"
        )
    else:
        if checked.latest:
            print(
                f"resuming from {checked.latest}: {checked.done_epochs} of {cfg.epochs} epochs done"
            )
        launch(cfg, checked)
    state = export_final(run)
    history = read_history(run, upto_epoch=int(state["epoch"]))
    summary = run_summary(run, history)
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["config"] = to_dict(cfg)
    storage.write_json(run.join("summary.json"), summary)
    print_outputs(summary, run)
    return summary


def print_outputs(summary: dict[str, Any], run: storage.Location) -> None:
    if summary["skipped_rows"]:
        first = summary["skipped"][0]
        print(
            f"skipped {summary['skipped_rows']} rows whose image or mask did not decode "
            f"(first: image {first['image_id']}: {first['reason']}); "
            f"listed in {run.join('summary.json').uri}"
        )
    miou = summary["val_miou"]
    print(
        f"trained {summary['epochs']} epochs: val mIoU {miou:.4f}"
        if miou is not None
        else f"trained {summary['epochs']} epochs"
    )
    print(f"model:       {summary['model_file']}")
    print(f"metrics:     {run.join(METRICS_NAME).uri}")
    print(f"curves:      {run.join(CURVES_NAME).uri}")
    print(f"checkpoints: {run.uri}/{CHECKPOINT_PREFIX}*")
