"""Write a COCO-shaped instances file of N synthetic images, fast, for the benchmarks.

    python bench/make_coco.py --preset train2017   # 118,287 images, 860,001 annotations, ~450 MB
    python bench/make_coco.py --preset render      # 8,000 images, ~58k annotations
    python bench/make_coco.py --num-images 1000000 # ~3.8 GB (bench/driver_bench.py's large size)

Images are mostly 640x480 (some portrait / 640x427), annotations ~Poisson(7.27) per image with
COCO's 80 real category ids (1..90 with gaps), star-shaped polygons of 8-60 vertices with 2-decimal
coordinates (some objects in several parts), and ~1% crowds as uncompressed RLE. Geometry is built
with numpy a chunk of images at a time and each chunk's JSON is encoded by msgspec and streamed to a
temporary file that is renamed into place, so memory stays far below the file size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "_data"

# Real train2017: 118,287 images, 860,001 annotations, 448 MB.
PRESETS: dict[str, dict[str, Any]] = {
    "render": {"num_images": 8000, "num_annotations": 58_160, "name": "instances_render8k.json"},
    "train2017": {
        "num_images": 118_287,
        "num_annotations": 860_001,
        "name": "instances_train2017_like.json",
    },
}

# COCO's 80 thing classes by their real ids and supercategories; ids 12, 26, 29, 30, 45, 66, 68,
# 69, 71, 83 are unused.
_CATEGORIES_BY_SUPERCATEGORY = {
    "person": "1 person",
    "vehicle": "2 bicycle, 3 car, 4 motorcycle, 5 airplane, 6 bus, 7 train, 8 truck, 9 boat",
    "outdoor": "10 traffic light, 11 fire hydrant, 13 stop sign, 14 parking meter, 15 bench",
    "animal": (
        "16 bird, 17 cat, 18 dog, 19 horse, 20 sheep, 21 cow, 22 elephant, 23 bear, 24 zebra, "
        "25 giraffe"
    ),
    "accessory": "27 backpack, 28 umbrella, 31 handbag, 32 tie, 33 suitcase",
    "sports": (
        "34 frisbee, 35 skis, 36 snowboard, 37 sports ball, 38 kite, 39 baseball bat, "
        "40 baseball glove, 41 skateboard, 42 surfboard, 43 tennis racket"
    ),
    "kitchen": "44 bottle, 46 wine glass, 47 cup, 48 fork, 49 knife, 50 spoon, 51 bowl",
    "food": (
        "52 banana, 53 apple, 54 sandwich, 55 orange, 56 broccoli, 57 carrot, 58 hot dog, "
        "59 pizza, 60 donut, 61 cake"
    ),
    "furniture": "62 chair, 63 couch, 64 potted plant, 65 bed, 67 dining table, 70 toilet",
    "electronic": "72 tv, 73 laptop, 74 mouse, 75 remote, 76 keyboard, 77 cell phone",
    "appliance": "78 microwave, 79 oven, 80 toaster, 81 sink, 82 refrigerator",
    "indoor": (
        "84 book, 85 clock, 86 vase, 87 scissors, 88 teddy bear, 89 hair drier, 90 toothbrush"
    ),
}
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = tuple(
    sorted(
        (int(number), name, supercategory)
        for supercategory, entries in _CATEGORIES_BY_SUPERCATEGORY.items()
        for number, name in (entry.split(" ", 1) for entry in entries.split(", "))
    )
)

# (width, height) and how often; COCO is mostly 640x480 landscape.
IMAGE_SIZES = np.array([(640, 480), (480, 640), (640, 427), (427, 640)])
IMAGE_SIZE_P = np.array([0.55, 0.15, 0.22, 0.08])

CROWD_FRACTION = 0.01
PART_COUNT_P = np.array([0.92, 0.06, 0.02])  # 1, 2 or 3 polygons per object
MIN_VERTICES, MAX_VERTICES = 8, 60
VERTEX_MEDIAN = 21.0  # tuned so the train2017 preset lands near real train2017's 448 MB
IMAGES_PER_CHUNK = 4000
# Ids are drawn without replacement from ranges like real COCO's; files larger than COCO (the
# driver bench's 1M images) draw from twice their size instead.
IMAGE_ID_RANGE, ANNOTATION_ID_RANGE = 581_929, 2_300_000
CROWD_ID_BASE = 900_100_000_000  # real COCO crowd ids are 9001 followed by the 8-digit image id


def category_probabilities(num: int) -> np.ndarray:
    """Person ~25% of objects, the rest falling off like COCO's long tail."""
    weights = 1.0 / np.arange(1, num + 1) ** 0.8
    weights[0] = weights[1:].sum() / 3
    return weights / weights.sum()


