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


def tiny_coco() -> dict:
    """5 images of 20x20 (+ one 30x10): polygons, multi-part, crowd RLE, compressed RLE, empty."""
    crowd = np.zeros((20, 20), np.uint8)
    crowd[5:10, 3:7] = 1  # 5 rows x 4 cols = 20 pixels
    compressed = np.zeros((20, 20), np.uint8, order="F")
    compressed[0:4, 0:5] = 1  # 20 pixels
    rle = mask_utils.encode(np.asfortranarray(compressed))
    rle["counts"] = rle["counts"].decode()
    images = [
        {"id": 1, "file_name": "000000000001.jpg", "height": 20, "width": 20},
        {"id": 2, "file_name": "000000000002.jpg", "height": 20, "width": 20},
        {"id": 3, "file_name": "000000000003.jpg", "height": 20, "width": 20},
        {"id": 4, "file_name": "000000000004.jpg", "height": 20, "width": 20},
        {"id": 5, "file_name": "000000000005.jpg", "height": 10, "width": 30},
    ]
    anns = [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": [square(2, 2, 12, 12)],
            "area": 100.0,
            "bbox": [2, 2, 10, 10],
        },
        {
            "id": 20,
            "image_id": 2,
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": [square(0, 0, 4, 4), square(10, 10, 14, 14)],
            "area": 32.0,
            "bbox": [0, 0, 14, 14],
        },
        {
            "id": 21,
            "image_id": 2,
            "category_id": 7,
            "iscrowd": 0,
            "segmentation": [square(2, 2, 12, 12)],
            "area": 100.0,
            "bbox": [2, 2, 10, 10],
        },
        {
            "id": 30,
            "image_id": 3,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": uncompressed_rle(crowd),
            "area": 20.0,
            "bbox": [3, 5, 4, 5],
        },
        {
            "id": 31,
            "image_id": 3,
            "category_id": 3,
            "iscrowd": 0,
            "segmentation": rle,
            "area": 20.0,
            "bbox": [0, 0, 5, 4],
        },
        {
            "id": 50,
            "image_id": 5,
            "category_id": 7,
            "iscrowd": 0,
            "segmentation": [square(1, 1, 21, 6)],
            "area": 100.0,
            "bbox": [1, 1, 20, 5],
        },
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
