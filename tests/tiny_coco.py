"""Tiny COCO fixtures, small enough to count by hand (imported by several test modules)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 7, "name": "train", "supercategory": "vehicle"},
]


def square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO ground-truth crowd format: counts is a list of ints, column-major."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def pixel_counts(mask: np.ndarray) -> dict[int, int]:
    """Mask value -> number of pixels with it."""
    values, n = np.unique(mask, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, n, strict=True)}


def annotation(
    ann_id: int, image_id: int, category_id: int, segmentation, area: float, bbox: list[int]
) -> dict:
    """One COCO annotation record; a segmentation dict with list counts is a crowd."""
    iscrowd = int(isinstance(segmentation, dict) and isinstance(segmentation["counts"], list))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "segmentation": segmentation,
        "area": area,
        "bbox": bbox,
    }


def tiny_coco() -> dict:
    """5 images of 20x20 (+ one 30x10): polygons, multi-part, crowd RLE, compressed RLE, empty."""
    crowd = np.zeros((20, 20), np.uint8)
    crowd[5:10, 3:7] = 1  # 5 rows x 4 cols = 20 pixels
    compressed = np.zeros((20, 20), np.uint8, order="F")
    compressed[0:4, 0:5] = 1  # 20 pixels
    rle = mask_utils.encode(np.asfortranarray(compressed))
    rle["counts"] = rle["counts"].decode()
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "height": 20, "width": 20} for i in range(1, 5)
    ]
    images.append({"id": 5, "file_name": "000000000005.jpg", "height": 10, "width": 30})
    anns = [
        annotation(10, 1, 1, [square(2, 2, 12, 12)], 100.0, [2, 2, 10, 10]),
        annotation(20, 2, 3, [square(0, 0, 4, 4), square(10, 10, 14, 14)], 32.0, [0, 0, 14, 14]),
        annotation(21, 2, 7, [square(2, 2, 12, 12)], 100.0, [2, 2, 10, 10]),
        annotation(30, 3, 1, uncompressed_rle(crowd), 20.0, [3, 5, 4, 5]),
        annotation(31, 3, 3, rle, 20.0, [0, 0, 5, 4]),
        annotation(50, 5, 7, [square(1, 1, 21, 6)], 100.0, [1, 1, 20, 5]),
    ]
    return {
        "info": {"description": "tiny"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": CATEGORIES,
    }


def write_coco(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_images(images_dir: Path, data: dict) -> Path:
    import cv2

    images_dir.mkdir(parents=True, exist_ok=True)
    for im in data["images"]:
        rng = np.random.default_rng(im["id"])
        pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        cv2.imwrite(str(images_dir / im["file_name"]), pixels)
    return images_dir


# Big masks keep a 20-image shard busy for a few tenths of a second, so a test can catch one
# mid-flight.
WIDTH, HEIGHT = 1600, 1200


def write_big_coco(path: Path, num_images: int) -> Path:
    """Large images with three triangles each (categories 1-3): cheap to make, slow to render
    (the fault and signal tests catch a shard mid-flight)."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": WIDTH, "height": HEIGHT}
        )
        for category_id in (1, 2, 3):
            x0, y0 = rng.uniform(0, WIDTH / 2), rng.uniform(0, HEIGHT / 2)
            x1 = x0 + rng.uniform(WIDTH / 8, WIDTH / 2)
            y1 = y0 + rng.uniform(HEIGHT / 8, HEIGHT / 2)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, (x0 + x1) / 2, y1]],
                    "area": (x1 - x0) * (y1 - y0) / 2,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                }
            )
    categories = [{"id": c, "name": f"class{c}", "supercategory": "shape"} for c in (1, 2, 3)]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path
