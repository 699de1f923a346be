"""rayseg.evaluate: confusion matrix and IoU by hand, then run_evaluate on one local Ray."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from mask_data import category_meta, encode_rgb, random_rgb, reference_labels, sample_row
from tiny_models import PERSON_CAR, save_tiny_model, tiny_model

from rayseg import storage
from rayseg.checkpoint import load_model
from rayseg.config import EvaluateConfig
from rayseg.errors import RaysegError
from rayseg.evaluate import (
    check_class_map,
    format_table,
    metrics_from_confusion,
    per_class_rows,
    rows_by_image,
    run_evaluate,
    score,
    score_images,
    sum_partials,
    table_csv,
)
from rayseg.models import ClassMap
from rayseg.records import Problem

# The data has three categories; the model knows two of them (train, value 7, is background).
META = category_meta({1: "person", 3: "car", 7: "train"})
CLASS_MAP = PERSON_CAR


# ---- pure core, counted by hand ------------------------------------------------------------------


def test_score_by_hand():
    # Mask values: 1 person (class 1), 3 car (class 2), 7 train (no model class: background).
    masks = [
        np.array([[0, 0, 1], [1, 3, 255], [3, 3, 7]], np.uint8),
        np.array([[3, 255]], np.uint8),
    ]
    preds = [
        np.array([[0, 1, 1], [1, 2, 0], [0, 2, 0]], np.uint8),
        np.array([[2, 1]], np.uint8),
    ]
    # (true, pred) pairs, image 1: (0,0) x2, (0,1), (1,1) x2, (2,2) x2, (2,0); image 2: (2,2).
    # The two 255 pixels are left out whatever was predicted there.
    expected = np.array([[2, 1, 0], [0, 2, 0], [1, 0, 3]])
    np.testing.assert_array_equal(score(masks, preds, CLASS_MAP), expected)
    with pytest.raises(ValueError, match="shapes differ"):
        score(masks[:1], [preds[0][:2]], CLASS_MAP)


def test_metrics_by_hand():
    cm = np.array([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    m = metrics_from_confusion(cm, ["bg", "a", "b", "absent"])
    # IoU = TP / (row + column - TP): bg 2/(3+3-2), a 2/(2+3-2), b 2/(3+2-2); "absent" 0/0.
    assert m["per_class_iou"] == pytest.approx({"bg": 0.5, "a": 2 / 3, "b": 2 / 3, "absent": None})
    assert m["miou"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert m["pixel_accuracy"] == pytest.approx(6 / 8)
    # A class predicted but never true scores 0 and counts in the mean.
    cm = np.array([[3, 1], [0, 0]])
    m = metrics_from_confusion(cm, ["bg", "ghost"])
    assert m["per_class_iou"] == {"bg": 0.75, "ghost": 0.0}
    assert m["miou"] == pytest.approx(0.375)
    with pytest.raises(RaysegError, match="no scored pixels"):
        metrics_from_confusion(np.zeros((2, 2), np.int64), ["bg", "a"])


def test_class_map_must_match_the_data():
    check_class_map(CLASS_MAP, META, checkpoint="ck", data="d")
    train_ids = ClassMap((1, 2), (1, 3), CLASS_MAP.names, 255, "train_id")
    with pytest.raises(RaysegError, match="values=train_id, but d has values=category_id"):
        check_class_map(train_ids, META, checkpoint="ck", data="d")
    other = ClassMap((1, 3), (1, 7), ("background", "person", "train"), 255, "category_id")
    with pytest.raises(RaysegError, match="'train' \\(category 7\\) is mask value 3.*'car'"):
        check_class_map(other, META, checkpoint="ck", data="d")
    wide = ClassMap((1, 3), (1, 3), CLASS_MAP.names, 65535, "category_id")
    with pytest.raises(RaysegError, match="ignore value is 65535"):
        check_class_map(wide, META, checkpoint="ck", data="d")


def test_score_images_skips_bad_rows_as_problems():
    model = tiny_model(CLASS_MAP.num_classes)
    rgb, mask = tiny_masks(12, 10, seed=0)
    good = {"image_id": 1, "image": encode_rgb(rgb), "mask": storage.encode_png(mask)}
    rows = [
        good,
        {**good, "image_id": 2, "image": None},
        {**good, "image_id": 3, "mask": storage.encode_png(mask[:5])},
    ]
    cm, scored, problems = score_images(model, rows, CLASS_MAP)
    expected = score([mask], [reference_labels(model, rgb)], CLASS_MAP)
    np.testing.assert_array_equal(cm, expected)
    assert scored == 1 and cm.sum() == (mask != 255).sum()
    assert [p.image_id for p in problems] == [2, 3]
    assert problems[0].reason.startswith("row has no image bytes")
    assert problems[1].reason == "mask is 10x5 but the image is 10x12"


def test_sum_partials_adds_matrices_and_sorts_problems():
    def partial(cm, scored, problems):
        return {
            "confusion": np.asarray(cm).reshape(1, -1)[0],
            "scored": scored,
            "problems": json.dumps([p.to_dict() for p in problems]),
        }

    rows = [
        partial([[1, 0], [0, 2]], 2, [Problem("late", image_id=9)]),
        partial([[0, 3], [4, 0]], 1, [Problem("early", image_id=2)]),
    ]
    cm, scored, problems = sum_partials(rows, 2)
    assert cm.tolist() == [[1, 3], [4, 2]] and scored == 3
    assert problems == [Problem("early", image_id=2), Problem("late", image_id=9)]


# ---- run_evaluate on Ray -------------------------------------------------------------------------


def tiny_masks(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) random RGB and an (H, W) mask: person, car, train, ignore and background bands."""
    rgb = random_rgb(h, w, seed)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 4] = 1
    mask[h // 4 : h // 2, : w // 2] = 3
    mask[h // 2 :, w // 2 :] = 7
    mask[-3:, :4] = 255
    return rgb, mask


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A model export and a masks folder of two Parquet parts: 3 good rows, 3 bad ones."""
    root = tmp_path_factory.mktemp("evaluate")
    model_file = str(root / "model.pt")
    save_tiny_model(model_file)
    good = {1: tiny_masks(40, 48, 1), 2: tiny_masks(36, 52, 2), 3: tiny_masks(44, 30, 3)}
    rows = {i: sample_row(i, None, m, image_bytes=encode_rgb(rgb)) for i, (rgb, m) in good.items()}
    rgb, mask = good[1]
    rows[4] = sample_row(4, None, mask, image_bytes=b"not an image")
    rows[5] = {**sample_row(5, None, mask, image_bytes=encode_rgb(rgb)), "mask": b"not a png"}
    rows[6] = {**rows[5], "image_id": 6, "mask": storage.encode_png(mask[:10])}
    parquet = root / "masks" / "parquet"
    parquet.mkdir(parents=True)
    for part, ids in enumerate([(1, 2, 4), (3, 5, 6)]):
        table = storage.mask_table([rows[i] for i in ids], META)
        storage.write_parquet(storage.locate(str(parquet / f"part-{part:05d}.parquet")), table)
    return {"model": model_file, "data": str(root / "masks"), "good": good, "root": root}


def hand_confusion(model_file: str, good: dict) -> np.ndarray:
    """The expected matrix: each image alone through the model, counted one class pair at a time."""
    model, _ = load_model(model_file)
    true_of_value = {0: 0, 1: 1, 3: 2, 7: 0}  # train (7) is not a model class: background
    cm = np.zeros((3, 3), np.int64)
    for rgb, mask in good.values():
        pred = reference_labels(model, rgb)
        for value, t in true_of_value.items():
            for p in range(3):
                cm[t, p] += int(((mask == value) & (pred == p)).sum())
    return cm


def test_evaluate_matches_a_hand_computed_confusion_matrix(ray_local, dataset, capsys):
    out = dataset["root"] / "eval"
    cfg = EvaluateConfig(
        checkpoint=dataset["model"], data=dataset["data"], out=str(out), batch_size=2
    )

    report = run_evaluate(cfg)

    expected = hand_confusion(dataset["model"], dataset["good"])
    written = json.loads((out / "metrics.json").read_text())
    assert written["confusion_matrix"] == expected.tolist() == report["confusion_matrix"]
    # Full resolution: every non-ignored pixel of every good mask is counted once.
    assert expected.sum() == sum(int((m != 255).sum()) for _, m in dataset["good"].values())
    assert (expected.sum(axis=0) > 0).sum() >= 2  # the model predicts more than one class
    tp = np.diag(expected)
    iou = tp / (expected.sum(0) + expected.sum(1) - tp)
    assert written["per_class_iou"] == pytest.approx(dict(zip(CLASS_MAP.names, iou, strict=True)))
    assert written["miou"] == pytest.approx(iou.mean())
    assert written["pixel_accuracy"] == pytest.approx(tp.sum() / expected.sum())
    assert written["counts"] == {
        "rows": 6,
        "scored": 3,
        "skipped": 3,
        "pixels": int(expected.sum()),
    }
    assert [(p["image_id"], p["reason"].split(" ")[0]) for p in written["skipped"]] == [
        (4, "image"),
        (5, "mask"),
        (6, "mask"),
    ]
    assert cv2.imread(str(out / "confusion_matrix.png")) is not None
    table = capsys.readouterr().out
    assert "person" in table and f"{written['miou']:.4f}" in table
    csv_lines = (out / "per_class_iou.csv").read_text().splitlines()
    assert csv_lines[0] == "class,iou,true_pixels,predicted_pixels"
    assert [line.split(",")[0] for line in csv_lines[1:]] == list(CLASS_MAP.names)
    assert [r["true_pixels"] for r in written["per_class"]] == expected.sum(1).tolist()


def many_classes(k: int = 81) -> tuple[dict, dict]:
    """Metrics of k classes, IoU rising with the index, the last two absent."""
    names = ["background", *(f"class{i:02d}" for i in range(1, k))]
    ious = {n: (i / k if i < k - 2 else None) for i, n in enumerate(names)}
    metrics = {"per_class_iou": ious, "miou": 0.5, "pixel_accuracy": 0.9}
    return metrics, {"scored": 158, "rows": 158, "skipped": 0, "pixels": 1000}


def test_terminal_table_shows_the_best_and_worst_classes_only():
    metrics, counts = many_classes()
    lines = format_table(metrics, counts).splitlines()
    # Before: a line per class (81 + 4). Now 5 best, a "... more" line, 5 worst, the rest.
    assert len(lines) < 20
    shown = [line.split()[0] for line in lines[1:12]]
    assert shown[:5] == ["class78", "class77", "class76", "class75", "class74"]
    assert shown[-5:] == ["class04", "class03", "class02", "class01", "background"]
    assert "(69 more; all in per_class_iou.csv)" in lines[6]
    assert "2 classes in neither" in lines[12]
    assert lines[-3].split() == ["mIoU", "0.5000"] and lines[-2].split()[-1] == "0.9000"
    everything = format_table(metrics, counts, show_all=True).splitlines()
    assert len(everything) == 1 + 81 + 3


def test_per_class_rows_and_csv():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    rows = per_class_rows(cm, ["background", "a,b", "c"])
    assert rows[0] == {"class": "background", "iou": 5 / 8, "true_pixels": 6, "predicted_pixels": 7}
    assert rows[2]["iou"] is None
    assert table_csv(rows).splitlines()[1:] == [
        "background,0.625000,6,7",
        '"a,b",0.500000,5,4',
        "c,,0,0",
    ]


def test_progress_counts_images_not_batches(capsys):
    class Batches:  # Scorer rows: one per batch of 4 images (one of them skipped in the last)
        def iter_rows(self):
            for scored, skipped in ((4, 0), (4, 0), (3, 1)):
                yield {"scored": scored, "problems": json.dumps([{}] * skipped)}

    rows = list(rows_by_image(Batches(), total=12))
    assert len(rows) == 3
    from rayseg.progress import Progress

    assert Progress.latest.count() == "12 of 12 images"


def test_evaluate_rejects_a_checkpoint_of_another_class_mapping(dataset):
    other = dataset["root"] / "other.pt"
    class_map = ClassMap((1, 2), (1, 3), CLASS_MAP.names, 255, "train_id")
    save_tiny_model(str(other), class_map, num_classes=CLASS_MAP.num_classes)
    cfg = EvaluateConfig(
        checkpoint=str(other), data=dataset["data"], out=str(dataset["root"] / "x")
    )
    with pytest.raises(RaysegError, match="trained on masks with values=train_id"):
        run_evaluate(cfg)
    cfg = EvaluateConfig(
        checkpoint=str(dataset["root"] / "nope"),
        data=dataset["data"],
        out=str(dataset["root"] / "x"),
    )
    with pytest.raises(RaysegError, match="no such model file"):
        run_evaluate(cfg)


def test_evaluate_without_images_fails_before_any_work(dataset, tmp_path):
    rgb, mask = dataset["good"][1]
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    storage.write_parquet(
        storage.locate(str(parquet / "part-00000.parquet")),
        storage.mask_table([sample_row(1, None, mask)], META),
    )
    cfg = EvaluateConfig(checkpoint=dataset["model"], data=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(RaysegError, match="no row carries image bytes.*--images-dir"):
        run_evaluate(cfg)
