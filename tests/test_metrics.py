"""rayseg.metrics on matrices small enough to check by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rayseg import metrics as M


def test_confusion_counts_and_ignores():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = M.confusion_matrix(pred, target, 3)
    # rows: true class, columns: predicted class; the two ignored pixels are not counted
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert conf.dtype == torch.int64


def test_ten_by_ten_square():
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    target[0, :10, :10] = 1  # 100 pixels of class 1
    pred = torch.zeros_like(target)
    pred[0, :10, :5] = 1  # half of it found, nothing else
    conf = M.confusion_matrix(pred, target, 2).numpy()
    assert conf[1, 1] == 50 and conf[1, 0] == 50 and conf[0, 0] == 300
    iou = M.iou_per_class(conf)
    assert iou[1] == pytest.approx(50 / 100)
    assert iou[0] == pytest.approx(300 / 350)
    assert M.pixel_accuracy(conf) == pytest.approx(350 / 400)


def test_mean_iou_skips_classes_with_empty_union():
    conf = np.array([[5, 0, 0], [0, 0, 0], [1, 0, 2]])
    iou = M.iou_per_class(conf)
    assert math.isnan(iou[1])
    assert M.mean_iou(conf) == pytest.approx((5 / 6 + 2 / 3) / 2)


def test_summarize_names_classes_and_handles_empty():
    out = M.summarize(np.array([[3, 1], [0, 0]]), ("background", "cat"))
    assert out["iou"] == {"background": 0.75, "cat": 0.0}
    assert out["miou"] == pytest.approx(0.375)
    empty = M.summarize(np.zeros((2, 2)), ("background", "cat"))
    assert math.isnan(empty["miou"]) and empty["iou"]["cat"] is None


def test_matrices_add_up_over_batches():
    rng = np.random.default_rng(0)
    target = torch.as_tensor(rng.integers(0, 4, (4, 8, 8)))
    pred = torch.as_tensor(rng.integers(0, 4, (4, 8, 8)))
    whole = M.confusion_matrix(pred, target, 4)
    parts = sum(M.confusion_matrix(pred[i : i + 1], target[i : i + 1], 4) for i in range(4))
    assert torch.equal(whole, parts)
