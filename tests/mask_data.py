"""A tiny `rayseg masks`-shaped dataset made in code: Parquet parts with embedded images, and
the hand-computed labels a model should give (reference_labels)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from rayseg import storage


def category_meta(names: dict[int, str]) -> dict:
    """The masks' value scheme (storage.read_mask_meta) for `values=category_id`, uint8."""
    return {
        "values": "category_id",
        "dtype": "uint8",
        "ignore_value": 255,
        "background_value": 0,
        "classes": [{"value": c, "category_id": c, "name": n} for c, n in sorted(names.items())],
    }


# Two classes with a gap in category ids, as COCO has: value = category id.
META = category_meta({1: "square", 3: "disc"})


def make_sample(index: int, *, height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) BGR image and (H, W) mask: a red square (1) and a green disc (3) on grey noise.

    The colours alone tell the classes apart, so a small network learns them in a few steps.
    """
    rng = np.random.default_rng(index)
    image = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    s = height // 3
    y, x = int(rng.integers(0, height - s)), int(rng.integers(0, width // 2 - s))
    image[y : y + s, x : x + s] = (30, 30, 220)
    mask[y : y + s, x : x + s] = 1
    r = s // 2 + 2
    cy, cx = int(rng.integers(r, height - r)), int(rng.integers(width // 2 + r, width - r))
    cv2.circle(image, (cx, cy), r, (40, 200, 40), -1)
    cv2.circle(mask, (cx, cy), r, 3, -1)
    mask[0, :4] = 255  # a few ignore pixels
    return image, mask


def random_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB noise."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode_rgb(rgb: np.ndarray, ext: str = ".png") -> bytes:
    """(H, W, 3) RGB -> encoded bytes (PNG keeps pixels exact)."""
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def reference_labels(model, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) class indices, normalised by hand (ImageNet mean/std): the
    oracle that rayseg.infer.predict_labels, evaluate and predict are checked against."""
    import torch  # only the model tests need it

    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((x - mean) / std)["out"].argmax(1)[0].numpy()


def sample_row(
    image_id: int, image: np.ndarray | None, mask: np.ndarray, *, image_bytes: bytes | None = None
) -> dict:
    if image_bytes is None and image is not None:
        image_bytes = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    values, counts = np.unique(mask, return_counts=True)
    return {
        "image_id": image_id,
        "file_name": f"{image_id:012d}.jpg",
        "height": mask.shape[0],
        "width": mask.shape[1],
        "category_ids": [int(v) for v in values if v not in (0, 255)],
        "value_pixels": [
            {"value": int(v), "pixels": int(n)} for v, n in zip(values, counts, strict=True)
        ],
        "mask_path": f"masks/{image_id:012d}.png",
        "mask": storage.encode_png(mask),
        "image": image_bytes,
    }


def write_masks(
    out: Path,
    num_images: int,
    *,
    height: int = 48,
    width: int = 64,
    parts: int = 2,
    bad: dict[int, str] | None = None,
    meta: dict | None = None,
    row_group_size: int | None = None,
) -> Path:
    """A `rayseg masks`-shaped output dir (OUT/parquet/part-*.parquet) with embedded images.

    bad: image id -> "image" (undecodable image bytes) or "mask" (undecodable mask bytes).
    row_group_size: rows per Parquet row group (else `rayseg masks`' own, 64).
    """
    rows = []
    for i in range(num_images):
        image_id = 100 + i
        image, mask = make_sample(i, height=height, width=width)
        row = sample_row(image_id, image, mask)
        kind = (bad or {}).get(image_id)
        if kind == "image":
            row["image"] = b"not a jpeg"
        elif kind == "mask":
            row["mask"] = b"\x89PNG broken"
        rows.append(row)
    folder = out / "parquet"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        chunk = rows[k::parts]
        if chunk:
            table = storage.mask_table(chunk, meta or META)
            path = folder / f"part-{k:05d}.parquet"
            if row_group_size:
                pq.write_table(table, path, row_group_size=row_group_size)
            else:
                storage.write_parquet(storage.locate(str(path)), table)
    return out
