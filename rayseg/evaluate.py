"""Evaluation: a model export or run dir + a masks Parquet folder -> mIoU, pixel accuracy.

Every image is scored at its full resolution with the same labels `rayseg predict` would write
(rayseg.infer.predict_labels), against its mask mapped to model classes (ClassMap.to_train_ids);
pixels with the ignore value are left out. One confusion matrix is summed over all images.
Output under OUT: `metrics.json` (miou, pixel_accuracy, per_class_iou by class name, the
confusion matrix, skipped rows with reasons, the resolved config), `per_class_iou.csv` and
`confusion_matrix.png`; on stdout the best and worst classes, mIoU and pixel accuracy (every
class with --verbose).

The pure core (score, metrics_from_confusion, score_images; the arithmetic is rayseg.metrics)
needs no Ray; run_evaluate runs a Ray Data pass: Parquet rows -> Scorer actors, one partial
confusion matrix per batch, summed by the driver.
"""

from __future__ import annotations

import io as pyio
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from rayseg import metrics as M
from rayseg import outputs, storage
from rayseg.cluster import check_gpus, worker_uri
from rayseg.config import EvaluateConfig, to_dict
from rayseg.errors import RaysegError
from rayseg.infer import (
    check_parquet_images,
    load_checkpoint,
    map_with_model,
    over_pixel_cap,
    predict_labels,
)
from rayseg.ingest import SampleError, decode_pair
from rayseg.models import ClassMap
from rayseg.progress import Progress
from rayseg.rayconnect import connect_ray
from rayseg.rayoutput import quiet_ray_data, verbose
from rayseg.records import Problem
from rayseg.text import plural

METRICS_NAME = "metrics.json"
CONFUSION_IMAGE_NAME = "confusion_matrix.png"


# ---- pure core -----------------------------------------------------------------------------------


def score(masks: list[np.ndarray], labels: list[np.ndarray], class_map: ClassMap) -> np.ndarray:
    """(H, W) true masks in the data's values + (H, W) predicted class indices -> (K, K) int64.

    Rows are true classes, columns predicted ones. Mask values the model has no class for count
    as background (ClassMap.to_train_ids); pixels with the ignore value are left out.
    """
    k = class_map.num_classes
    cm = np.zeros((k, k), np.int64)
    for mask, pred in zip(masks, labels, strict=True):
        if mask.shape != pred.shape:
            raise ValueError(f"shapes differ: mask {mask.shape}, prediction {pred.shape}")
        target = torch.from_numpy(class_map.to_train_ids(mask))
        cm += M.confusion_matrix(torch.from_numpy(pred), target, k).numpy()
    return cm


