"""Segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy (pure torch/numpy).

The confusion matrix is (K, K) int64 with rows = true class and columns = predicted class; pixels
whose target is the ignore value are left out. Summing matrices over batches or workers gives the
matrix of the union, so workers all-reduce it before any ratio is taken.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rayseg.records import TRAIN_IGNORE


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore: int = TRAIN_IGNORE
) -> torch.Tensor:
    """(B, H, W) predicted classes and targets -> (K, K) int64 counts, ignored pixels left out."""
    keep = target != ignore
    t = target[keep].long()
    p = pred[keep].long()
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """(K,) IoU = TP / (TP + FP + FN); NaN for a class absent from targets and predictions."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over classes with a non-zero union, background included (NaN if none)."""
    iou = iou_per_class(conf)
    valid = ~np.isnan(iou)
    return float(iou[valid].mean()) if valid.any() else math.nan


def pixel_accuracy(conf: np.ndarray) -> float:
    conf = np.asarray(conf, np.float64)
    total = conf.sum()
    return float(np.trace(conf) / total) if total > 0 else math.nan


def summarize(conf: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, object]:
    """Confusion matrix -> {"miou", "pixel_accuracy", "iou": {class name: IoU or None}}."""
    iou = iou_per_class(conf)
    return {
        "miou": mean_iou(conf),
        "pixel_accuracy": pixel_accuracy(conf),
        "iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou, strict=True)},
    }