def make_images(rng: np.random.Generator, num_images: int) -> list[dict[str, Any]]:
    population = max(IMAGE_ID_RANGE, 2 * num_images)
    ids = np.sort(rng.choice(population, size=num_images, replace=False) + 1)
    rng.shuffle(ids)
    sizes = IMAGE_SIZES[rng.choice(len(IMAGE_SIZES), size=num_images, p=IMAGE_SIZE_P)]
    licenses = rng.integers(1, 9, num_images)
    days = rng.integers(0, 365, num_images)
    seconds = rng.integers(0, 86_400, num_images)
    farm = rng.integers(1, 10, (num_images, 3)) * np.array([1, 1000, 1_000_000_000])
    records = []
    for i, (image_id, (width, height), lic, day, sec, f) in enumerate(
        zip(
            ids.tolist(),
            sizes.tolist(),
            licenses.tolist(),
            days.tolist(),
            seconds.tolist(),
            farm.tolist(),
            strict=True,
        )
    ):
        name = f"{image_id:012d}.jpg"
        records.append(
            {
                "license": lic,
                "file_name": name,
                "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                "height": height,
                "width": width,
                "date_captured": f"2013-{1 + day // 31:02d}-{1 + day % 28:02d} "
                f"{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}",
                "flickr_url": f"http://farm{f[0]}.staticflickr.com/{f[1] + i % 997}/"
                f"{f[2] + image_id}_{image_id % 65536:04x}a1b2c3_z.jpg",
                "id": image_id,
            }
        )
    return records


def annotation_counts(rng: np.random.Generator, num_images: int, total: int) -> np.ndarray:
    """Per-image counts summing exactly to `total`: multinomial over images, i.e. ~Poisson."""
    return rng.multinomial(total, np.full(num_images, 1.0 / num_images))


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)


