"""The minimal mask pipeline: the external per-core baseline for rayseg's render task (issue 10).

    render_minimal(images, anns_by_image, out_dir) -> int      masks written
    render_masks(images, anns_by_image) -> list[np.ndarray]    the same masks, in memory
    encode_only(masks) -> float                                seconds to PNG-encode them
    group_by_image(data) -> dict[int, list[dict]]              annotations per image id

images: COCO image dicts (id, file_name, height, width); anns_by_image: image id -> COCO annotation
dicts (category_id, segmentation, ...), as parsed by json or msgspec. One process, no checks: each
polygon is filled with cv2.fillPoly (value category_id) inside its own bounding-box window and
np.maximum-ed into the mask there; crowd RLEs are decoded by pycocotools (np.maximum, full image);
the uint8 mask is PNG-encoded by cv2 (zlib RLE strategy, no filter) and written with open/write to
OUT/<stem>.png. No histogram, no Parquet, no problems, no atomic rename.

    python bench/minimal.py --images 2000     # standalone: images/s on the render preset
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
from pycocotools import mask as mask_utils

PNG_PARAMS = [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
    PNG_PARAMS += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def group_by_image(data: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        groups[ann["image_id"]].append(ann)
    return groups


def mask_of(height: int, width: int, anns: list[dict[str, Any]]) -> np.ndarray:
    """(height, width) uint8 mask: the max category_id over each pixel's objects."""
    mask = np.zeros((height, width), np.uint8)
    for ann in anns:
        value = ann["category_id"]
        seg = ann["segmentation"]
        if isinstance(seg, dict):
            compressed = not isinstance(seg["counts"], list)
            rle = seg if compressed else mask_utils.frPyObjects(seg, height, width)
            np.maximum(mask, mask_utils.decode(rle) * np.uint8(value), out=mask)
            continue
        for poly in seg:
            points = np.asarray(poly, np.float64).reshape(-1, 2)
            low = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
            high = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, (width, height))
            if (high <= low).any():
                continue
            window = np.zeros((high[1] - low[1], high[0] - low[0]), np.uint8)
            cv2.fillPoly(window, [np.round(points - low).astype(np.int32)], int(value))
            region = mask[low[1] : high[1], low[0] : high[0]]
            np.maximum(region, window, out=region)
    return mask


def render_masks(
    images: list[dict[str, Any]], anns_by_image: dict[int, list[dict[str, Any]]]
) -> list[np.ndarray]:
    return [mask_of(im["height"], im["width"], anns_by_image.get(im["id"], [])) for im in images]


def render_minimal(
    images: list[dict[str, Any]],
    anns_by_image: dict[int, list[dict[str, Any]]],
    out_dir: str | Path,
    encode: Callable[[np.ndarray], bytes] | None = None,
) -> int:
    """Fill, encode and write one PNG per image under out_dir; returns the number written.

    encode: mask -> PNG bytes in place of cv2.imencode (to tell the encoder's share apart)."""
    os.makedirs(out_dir, exist_ok=True)
    for im in images:
        mask = mask_of(im["height"], im["width"], anns_by_image.get(im["id"], []))
        buf = cv2.imencode(".png", mask, PNG_PARAMS)[1] if encode is None else encode(mask)
        with open(os.path.join(out_dir, Path(im["file_name"]).stem + ".png"), "wb") as f:
            f.write(buf)
    return len(images)


def encode_only(masks: list[np.ndarray]) -> float:
    """Seconds to PNG-encode `masks` with the minimal pipeline's settings."""
    start = time.perf_counter()
    for mask in masks:
        cv2.imencode(".png", mask, PNG_PARAMS)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from make_coco import DATA_DIR, ensure_preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images of the render preset")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    data = msgspec.json.decode(ensure_preset("render").read_bytes())
    images, groups = data["images"][: args.images], group_by_image(data)
    with tempfile.TemporaryDirectory(dir=DATA_DIR) as out:
        best = min(_timed(render_minimal, images, groups, out) for _ in range(args.repeats))
    encode = encode_only(render_masks(images, groups))
    print(
        f"minimal pipeline: {len(images) / best:.1f} images/s ({1e3 * best / len(images):.2f} "
        f"ms/image, of which PNG encode {1e3 * encode / len(images):.2f} ms), best of "
        f"{args.repeats}; load average {os.getloadavg()[0]:.1f}"
    )
    return 0


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
