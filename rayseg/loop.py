"""The training loop: one epoch, validation, and the epoch's numbers. Plain PyTorch, no Ray.

Inputs: a torchvision model, iterables of batches from rayseg.ingest ({"image": (B, H, W, 3)
uint8, "mask": (B, H, W) train ids with 255 = ignore, "image_id", "problem"}), a TrainConfig.
Outputs: EpochStats (one worker's sums), a (K, K) confusion matrix, and the metrics.jsonl record
of an epoch (epoch_record). rayseg.train runs this inside Ray Train workers; bench/train_bench.py
runs it in one plain process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rayseg import ingest
from rayseg import metrics as M
from rayseg.config import TrainConfig
from rayseg.models import ClassMap, build_model, forward_logits, normalize
from rayseg.records import TRAIN_IGNORE

AUX_WEIGHT = 0.5  # torchvision's recipe weighs the auxiliary head's loss by 0.5
AUX_LR_SCALE = 10.0  # ... and trains it with 10x the base learning rate
POLY_POWER = 0.9
WARMUP_START = 0.01
SKIPPED_LISTED = 1000  # per epoch record; the count is always exact

Batches = Iterable[dict[str, torch.Tensor]]
TrainingState = tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]


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


# Called after each training step with the epoch's stats so far and the step's loss (0-d tensor).
StepHook = Callable[[EpochStats, torch.Tensor], None]


# ---- schedule, loss, optimizer ---------------------------------------------------------------


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


def build_training(
    cfg: TrainConfig,
    num_classes: int,
    steps_per_epoch: int,
    device: torch.device,
    *,
    world_size: int,
    channels_last: bool,
) -> TrainingState:
    """Model on `device`, optimizer, and the per-iteration LR schedule for the whole run."""
    model = build_model(
        cfg.model,
        num_classes,
        aux_loss=cfg.aux_loss,
        weights=cfg.weights,
        weights_backbone=cfg.weights_backbone,
    )
    # SyncBatchNorm needs NCCL: workers sharing a GPU talk over gloo (train.collective_backend).
    nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
    if world_size > 1 and cfg.sync_bn and device.type == "cuda" and nccl:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(
        optimizer,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
    )
    return model, optimizer, scheduler


# ---- batches ---------------------------------------------------------------------------------


def timed(batches: Batches, stats: EpochStats) -> Iterator[dict[str, torch.Tensor]]:
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


def note_problems(batch: dict[str, torch.Tensor], problems: dict[int, int]) -> None:
    bad = torch.nonzero(batch["problem"]).flatten().tolist()
    for i in bad:
        problems[int(batch["image_id"][i])] = int(batch["problem"][i])


def model_input(batch: dict[str, torch.Tensor], *, channels_last: bool) -> torch.Tensor:
    images = normalize(batch["image"])  # (B, H, W, 3) uint8 -> (B, 3, H, W) float
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


# ---- one epoch, validation -------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    device: torch.device,
    amp: bool,
    on_step: StepHook | None = None,
) -> EpochStats:
    """One pass over this worker's batches; per-iteration LR steps. Returns local sums.

    `on_step(stats, loss)` runs after each step (stats.seconds so far; loss a 0-d tensor).
    """
    model.train()
    stats = EpochStats()
    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    for batch in timed(batches, stats):
        note_problems(batch, stats.problems)
        images = model_input(batch, channels_last=amp)
        target = batch["mask"].long()  # (B, H, W), TRAIN_IGNORE where the loss skips
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = segmentation_loss(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        stats.steps += 1
        stats.images += len(target)
        if on_step is not None:
            stats.seconds = time.perf_counter() - start
            on_step(stats, loss.detach())
    stats.loss_sum = float(loss_sum)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
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


# ---- across workers, the epoch's record ------------------------------------------------------


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
    listed = sorted(problems.items())[:SKIPPED_LISTED]
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
        "skipped": [ingest.problem_record(i, code).to_dict() for i, code in listed],
    }


def epoch_line(rec: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {rec['epoch']}/{epochs}  loss {rec['loss']:.4f}  val mIoU {rec['val_miou']:.4f}  "
        f"pixel acc {rec['val_pixel_accuracy']:.4f}  {rec['images_per_s']:.1f} images/s  "
        f"data wait {rec['data_wait_fraction']:.1%}"
    )


def fit_epochs(
    state: TrainingState,
    train_model: nn.Module,
    *,
    epochs: range,
    train_batches: Callable[[int], Batches],
    val_batches: Callable[[], Batches],
    class_map: ClassMap,
    device: torch.device,
    amp: bool,
    world_size: int,
    on_epoch: Callable[[dict[str, Any]], None],
    on_step: Callable[[int], StepHook | None] | None = None,
    first_batches: Batches | None = None,
) -> None:
    """Each epoch: train, validate, sum across workers, hand the epoch_record to on_epoch.

    `train_model` is `state`'s model, possibly wrapped (DDP, torch.compile); validation runs the
    plain one. `on_step(epoch)`, if given, returns that epoch's train_one_epoch hook.
    train_batches(epoch) of the next epoch is called before validation, so a pipeline that
    starts loading at once (rayseg.feed) loads while this epoch validates. `first_batches`: the
    first epoch's, if the caller started them earlier (train.py: before building the model).
    """
    model, optimizer, scheduler = state
    batches = first_batches or (train_batches(epochs[0]) if len(epochs) else None)
    for epoch in epochs:
        stats = train_one_epoch(
            train_model,
            batches,
            optimizer,
            scheduler,
            device=device,
            amp=amp,
            on_step=on_step(epoch) if on_step else None,
        )
        if epoch < epochs[-1]:
            batches = train_batches(epoch + 1)
        val_start = time.perf_counter()
        conf, val_problems = evaluate(
            model, val_batches(), num_classes=class_map.num_classes, device=device, amp=amp
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
            world_size=world_size,
        )
        on_epoch(record)
