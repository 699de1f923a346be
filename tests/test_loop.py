"""rayseg.loop: schedule, loss, optimizer groups, one epoch, validation and the epoch record.

Plain PyTorch on CPU, no Ray: LR-ASPP with 3 classes on 32x32 images, two batches of two.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mask_data import category_meta

from rayseg import ingest, loop
from rayseg.config import TrainConfig
from rayseg.models import build_model, class_map_from_meta
from rayseg.records import TRAIN_IGNORE

META = category_meta({1: "square", 2: "disc"})
CPU = torch.device("cpu")


def batch(ids: list[int], problems: list[int]) -> dict[str, torch.Tensor]:
    """Images with class 1 on the left half, class 2 on the right, top row ignored."""
    n = len(ids)
    image = torch.zeros(n, 32, 32, 3, dtype=torch.uint8)
    image[:, :, 16:] = 255
    mask = torch.ones(n, 32, 32, dtype=torch.uint8)
    mask[:, :, 16:] = 2
    mask[:, 0] = TRAIN_IGNORE
    return {
        "image": image,
        "mask": mask,
        "image_id": torch.tensor(ids),
        "problem": torch.tensor(problems),
    }


BATCHES = [batch([1, 2], [0, 2]), batch([3, 4], [0, 0])]


def training(epochs: int = 1) -> loop.TrainingState:
    torch.manual_seed(0)
    cfg = TrainConfig(data="d", out="o", model="lraspp_mobilenet_v3_large", epochs=epochs, lr=0.01)
    return loop.build_training(cfg, 3, len(BATCHES), CPU, world_size=1, channels_last=False)


def test_lr_poly_with_warmup():
    assert loop.lr_factor(0, 100, 0) == 1.0
    assert loop.lr_factor(50, 100, 0) == pytest.approx(0.5**0.9)
    assert loop.lr_factor(100, 100, 0) == 0.0
    assert loop.lr_factor(0, 100, 10) == pytest.approx(loop.WARMUP_START)
    assert loop.lr_factor(5, 100, 10) < loop.lr_factor(10, 100, 10)


def test_loss_ignores_255_and_survives_an_all_ignored_batch():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 10.0
    target = torch.tensor([[[1, 1], [255, 255]]])
    assert loop.pixel_loss(logits, target).item() == pytest.approx(0.0, abs=1e-3)
    ignored = torch.full((1, 2, 2), 255)
    assert loop.pixel_loss(logits, ignored).item() == 0.0
    with_aux = loop.segmentation_loss({"out": logits, "aux": torch.zeros(1, 3, 2, 2)}, target)
    assert with_aux.item() == pytest.approx(0.5 * math.log(3), rel=1e-3)


def test_aux_head_gets_ten_times_the_lr():
    model = build_model("deeplabv3_mobilenet_v3_large", 3, aux_loss=True)
    groups = loop.param_groups(model, 0.01)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.1)
    counted = sum(len(g["params"]) for g in groups)
    assert counted == len(list(model.parameters()))


def test_timed_counts_waits_and_yields_everything():
    stats = loop.EpochStats()
    assert list(loop.timed(iter(range(1, 4)), stats)) == [1, 2, 3]
    assert stats.wait_seconds >= stats.first_wait_seconds >= 0


def test_one_epoch_counts_steps_images_and_problems():
    model, optimizer, scheduler = training()
    stats = loop.train_one_epoch(model, BATCHES, optimizer, scheduler, device=CPU, amp=False)
    assert (stats.steps, stats.images) == (2, 4)
    assert stats.problems == {2: 2}  # image 2: code 2, "image does not decode"
    assert math.isfinite(stats.loss_sum) and stats.loss_sum > 0
    assert scheduler.last_epoch == 2  # one LR step per iteration


def test_evaluate_counts_every_labelled_pixel():
    model, _, _ = training()
    conf, problems = loop.evaluate(model, BATCHES, num_classes=3, device=CPU, amp=False)
    assert conf.shape == (3, 3) and int(conf.sum()) == 4 * 31 * 32  # top rows ignored
    assert conf[1:].sum(1).tolist() == [4 * 31 * 16, 4 * 31 * 16] and problems == {2: 2}
    assert model.training  # evaluate hands the model back in training mode


def test_epoch_record_lists_skipped_rows_with_reasons():
    stats = loop.EpochStats(loss_sum=3.0, steps=2, images=4, seconds=2.0, problems={7: 3})
    conf = np.diag([5, 5, 0]).astype(np.int64)
    rec = loop.epoch_record(
        4,
        stats,
        conf,
        class_map=class_map_from_meta(META),
        lr=0.1,
        val_seconds=1.0,
        val_problems={5: 1},
        world_size=1,
    )
    assert rec["loss"] == 1.5 and rec["images_per_s"] == 2.0 and rec["skipped_rows"] == 2
    assert rec["skipped"] == [
        {"image_id": 5, "reason": ingest.PROBLEMS[1]},
        {"image_id": 7, "reason": ingest.PROBLEMS[3]},
    ]
    assert rec["val_pixel_accuracy"] == 1.0
    assert "epoch 4/9  loss 1.5000" in loop.epoch_line(rec, 9)


def test_sum_across_workers_without_a_process_group_is_the_identity():
    stats = loop.EpochStats(steps=1)
    out, conf, problems, seconds = loop.sum_across_workers(stats, torch.eye(2), {1: 2}, 0.5)
    assert out is stats and isinstance(conf, np.ndarray) and conf.trace() == 2
    assert (problems, seconds) == ({1: 2}, 0.5)


def fit_two_epochs(**kwargs) -> tuple[list[str], list[dict]]:
    """loop.fit_epochs over epochs 1-2 of BATCHES: (train_batches(epoch) calls, epoch records)."""
    state = training(epochs=2)
    calls, records = [], []

    def train_batches(epoch: int):
        calls.append(epoch)
        return BATCHES

    loop.fit_epochs(
        state,
        state[0],
        epochs=range(1, 3),
        train_batches=train_batches,
        val_batches=lambda: BATCHES[1:],
        class_map=class_map_from_meta(META),
        device=CPU,
        amp=False,
        world_size=1,
        on_epoch=records.append,
        **kwargs,
    )
    return calls, records


def test_fit_epochs_trains_validates_and_hands_over_each_record():
    calls, records = fit_two_epochs()
    assert calls == [1, 2] and [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["steps"] == 2 and records[-1]["lr"] == pytest.approx(0.0)
    assert records[1]["loss"] < records[0]["loss"]


def test_fit_epochs_starts_with_batches_started_earlier():
    # train.py starts the first epoch's batches before it builds the model.
    calls, records = fit_two_epochs(first_batches=BATCHES[:1])
    assert calls == [2]  # only the second epoch's
    assert [r["steps"] for r in records] == [1, 2]


def test_on_step_sees_each_step_with_its_loss():
    model, optimizer, scheduler = training()
    seen = []

    def hook(stats: loop.EpochStats, loss: torch.Tensor) -> None:
        seen.append((stats.steps, stats.images, float(loss), stats.seconds > 0))

    loop.train_one_epoch(model, BATCHES, optimizer, scheduler, device=CPU, amp=False, on_step=hook)
    assert [s[:2] for s in seen] == [(1, 2), (2, 4)]
    assert all(math.isfinite(s[2]) and s[2] > 0 and s[3] for s in seen)
