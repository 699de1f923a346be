"""Synthetic COCO dataset: coloured, textured shapes on a noisy background, for demos and tests.

make_dataset(num_images, *, seed, width, height) -> (COCO instances dict, BGR uint8 images), pure.
run_synth(cfg) writes OUT/images/<12-digit id>.jpg and OUT/annotations.json (atomically) and returns
a summary. Every class is one shape with one hue and one texture, so a small CNN learns it quickly.

Each object's pixels are exactly the pycocotools rasterization of its own segmentation, painted in
ascending category id, and annotations are listed in that paint order: a semantic mask rendered with
overlap "max" or "last" reproduces the drawn pixels. The data covers every COCO segmentation form:
polygons, multi-part polygons (bottle), compressed RLE (dog, a ring: polygons cannot hold a hole),
uncompressed-RLE crowds (a cluster of people), overlaps, gapped category ids and empty images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
from pycocotools import mask as mask_utils

from rayseg.config import SynthConfig
from rayseg.errors import RaysegError
from rayseg.storage import locate, write_bytes

# Real COCO ids and names, so the id gaps match the real file's.
CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 7, "name": "train", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 44, "name": "bottle", "supercategory": "kitchen"},
)

# OpenCV hue (0..179) per category: red, green, blue, yellow, magenta.
CATEGORY_HUES: dict[int, int] = {1: 0, 3: 60, 7: 120, 18: 30, 44: 150}

CROWD_EVERY = 8  # images 0, 8, 16, ... hold one crowd
EMPTY_EVERY = 16  # images 1, 17, 33, ... hold no objects
JPEG_QUALITY = 95

Polygon = np.ndarray  # (N, 2) float x, y in COCO's continuous pixel frame


def make_dataset(
    num_images: int, *, seed: int, width: int, height: int
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """COCO instances dict and the matching (height, width, 3) BGR images, deterministic per seed.

    Image i depends only on (seed, i), so the first k images are the same for any num_images >= k.
    """
    images: list[np.ndarray] = []
    image_records: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        image_id = index + 1
        rng = np.random.default_rng([seed, index])
        pixels, objects = make_image(index, rng, width=width, height=height)
        images.append(pixels)
        image_records.append(
            {
                "id": image_id,
                "file_name": f"{image_id:012d}.jpg",
                "width": width,
                "height": height,
                "license": 1,
            }
        )
        for obj in objects:
            obj.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(obj)
    coco = {
        "info": {
            "description": f"rayseg synthetic shapes (seed {seed})",
            "version": "1.0",
            "year": 2017,
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
        "images": image_records,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    return coco, images


def make_image(
    index: int, rng: np.random.Generator, *, width: int, height: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One noisy image and its annotation records (without id / image_id), in paint order."""
    image = noisy_background(rng, height=height, width=width)
    category_ids = choose_categories(index, rng)
    scale = min(width, height) / 120
    objects = []
    for category_id in category_ids:
        segmentation = SHAPES[category_id](rng, width=width, height=height, scale=scale)
        objects.append(
            object_record(category_id, segmentation, iscrowd=0, height=height, width=width)
        )
    if index % CROWD_EVERY == 0 and index % EMPTY_EVERY != 1:
        crowd = crowd_mask(rng, width=width, height=height, scale=scale)
        segmentation = encode_uncompressed_rle(crowd)
        objects.append(object_record(1, segmentation, iscrowd=1, height=height, width=width))
    objects.sort(key=lambda o: o["category_id"])  # stable: the crowd stays after its own class
    for obj in objects:
        mask = decode_segmentation(obj["segmentation"], height=height, width=width)
        paint(image, mask, texture(obj["category_id"], rng, height=height, width=width))
    return image, objects


def choose_categories(index: int, rng: np.random.Generator) -> list[int]:
    """Image 0 holds every class, so tiny datasets cover every form; some images are empty."""
    ids = [c["id"] for c in CATEGORIES]
    if index == 0:
        return ids
    if index % EMPTY_EVERY == 1:
        return []
    return [int(c) for c in rng.choice(ids, size=int(rng.integers(2, 6)))]