def metrics_from_confusion(cm: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """-> {"miou", "pixel_accuracy", "per_class_iou": {name: IoU or None}}.

    mIoU averages the classes that occur in the truth or the predictions (absent ones are None).
    """
    if int(cm.sum()) == 0:
        raise RaysegError("no scored pixels: every pixel was ignored or no image could be scored")
    summary = M.summarize(cm, names)
    miou = summary["miou"]
    return {
        "miou": None if math.isnan(miou) else miou,
        "pixel_accuracy": summary["pixel_accuracy"],
        "per_class_iou": summary["iou"],
    }


def check_class_map(
    class_map: ClassMap, meta: dict[str, Any], *, checkpoint: str, data: str
) -> None:
    """The model's class mapping must mean the same classes as the data's mask values."""
    trained, found = class_map.value_scheme, meta.get("values")
    if found != trained:
        raise RaysegError(
            f"{checkpoint}: the model was trained on masks with values={trained}, but {data} has "
            f"values={found}; score it on masks rendered with `rayseg masks --values {trained}`"
        )
    if int(meta.get("ignore_value", -1)) != class_map.ignore_value:
        raise RaysegError(
            f"{checkpoint}: the model's ignore value is {class_map.ignore_value}, but {data} "
            f"uses {meta.get('ignore_value')}"
        )
    by_value = {int(c["value"]): c for c in meta.get("classes", [])}
    for value, cat, name in zip(
        class_map.mask_values, class_map.category_ids, class_map.names[1:], strict=True
    ):
        c = by_value.get(value)
        if c is None or int(c["category_id"]) != cat:
            there = f"category {c['category_id']} ({c['name']!r})" if c else "no class"
            raise RaysegError(
                f"{checkpoint}: model class {name!r} (category {cat}) is mask value {value}, but "
                f"in {data} value {value} is {there}: the model was trained on another "
                "class mapping"
            )


def score_images(
    model,
    rows: list[dict[str, Any]],
    class_map: ClassMap,
    *,
    device: str = "cpu",
    max_pixels: int | None = None,
) -> tuple[np.ndarray, int, list[Problem]]:
    """Masks Parquet rows {"image_id", "image", "mask"} (and "height", "width" for the
    --max-pixels check) -> (confusion, images scored, problems)."""
    problems: list[Problem] = []
    images, masks = [], []
    for row in rows:
        too_big = over_pixel_cap(
            int(row.get("width") or 0), int(row.get("height") or 0), max_pixels, "scored"
        )
        if too_big:
            problems.append(Problem(too_big, image_id=int(row["image_id"])))
            continue
        try:
            image, mask = decode_pair(row.get("image"), row.get("mask"))
        except SampleError as e:
            problems.append(Problem(e.reason, image_id=int(row["image_id"])))
            continue
        images.append(image)
        masks.append(mask)
    labels = predict_labels(model, images, device=device)
    return score(masks, labels, class_map), len(images), problems


# ---- Ray Data stage ------------------------------------------------------------------------------


class Scorer:
    """Ray Data actor: loads the model once; a batch of rows -> one row, its confusion matrix."""

    def __init__(self, checkpoint: str, use_gpu: bool, max_pixels: int | None = None):
        self.device = "cuda" if use_gpu else "cpu"
        self.model, info = load_checkpoint(checkpoint, device=self.device)
        self.class_map: ClassMap = info["class_map"]
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = ("image_id", "image", "mask", "height", "width")
        rows = [
            dict(zip(keys, values, strict=True))
            for values in zip(*(batch[k] for k in keys), strict=True)
        ]
        cm, scored, problems = score_images(
            self.model, rows, self.class_map, device=self.device, max_pixels=self.max_pixels
        )
        return {
            "confusion": cm.reshape(1, -1),  # (1, K*K)
            "scored": np.array([scored]),
            "problems": np.array([json.dumps([p.to_dict() for p in problems])]),
        }


# ---- driver --------------------------------------------------------------------------------------


TABLE_NAME = "per_class_iou.csv"
SHOWN_EACH_END = 5  # the terminal shows this many best and worst classes; --verbose shows all


def per_class_rows(cm: np.ndarray, names: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """One row per class: its IoU (None where it is in neither truth nor predictions) and pixels."""
    inter = np.diag(cm)
    truth, predicted = cm.sum(axis=1), cm.sum(axis=0)
    union = truth + predicted - inter
    return [
        {
            "class": name,
            "iou": float(inter[k] / union[k]) if union[k] else None,
            "true_pixels": int(truth[k]),
            "predicted_pixels": int(predicted[k]),
        }
        for k, name in enumerate(names)
    ]


def table_csv(rows: list[dict[str, Any]]) -> str:
    """per_class_iou.csv: class,iou,true_pixels,predicted_pixels (iou empty for absent classes)."""
    lines = ["class,iou,true_pixels,predicted_pixels"]
    for r in rows:
        name = '"' + r["class"].replace('"', '""') + '"' if "," in r["class"] else r["class"]
        iou = "" if r["iou"] is None else f"{r['iou']:.6f}"
        lines.append(f"{name},{iou},{r['true_pixels']},{r['predicted_pixels']}")
    return "\n".join(lines) + "\n"


def format_table(metrics: dict[str, Any], counts: dict[str, int], *, show_all: bool = False) -> str:
    """The terminal's table: every class when there are few (or `show_all`), else the
    SHOWN_EACH_END best and worst by IoU; then mIoU, pixel accuracy and the counts."""
    ious = metrics["per_class_iou"]
    scored = sorted(((iou, n) for n, iou in ious.items() if iou is not None), reverse=True)
    width = max(12, *(len(n) for n in ious))
    row = lambda name, iou: f"{name:<{width}}  {'-' if iou is None else f'{iou:.4f}':>6}"  # noqa: E731
    lines = [f"{'class':<{width}}  {'IoU':>6}"]
    if show_all or len(ious) <= 2 * SHOWN_EACH_END + 2:
        lines += [row(n, iou) for n, iou in ious.items()]
    else:
        best, worst = scored[:SHOWN_EACH_END], scored[SHOWN_EACH_END:][-SHOWN_EACH_END:]
        lines += [row(n, iou) for iou, n in best]
        hidden = len(scored) - len(best) - len(worst)
        if hidden:
            lines.append(f"{'...':<{width}}  ({hidden} more; all in {TABLE_NAME})")
        lines += [row(n, iou) for iou, n in worst]
        absent = len(ious) - len(scored)
        if absent:
            lines.append(
                f"{plural(absent, 'class')} in neither the masks nor the predictions (IoU -)"
            )
    miou = metrics["miou"]
    lines.append(f"{'mIoU':<{width}}  {'-' if miou is None else f'{miou:.4f}':>6}")
    lines.append(f"{'pixel acc.':<{width}}  {metrics['pixel_accuracy']:.4f}")
    lines.append(
        f"{counts['scored']} of {plural(counts['rows'], 'image')} scored, "
        f"{plural(counts['pixels'], 'pixel')}"
        + (f", {counts['skipped']} skipped (listed in {METRICS_NAME})" if counts["skipped"] else "")
    )
    return "\n".join(lines)


MIN_FONT_PT = 8  # tick labels never smaller (5 pt at 81 classes was ~6 px tall)
CELL_NUMBERS_UP_TO = 20  # classes shown; above that the cells are too small for "0.97"


def classes_present(cm: np.ndarray) -> np.ndarray:
    """Indices of the classes in the truth or the predictions (a row or column with pixels)."""
    return np.flatnonzero((cm.sum(axis=0) + cm.sum(axis=1)) > 0)


def confusion_png(cm: np.ndarray, names: tuple[str, ...] | list[str], *, title: str = "") -> bytes:
    """confusion_figure as PNG bytes."""
    buf = pyio.BytesIO()
    confusion_figure(cm, names, title=title).savefig(buf, format="png")
    return buf.getvalue()


def confusion_figure(cm: np.ndarray, names: tuple[str, ...] | list[str], *, title: str = ""):
    """A row-normalised confusion matrix (each true class's share of predictions), a Figure.

    Only the classes present in the truth or the predictions are drawn, so 80 COCO classes of
    which 40 occur give a 40x40 picture; labels are at least MIN_FONT_PT, and the figure grows
    with the classes so that they fit. The title wraps onto its own lines and is never cut.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keep = classes_present(cm)
    if keep.size == 0:
        keep = np.arange(len(names))
    cm = cm[np.ix_(keep, keep)]
    shown = [names[i] for i in keep]
    k = len(shown)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    label_in = max(len(n) for n in shown) * MIN_FONT_PT * 0.6 / 72  # the longest label, inches
    side = max(4.5, 0.2 * k) + label_in + 1.8  # cells of >= 0.2 in: 8 pt labels fit
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    ticks = np.arange(k)
    size = max(MIN_FONT_PT, 10 if k <= 30 else MIN_FONT_PT)
    ax.set_xticks(ticks, labels=shown, rotation=90, fontsize=size)
    ax.set_yticks(ticks, labels=shown, fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    lines = [line for line in title.split(": ", 1) if line]
    if k < len(names):
        lines.append(f"the {k} of {len(names)} classes in the masks or the predictions")
    if lines:
        fig.suptitle("\n".join(lines), fontsize=11)
    if k <= CELL_NUMBERS_UP_TO:
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    colour = "white" if share[t, p] > 0.5 else "black"
                    ax.text(
                        p,
                        t,
                        f"{share[t, p]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=MIN_FONT_PT if k > 10 else 9,
                        color=colour,
                    )
    return fig


def sum_partials(rows, k: int) -> tuple[np.ndarray, int, list[Problem]]:
    """Scorer rows -> (the (K, K) confusion matrix, images scored, problems by image id)."""
    cm = np.zeros((k, k), np.int64)
    scored, problems = 0, []
    for row in rows:
        cm += np.asarray(row["confusion"], np.int64).reshape(k, k)
        scored += int(row["scored"])
        problems += [Problem.from_dict(p) for p in json.loads(row["problems"])]
    problems.sort(key=lambda p: p.image_id)
    return cm, scored, problems


def plot_title(metrics: dict[str, Any], model: str) -> str:
    miou = "-" if metrics["miou"] is None else f"{metrics['miou']:.3f}"
    return f"{model}: mIoU {miou}, pixel accuracy {metrics['pixel_accuracy']:.3f}"


def check_inputs(
    cfg: EvaluateConfig, class_map: ClassMap
) -> tuple[storage.Location, list[storage.Location]]:
    """(the Parquet folder, its parts), once its classes fit the model's and rows carry images."""
    parquet = storage.parquet_location(cfg.data)
    meta = storage.read_mask_meta(cfg.data)
    check_class_map(class_map, meta, checkpoint=cfg.checkpoint, data=cfg.data)
    parts = storage.parquet_files(parquet)
    check_parquet_images(parts, cfg.data)
    storage.check_mask_values(parts, meta, cfg.data)
    return parquet, parts


def score_on_ray(
    cfg: EvaluateConfig,
    parquet: storage.Location,
    parts: list[storage.Location],
    *,
    checkpoint: str,
    k: int,
) -> tuple[np.ndarray, int, list[Problem]]:
    """Parquet rows -> Scorer actors -> (the summed (K, K) confusion, images scored, problems)."""
    import ray

    connect_ray(cfg.address, cfg.num_cpus)
    check_gpus(cfg.use_gpu)
    quiet_ray_data()  # before count(), the first execution: its INFO lines stay in ray-data.log
    ds = ray.data.read_parquet([p.path for p in parts], filesystem=parquet.fs)
    total = ds.count()  # from the Parquet footers, before any scoring
    ds = ds.select_columns(["image_id", "image", "mask", "height", "width"])
    ds = map_with_model(ds, Scorer, checkpoint=worker_uri(checkpoint), cfg=cfg)
    return sum_partials(rows_by_image(ds, total=total), k)


def rows_by_image(ds: Any, *, total: int) -> Iterator[dict[str, Any]]:
    """Scorer rows (one per batch) with a Progress of images done, as predict shows."""
    progress = Progress(total, "evaluate")
    try:
        for row in ds.iter_rows():
            progress.update(int(row["scored"]) + len(json.loads(row["problems"])))
            yield row
    finally:
        progress.close()


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    start = time.monotonic()
    _, info = load_checkpoint(cfg.checkpoint)
    class_map: ClassMap = info["class_map"]
    parquet, parts = check_inputs(cfg, class_map)
    out = storage.locate(cfg.out)
    storage.check_writable(out)
    outputs.claim(
        out,
        "evaluate",
        writes=(METRICS_NAME, CONFUSION_IMAGE_NAME, TABLE_NAME),
        overwrite=cfg.overwrite,
    )

    cm, scored, problems = score_on_ray(
        cfg, parquet, parts, checkpoint=info["source"], k=class_map.num_classes
    )
    if scored == 0:
        first = f"{problems[0].image_id}: {problems[0].reason}" if problems else "-: no rows"
        raise RaysegError(f"{cfg.data}: no image could be scored (first: image {first})")
    counts = {
        "rows": scored + len(problems),
        "scored": scored,
        "skipped": len(problems),
        "pixels": int(cm.sum()),
    }
    metrics = metrics_from_confusion(cm, class_map.names)
    per_class = per_class_rows(cm, class_map.names)
    report = {
        **metrics,
        "per_class": per_class,
        "counts": counts,
        "class_names": list(class_map.names),
        "confusion_matrix": cm.tolist(),  # rows: true class, columns: predicted class
        "skipped": [p.to_dict() for p in problems],
        "checkpoint": info["source"],
        "model": info["model"],
        "data": parquet.uri,
        "seconds": round(time.monotonic() - start, 2),
        "config": to_dict(cfg),
    }
    storage.write_json(out.join(METRICS_NAME), report)
    storage.write_bytes(
        out.join(CONFUSION_IMAGE_NAME),
        confusion_png(cm, class_map.names, title=plot_title(metrics, info["model"])),
    )
    storage.write_bytes(out.join(TABLE_NAME), table_csv(per_class).encode())
    print(format_table(metrics, counts, show_all=verbose()))
    print(
        f"evaluate: wrote {out.join(METRICS_NAME).uri}, {out.join(TABLE_NAME).uri} and "
        f"{out.join(CONFUSION_IMAGE_NAME).uri}"
    )
    return report