def polygon_vertices(
    rng: np.random.Generator,
    centers: np.ndarray,
    radii: np.ndarray,
    aspect: np.ndarray,
    sizes: np.ndarray,
    num_vertices: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Star-shaped polygons: angles increasing around each centre, radius jittered per vertex.

    centers (P, 2), radii (P,), aspect (P,), sizes (P, 2) = image (width, height) per polygon.
    Returns x, y of all vertices, polygon after polygon.
    """
    owner = np.repeat(np.arange(len(num_vertices)), num_vertices)
    steps = rng.exponential(size=owner.size)
    totals = np.add.reduceat(steps, segment_starts(num_vertices))
    within = np.cumsum(steps) - np.repeat(
        np.cumsum(steps)[segment_starts(num_vertices)], num_vertices
    )
    angle = 2 * np.pi * within / totals[owner] + np.repeat(
        rng.uniform(0, 2 * np.pi, len(radii)), num_vertices
    )
    radius = radii[owner] * rng.uniform(0.6, 1.15, owner.size)
    x = centers[owner, 0] + radius * np.cos(angle) * aspect[owner]
    y = centers[owner, 1] + radius * np.sin(angle) / aspect[owner]
    x = np.round(np.clip(x, 0, sizes[owner, 0]), 2)
    y = np.round(np.clip(y, 0, sizes[owner, 1]), 2)
    return x, y


def shoelace_areas(x: np.ndarray, y: np.ndarray, num_vertices: np.ndarray) -> np.ndarray:
    starts = segment_starts(num_vertices)
    nxt = np.arange(1, x.size + 1)
    nxt[starts + num_vertices - 1] = starts  # each polygon closes back on its first vertex
    return np.abs(np.add.reduceat(x * y[nxt] - x[nxt] * y, starts)) / 2


def crowd_rle(
    rng: np.random.Generator, width: int, height: int
) -> tuple[dict[str, Any], float, list[float]]:
    """An elliptical blob as uncompressed RLE (column-major: one run of ones per column)."""
    rx = rng.uniform(0.08, 0.4) * width
    ry = rng.uniform(0.08, 0.4) * height
    cx, cy = rng.uniform(rx, width - rx), rng.uniform(ry, height - ry)
    cols = np.arange(int(np.ceil(cx - rx)), int(cx + rx))
    half = ry * np.sqrt(np.clip(1 - ((cols + 0.5 - cx) / rx) ** 2, 0, 1))
    top = np.clip(np.round(cy - half * rng.uniform(0.8, 1.0, cols.size)), 0, height - 1).astype(
        np.int64
    )
    bottom = np.clip(
        np.round(cy + half * rng.uniform(0.8, 1.0, cols.size)), top + 1, height
    ).astype(np.int64)
    starts, ends = cols * height + top, cols * height + bottom
    zeros = starts - np.concatenate(([0], ends[:-1]))
    runs = np.stack([zeros, ends - starts], axis=1).ravel()
    counts = np.concatenate((runs, [width * height - ends[-1]])).tolist()
    bbox = [float(cols[0]), float(top.min()), float(cols.size), float(bottom.max() - top.min())]
    return {"counts": counts, "size": [height, width]}, float((ends - starts).sum()), bbox


def make_annotations(
    rng: np.random.Generator,
    images: list[dict[str, Any]],
    counts: np.ndarray,
    ann_ids: np.ndarray,
    category_ids: np.ndarray,
    category_p: np.ndarray,
) -> list[dict[str, Any]]:
    """Annotation records for one chunk of images, not grouped by image (like real files)."""
    image_ids = np.array([img["id"] for img in images])
    sizes = np.array([(img["width"], img["height"]) for img in images], dtype=np.float64)
    owner = np.repeat(np.arange(len(images)), counts)  # image index per annotation
    n = owner.size
    first = segment_starts(counts)[counts > 0]
    # At most one crowd per image (its id is derived from the image id), on ~1% of annotations.
    crowd = np.zeros(n, bool)
    crowd[first[rng.random(first.size) < CROWD_FRACTION * n / max(first.size, 1)]] = True
    cats = rng.choice(category_ids, size=n, p=category_p)
    heads = {"image_id": image_ids[owner].tolist(), "category_id": cats.tolist()}
    polygons = polygon_parts(rng, sizes[owner], np.flatnonzero(~crowd))
    records = polygon_records(n, *polygons, ids=ann_ids.tolist(), heads=heads)
    for a in np.flatnonzero(crowd).tolist():
        width, height = sizes[owner[a]].astype(int).tolist()
        rle, area, bbox = crowd_rle(rng, width, height)
        image_id = heads["image_id"][a]
        records[a] = {
            "segmentation": rle,
            "area": area,
            "iscrowd": 1,
            "image_id": image_id,
            "bbox": bbox,
            "category_id": heads["category_id"][a],
            "id": CROWD_ID_BASE + image_id,
        }
    order = rng.permutation(n)
    return [records[i] for i in order.tolist()]


def polygon_parts(
    rng: np.random.Generator, ann_sizes: np.ndarray, poly_ann: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The polygons of annotations `poly_ann`: 1-3 parts each, the later ones beside the first.

    ann_sizes (N, 2) = image (width, height) per annotation. Returns poly_ann, parts per
    annotation, the annotation of each polygon, x and y of all vertices, vertices per polygon.
    """
    n = len(ann_sizes)
    parts = rng.choice(3, size=poly_ann.size, p=PART_COUNT_P) + 1
    poly_owner = np.repeat(poly_ann, parts)  # annotation index per polygon
    is_first_part = np.ones(poly_owner.size, bool)
    is_first_part[1:] = poly_owner[1:] != poly_owner[:-1]
    img_size = ann_sizes[poly_owner]
    ann_radius = np.exp(rng.uniform(np.log(4), np.log(0.3 * ann_sizes.min(axis=1))))
    ann_center = rng.uniform(0, 1, (n, 2)) * ann_sizes
    radius = ann_radius[poly_owner] * np.where(
        is_first_part, 1.0, rng.uniform(0.3, 0.7, poly_owner.size)
    )
    direction = rng.uniform(0, 2 * np.pi, poly_owner.size)
    offset = np.where(
        is_first_part, 0.0, ann_radius[poly_owner] * rng.uniform(1.0, 1.6, poly_owner.size)
    )
    center = ann_center[poly_owner] + offset[:, None] * np.stack(
        [np.cos(direction), np.sin(direction)], 1
    )
    center = np.clip(center, 0, img_size)
    aspect = np.exp(rng.uniform(-0.5, 0.5, n))[poly_owner]
    num_vertices = np.clip(
        np.round(rng.lognormal(np.log(VERTEX_MEDIAN), 0.45, poly_owner.size)),
        MIN_VERTICES,
        MAX_VERTICES,
    ).astype(np.int64)
    x, y = polygon_vertices(rng, center, radius, aspect, img_size, num_vertices)
    return poly_ann, parts, poly_owner, x, y, num_vertices


def polygon_records(
    n: int,
    poly_ann: np.ndarray,
    parts: np.ndarray,
    poly_owner: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    num_vertices: np.ndarray,
    *,
    ids: list[int],
    heads: dict[str, list[int]],
) -> list[dict[str, Any]]:
    """n record slots, the polygon annotations' filled in (area, bbox from their vertices)."""
    areas = np.zeros(n)
    np.add.at(areas, poly_owner, shoelace_areas(x, y, num_vertices))
    ann_vertices = np.bincount(poly_owner, weights=num_vertices, minlength=n).astype(np.int64)[
        poly_ann
    ]
    vstarts = segment_starts(ann_vertices)
    x0, y0 = np.minimum.reduceat(x, vstarts), np.minimum.reduceat(y, vstarts)
    x1, y1 = np.maximum.reduceat(x, vstarts), np.maximum.reduceat(y, vstarts)
    bboxes = np.round(np.stack([x0, y0, x1 - x0, y1 - y0], 1), 2).tolist()
    coords = np.stack([x, y], 1).ravel().tolist()
    poly_bounds = np.concatenate(([0], np.cumsum(num_vertices) * 2)).tolist()
    parts_list = parts.tolist()
    area_list = np.round(areas, 4).tolist()
    records: list[dict[str, Any]] = [{}] * n
    p = 0
    for k, a in enumerate(poly_ann.tolist()):
        segmentation = []
        for _ in range(parts_list[k]):
            segmentation.append(coords[poly_bounds[p] : poly_bounds[p + 1]])
            p += 1
        records[a] = {
            "segmentation": segmentation,
            "area": area_list[a],
            "iscrowd": 0,
            "image_id": heads["image_id"][a],
            "bbox": bboxes[k],
            "category_id": heads["category_id"][a],
            "id": ids[a],
        }
    return records


def encode_chunks(
    seed: int, images: list[dict[str, Any]], counts: np.ndarray, ann_ids: np.ndarray
) -> Iterator[bytes]:
    """JSON array items (no brackets) for each chunk of images."""
    encoder = msgspec.json.Encoder()
    category_ids = np.array([c[0] for c in COCO_CATEGORIES])
    category_p = category_probabilities(len(category_ids))
    bounds = np.concatenate(([0], np.cumsum(counts)))
    for chunk, start in enumerate(range(0, len(images), IMAGES_PER_CHUNK)):
        stop = min(start + IMAGES_PER_CHUNK, len(images))
        rng = np.random.default_rng([seed, 1, chunk])
        anns = make_annotations(
            rng,
            images[start:stop],
            counts[start:stop],
            ann_ids[bounds[start] : bounds[stop]],
            category_ids,
            category_p,
        )
        if anns:
            yield encoder.encode(anns)[1:-1]


def write_coco(
    path: Path, *, num_images: int, num_annotations: int, seed: int = 0
) -> dict[str, Any]:
    """Write the file atomically; return its path, size and counts."""
    rng = np.random.default_rng([seed, 0])
    images = make_images(rng, num_images)
    counts = annotation_counts(rng, num_images, num_annotations)
    population = max(ANNOTATION_ID_RANGE, 2 * num_annotations)
    ann_ids = rng.choice(population, size=num_annotations, replace=False) + 1
    header = {
        "info": {
            "description": "COCO-shaped synthetic instances (rayseg bench)",
            "url": "http://cocodataset.org",
            "version": "1.0",
            "year": 2017,
            "contributor": "rayseg bench/make_coco.py",
            "date_created": "2017/09/01",
        },
        "licenses": [
            {
                "url": f"http://creativecommons.org/licenses/{i}/2.0/",
                "id": i,
                "name": f"License {i}",
            }
            for i in range(1, 9)
        ],
    }
    categories = [{"supercategory": s, "id": i, "name": name} for i, name, s in COCO_CATEGORIES]
    encoder = msgspec.json.Encoder()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(encoder.encode(header)[:-1])
            f.write(b',"images":' + encoder.encode(images))
            f.write(b',"annotations":[')
            for i, chunk in enumerate(encode_chunks(seed, images, counts, ann_ids)):
                f.write(chunk if i == 0 else b"," + chunk)
            f.write(b'],"categories":' + encoder.encode(categories) + b"}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "images": num_images,
        "annotations": num_annotations,
    }


def preset_path(preset: str, data_dir: Path = DATA_DIR) -> Path:
    return data_dir / PRESETS[preset]["name"]


def ensure_preset(preset: str, *, data_dir: Path = DATA_DIR, seed: int = 0) -> Path:
    """The preset's file, generated first if it does not exist yet."""
    path = preset_path(preset, data_dir)
    if not path.exists():
        spec = PRESETS[preset]
        write_coco(
            path, num_images=spec["num_images"], num_annotations=spec["num_annotations"], seed=seed
        )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="render (8k images) or train2017")
    parser.add_argument("--num-images", type=int, help="custom size (instead of --preset)")
    parser.add_argument("--num-annotations", type=int, help="default: 7.27 per image")
    parser.add_argument("--out", type=Path, help=f"output file (default: {DATA_DIR}/<preset name>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.preset:
        spec = PRESETS[args.preset]
        num_images, num_annotations = spec["num_images"], spec["num_annotations"]
        out = args.out or preset_path(args.preset)
    elif args.num_images:
        num_images = args.num_images
        num_annotations = args.num_annotations or round(num_images * 7.27)
        out = args.out or DATA_DIR / f"instances_{num_images}.json"
    else:
        parser.error("give --preset or --num-images")
    t0 = time.perf_counter()
    info = write_coco(out, num_images=num_images, num_annotations=num_annotations, seed=args.seed)
    print(
        f"wrote {info['path']}: {info['images']:,} images, {info['annotations']:,} annotations, "
        f"{info['bytes'] / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