def object_record(
    category_id: int, segmentation: Any, *, iscrowd: int, height: int, width: int
) -> dict[str, Any]:
    rle = to_rle(segmentation, height=height, width=width)
    return {
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "iscrowd": iscrowd,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "category_id": category_id,
    }


# ---- shapes: each returns a COCO segmentation (polygon list or RLE dict) ----


def disc(rng: np.random.Generator, *, width: int, height: int, scale: float) -> list[list[float]]:
    radius = rng.uniform(8, 20) * scale
    return [flat(regular_polygon(center(rng, radius, width, height), radius, 24, 0.0))]


def striped_square(
    rng: np.random.Generator, *, width: int, height: int, scale: float
) -> list[list[float]]:
    half_diagonal = rng.uniform(11, 24) * scale
    angle = rng.uniform(0, np.pi / 2)
    return [
        flat(regular_polygon(center(rng, half_diagonal, width, height), half_diagonal, 4, angle))
    ]


def triangle(
    rng: np.random.Generator, *, width: int, height: int, scale: float
) -> list[list[float]]:
    radius = rng.uniform(11, 24) * scale
    angle = rng.uniform(0, 2 * np.pi)
    return [flat(regular_polygon(center(rng, radius, width, height), radius, 3, angle))]


def ring(rng: np.random.Generator, *, width: int, height: int, scale: float) -> dict[str, Any]:
    outer = rng.uniform(11, 20) * scale
    xy = center(rng, outer, width, height)
    outer_mask = polygon_mask([flat(regular_polygon(xy, outer, 32, 0.0))], height, width)
    inner_mask = polygon_mask([flat(regular_polygon(xy, outer * 0.55, 32, 0.0))], height, width)
    return encode_compressed_rle(outer_mask & ~inner_mask)


def bars(rng: np.random.Generator, *, width: int, height: int, scale: float) -> list[list[float]]:
    """Two or three parallel bars: one object in several parts."""
    count = int(rng.integers(2, 4))
    length, thickness, gap = rng.uniform(16, 32) * scale, rng.uniform(4, 6) * scale, 4 * scale
    angle = rng.uniform(0, np.pi)
    along = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-along[1], along[0]])
    span = count * thickness + (count - 1) * gap
    middle = center(rng, float(np.hypot(length, span)) / 2, width, height)
    parts = []
    for k in range(count):
        offset = -span / 2 + k * (thickness + gap)
        near = middle + across * offset
        far = near + across * thickness
        corners = [
            near - along * length / 2,
            near + along * length / 2,
            far + along * length / 2,
            far - along * length / 2,
        ]
        parts.append(flat(np.array(corners)))
    return parts


SHAPES: dict[int, Callable[..., Any]] = {
    1: disc,
    3: striped_square,
    7: triangle,
    18: ring,
    44: bars,
}


def crowd_mask(rng: np.random.Generator, *, width: int, height: int, scale: float) -> np.ndarray:
    """A cluster of small people, annotated as one crowd region."""
    middle = center(rng, 20 * scale, width, height)
    polygons = []
    for _ in range(int(rng.integers(4, 8))):
        radius = rng.uniform(3, 6) * scale
        polygons.append(
            flat(regular_polygon(middle + rng.uniform(-14, 14, 2) * scale, radius, 16, 0.0))
        )
    return polygon_mask(polygons, height, width)


def center(rng: np.random.Generator, radius: float, width: int, height: int) -> np.ndarray:
    """A centre keeping a shape of this radius inside the image (when the image allows)."""
    lo = np.minimum([radius, radius], [width / 2, height / 2])
    hi = np.array([width, height]) - lo
    return rng.uniform(lo, hi)


def regular_polygon(xy: np.ndarray, radius: float, sides: int, angle: float) -> Polygon:
    theta = angle + np.arange(sides) * (2 * np.pi / sides)
    return xy + radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)


def flat(polygon: Polygon) -> list[float]:
    """COCO's [x0, y0, x1, y1, ...] with 2 decimals, the same numbers the JSON will hold."""
    return [round(float(v), 2) for v in polygon.ravel()]


# ---- masks and RLE ----


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def encode_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO crowd RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    height, width = mask.shape
    pixels = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [pixels.size])))
    if pixels[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [height, width], "counts": [int(c) for c in counts]}


def encode_compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def to_rle(segmentation: Any, *, height: int, width: int) -> dict[str, Any]:
    """pycocotools RLE for any COCO segmentation form (polygons, uncompressed or compressed RLE)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}


def decode_segmentation(segmentation: Any, *, height: int, width: int) -> np.ndarray:
    return mask_utils.decode(to_rle(segmentation, height=height, width=width)).astype(bool)


# ---- pixels ----


def noisy_background(rng: np.random.Generator, *, height: int, width: int) -> np.ndarray:
    """Grey-ish noise: low saturation, so no background pixel passes for a class colour."""
    hsv = np.empty((height, width, 3), np.float32)
    hsv[..., 0] = rng.uniform(0, 180)
    hsv[..., 1] = rng.uniform(0, 40, (height, width))
    hsv[..., 2] = rng.uniform(60, 190) + rng.normal(0, 25, (height, width))
    return hsv_to_bgr(hsv)


def texture(category_id: int, rng: np.random.Generator, *, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) BGR texture of one class: its fixed hue and its own pattern."""
    yy, xx = np.mgrid[0:height, 0:width]
    if category_id == 3:  # horizontal stripes
        value = np.where((yy // 3) % 2 == 0, 235, 120)
    elif category_id == 7:  # checkerboard
        value = np.where(((yy // 4) + (xx // 4)) % 2 == 0, 230, 140)
    elif category_id == 44:  # diagonal stripes
        value = np.where(((xx + yy) // 3) % 2 == 0, 235, 150)
    else:  # person, dog: plain
        value = np.full((height, width), 215)
    hsv = np.empty((height, width, 3), np.float32)
    hsv[..., 0] = CATEGORY_HUES[category_id]
    hsv[..., 1] = rng.uniform(200, 255, (height, width))
    hsv[..., 2] = value + rng.normal(0, 8, (height, width))
    return hsv_to_bgr(hsv)


def hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR)


def paint(image: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> None:
    image[mask] = pattern[mask]


# ---- files ----


def run_synth(cfg: SynthConfig) -> dict[str, Any]:
    """Write the dataset under cfg.out; return where it went and what it holds."""
    for name in ("num_images", "width", "height"):
        if getattr(cfg, name) < 1:
            raise RaysegError(f"'{name}' is {getattr(cfg, name)}, expected a positive integer")
    coco, images = make_dataset(cfg.num_images, seed=cfg.seed, width=cfg.width, height=cfg.height)
    out = Path(cfg.out)
    images_dir = out / "images"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaysegError(f"cannot create {images_dir} ({e.strerror or e})") from None
    annotations_path = out / "annotations.json"
    try:
        for record, pixels in zip(coco["images"], images, strict=True):
            write_bytes(locate(str(images_dir / record["file_name"])), encode_jpeg(pixels))
        write_bytes(locate(str(annotations_path)), msgspec.json.encode(coco))
    except OSError as e:
        raise RaysegError(f"cannot write under {out} ({e.strerror or e})") from None
    summary = summarize(coco, out=out, images_dir=images_dir, annotations_path=annotations_path)
    print(
        f"synth: wrote {len(coco['images'])} images to {images_dir} and "
        f"{len(coco['annotations'])} annotations to {annotations_path}"
    )
    return summary


def encode_jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RaysegError(f"OpenCV could not encode a {image.shape} image as JPEG")
    return data.tobytes()


def summarize(
    coco: dict[str, Any], *, out: Path, images_dir: Path, annotations_path: Path
) -> dict[str, Any]:
    anns = coco["annotations"]
    annotated = {a["image_id"] for a in anns}
    return {
        "out": str(out),
        "images_dir": str(images_dir),
        "annotations": str(annotations_path),
        "num_images": len(coco["images"]),
        "num_annotations": len(anns),
        "num_crowd": sum(a["iscrowd"] for a in anns),
        "num_empty_images": sum(1 for i in coco["images"] if i["id"] not in annotated),
        "categories": {c["id"]: c["name"] for c in coco["categories"]},
    }
