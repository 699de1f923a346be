"""Inference: a model export or run dir + images -> label PNGs and colour overlays.

Input: `--images`, a folder of .jpg/.jpeg/.png files or a masks Parquet folder (rows with `image`
bytes); `--checkpoint`, anything rayseg.checkpoint.load_model reads. Output under OUT (local or s3://):
`masks/<image stem>.png` (same height and width as the image, values in the scheme of the masks the
model was trained on), `overlays/<image stem>.jpg` (its legend says "no class found" when the
model found only background), and `predict_summary.json` (counts, the images with no class
found, every skipped input with its reason, the resolved config).

The labels come from rayseg.infer.predict_labels, as in rayseg.evaluate, so evaluate scores
exactly the labels predict writes; overlay and render_outputs make the files, without Ray.
run_predict wraps them in a Ray Data pipeline: read bytes (tasks) -> Predictor (actor pool,
one GPU each with --use-gpu) -> write files (tasks).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow.fs as pafs

from rayseg import naming, outputs, storage
from rayseg.cluster import check_gpus, worker_uri
from rayseg.config import PredictConfig, to_dict
from rayseg.errors import RaysegError
from rayseg.infer import (
    check_parquet_images,
    encoded_size,
    image_stem,
    load_checkpoint,
    map_with_model,
    objects,
    over_pixel_cap,
    predict_labels,
)
from rayseg.models import ClassMap
from rayseg.rayconnect import connect_ray
from rayseg.raydata import rows_with_progress
from rayseg.records import Problem
from rayseg.text import plural

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
OVERLAY_ALPHA = 0.35  # a light tint: the outline and legend carry the class
SUMMARY_NAME = "predict_summary.json"
NOTHING_FOUND = "no class found"
PREDICT_WRITES = ("masks", "overlays", SUMMARY_NAME)


# ---- pure core -----------------------------------------------------------------------------------


def overlay_palette(class_map: ClassMap) -> np.ndarray:
    """(K, 3) uint8 RGB per model class: the `rayseg masks --palette` colour of its mask value.

    Background black (left untinted). Values above 255 (16-bit schemes) wrap into the palette.
    """
    pal = storage.label_palette(256)
    values = np.asarray((0, *class_map.mask_values), np.int64) % 256
    return pal[values]


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    names: tuple[str, ...] | None = None,
) -> np.ndarray:
    """(H, W, 3) RGB + (H, W) class indices -> RGB: regions tinted and outlined, a legend.

    Each predicted region gets a light tint and a solid outline in its palette colour; with
    `names`, a legend of the classes present is drawn in the top-left corner.
    """
    colours = palette[labels]  # (H, W, 3)
    fg = (labels > 0)[..., None]
    blended = image * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA
    out = np.where(fg, blended, image).round().astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    lab = labels.astype(np.uint8)
    # Inner boundary: a pixel whose 3x3 neighbourhood holds another class (or the image edge).
    padded = cv2.copyMakeBorder(lab, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    grown = cv2.dilate(padded, kernel)[1:-1, 1:-1]
    shrunk = cv2.erode(padded, kernel)[1:-1, 1:-1]
    edge = ((grown != lab) | (shrunk != lab)) & (labels > 0)
    out[edge] = colours[edge]
    if names is not None:
        present = [int(k) for k in np.unique(labels) if 0 < k < len(names)]
        entries = [(names[k], palette[k]) for k in present]
        # Without it an overlay of an image with nothing found is the photo itself.
        draw_legend(out, entries or [(NOTHING_FOUND, None)])
    return out


def draw_legend(rgb: np.ndarray, entries: list[tuple[str, np.ndarray | None]]) -> None:
    """In place: a dark box in the top-left corner, one colour swatch + class name per line
    (no swatch for a None colour)."""
    if not entries:
        return
    height = rgb.shape[0]
    scale = max(0.35, height / 900)
    thick = max(1, round(scale * 2))
    (_, text_h), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    line = text_h + base + 4
    width = max(
        cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for n, _ in entries
    )
    box_w, box_h = min(rgb.shape[1], width + line + 12), min(height, line * len(entries) + 6)
    rgb[:box_h, :box_w] = (rgb[:box_h, :box_w] * 0.35).astype(np.uint8)
    for i, (name, colour) in enumerate(entries):
        y = 3 + i * line
        if colour is not None:
            cv2.rectangle(rgb, (4, y + 2), (line, y + line - 2), tuple(int(c) for c in colour), -1)
        org = (line + 6, y + text_h + 2)
        cv2.putText(
            rgb, name, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA
        )


def classes_found(labels: np.ndarray) -> int:
    """How many classes other than background (0) an (H, W) prediction holds."""
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


def render_outputs(
    image: np.ndarray, labels: np.ndarray, class_map: ClassMap, palette: np.ndarray
) -> tuple[bytes, bytes]:
    """-> (label PNG in the masks' value scheme, JPEG overlay)."""
    mask_png = storage.encode_png(class_map.to_mask_values(labels))
    bgr = cv2.cvtColor(overlay(image, labels, palette, class_map.names), cv2.COLOR_RGB2BGR)
    ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return mask_png, jpg.tobytes()


# ---- Ray Data stages -----------------------------------------------------------------------------


def read_image_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"name", "uri"} -> {"name", "image" (bytes), "reason" ("" when read)}."""
    images, reasons = [], []
    for uri in batch["uri"]:
        try:
            images.append(storage.read_bytes(storage.locate(str(uri))))
            reasons.append("")
        except OSError as e:
            images.append(b"")
            reasons.append(f"cannot read ({e})")
    return {"name": batch["name"], "image": objects(images), "reason": np.array(reasons)}


def parquet_rows_to_images(
    batch: dict[str, np.ndarray], *, stems: dict[int, str]
) -> dict[str, np.ndarray]:
    """Masks Parquet rows {"image_id", "image"} -> {"name", "image", "reason"}; `stems`: image id
    -> its output stem (parquet_stems), "" for a row that cannot be named."""
    names = [stems.get(int(i), "") for i in batch["image_id"]]
    images = [b if b is not None else b"" for b in batch["image"]]
    reasons = [
        "row has no usable file_name: its outputs cannot be named"
        if not name
        else ""
        if b
        else "row has no image bytes (masks ran without --images-dir)"
        for name, b in zip(names, images, strict=True)
    ]
    names = [name or f"image {i}" for name, i in zip(names, batch["image_id"], strict=True)]
    return {"name": np.array(names), "image": objects(images), "reason": np.array(reasons)}


def parquet_stems(parts: tuple[storage.Location, ...]) -> dict[int, str]:
    """Image id -> output stem for every row of the parts: rayseg.naming's rule, as `rayseg
    masks` names them (unique, safe, cut to fit), so rows with shared stems never overwrite one
    another. A row without a file name, or whose id repeats, gets no stem."""
    import pyarrow.parquet as pq

    pairs = []
    for part in parts:
        table = pq.read_table(part.path, columns=["image_id", "file_name"], filesystem=part.fs)
        pairs += zip(table["image_id"].to_pylist(), table["file_name"].to_pylist(), strict=True)
    repeated = {i for i, n in Counter(i for i, _ in pairs).items() if n > 1}
    named = [(int(i), f) for i, f in pairs if i is not None and f and i not in repeated]
    return dict(zip((i for i, _ in named), naming.unique_stems(named), strict=True))


class Predictor:
    """Ray Data actor: loads the model once; encoded images -> encoded label PNGs + overlays."""

    def __init__(self, checkpoint: str, use_gpu: bool, max_pixels: int | None = None):
        self.device = "cuda" if use_gpu else "cpu"
        self.model, info = load_checkpoint(checkpoint, device=self.device)
        self.class_map: ClassMap = info["class_map"]
        self.palette = overlay_palette(self.class_map)
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reasons = [str(r) for r in batch["reason"]]
        for i, data in enumerate(batch["image"]):
            size = encoded_size(data) if not reasons[i] and self.max_pixels else None
            if size is not None:
                reasons[i] = over_pixel_cap(*size, self.max_pixels, "predicted") or ""
        images = [
            storage.decode_image(b) if not r else None
            for b, r in zip(batch["image"], reasons, strict=True)
        ]
        for i, image in enumerate(images):
            if image is None and not reasons[i]:
                reasons[i] = "image does not decode"
        ok = [i for i, image in enumerate(images) if image is not None]
        labels = predict_labels(self.model, [images[i] for i in ok], device=self.device)
        masks, overlays = [b""] * len(images), [b""] * len(images)
        heights, widths = np.zeros(len(images), np.int32), np.zeros(len(images), np.int32)
        found = np.zeros(len(images), np.int32)  # classes other than background per image
        for i, lab in zip(ok, labels, strict=True):
            masks[i], overlays[i] = render_outputs(images[i], lab, self.class_map, self.palette)
            heights[i], widths[i] = lab.shape
            found[i] = classes_found(lab)
        return {
            "name": batch["name"],
            "mask_png": objects(masks),
            "overlay_jpg": objects(overlays),
            "height": heights,
            "width": widths,
            "found": found,
            "reason": np.array(reasons),
        }


def write_outputs(batch: dict[str, np.ndarray], *, out: str) -> dict[str, np.ndarray]:
    """Write each predicted image's two files; -> the small per-image status rows."""
    root = storage.locate(out)
    reasons = [str(r) for r in batch["reason"]]
    for k, (name, mask_png, overlay_jpg) in enumerate(
        zip(batch["name"], batch["mask_png"], batch["overlay_jpg"], strict=True)
    ):
        if reasons[k]:
            continue
        try:
            storage.write_bytes(root.join("masks", f"{name}.png"), mask_png)
            storage.write_bytes(root.join("overlays", f"{name}.jpg"), overlay_jpg)
        except OSError as e:  # one image's outputs, not the run
            reasons[k] = f"outputs not written ({type(e).__name__}: {e.strerror or e})"
    status = {k: batch[k] for k in ("name", "height", "width", "found")}
    return {**status, "reason": np.array(reasons)}


# ---- driver --------------------------------------------------------------------------------------


def summary_line(counts: dict[str, int], out: storage.Location) -> str:
    """`predict: 12 of 12 images -> OUT/masks/ and OUT/overlays/; 3 of 12 images with no class
    found (...)`."""
    line = (
        f"predict: {counts['written']} of {plural(counts['inputs'], 'image')} -> "
        f"{out.join('masks').uri}/ and {out.join('overlays').uri}/"
    )
    if counts["nothing_found"]:
        line += (
            f"; {counts['nothing_found']} of {plural(counts['written'], 'image')} with no class "
            f"found (only background; listed in {SUMMARY_NAME})"
        )
    if counts["skipped"]:
        line += f"; {counts['skipped']} skipped (listed in {SUMMARY_NAME})"
    return line


def list_image_files(
    images: str, *, follow_links: bool = False
) -> tuple[list[dict[str, str]], list[Problem]]:
    """An image folder -> ([{"name": stem, "uri"}...], problems); a repeated stem is skipped, and
    so is a link leaving the folder unless `follow_links` (rayseg.storage.image_location)."""
    loc = storage.locate(images)
    files = [n for n in storage.list_files(loc) if n.lower().endswith(IMAGE_EXTENSIONS)]
    rows, problems, seen = [], [], set()
    for file_name in files:
        if storage.image_location(images, file_name, follow_links=follow_links) is None:
            problems.append(Problem(f"image file is {storage.OUTSIDE_IMAGES}", name=file_name))
            continue
        stem = image_stem(file_name)
        if stem in seen:
            problems.append(Problem(f"another image has the stem {stem!r}", name=file_name))
            continue
        seen.add(stem)
        rows.append({"name": stem, "uri": worker_uri(loc.join(file_name).uri)})
    return rows, problems


@dataclass(frozen=True)
class Inputs:
    """What --images holds: Parquet parts, or image files ({"name", "uri"} rows)."""

    parquet: storage.Location | None
    parts: tuple[storage.Location, ...]
    files: tuple[dict[str, str], ...]
    count: int
    problems: tuple[Problem, ...]
    stems: dict[int, str] | None = None  # Parquet rows: image id -> output stem


def find_inputs(images: str, *, follow_links: bool = False) -> Inputs:
    """--images -> Inputs; an empty or missing source fails here, before Ray starts."""
    try:
        parquet = storage.parquet_location(images)
    except RaysegError:
        parquet = None
    if parquet is not None:
        parts = storage.parquet_files(parquet)
        count = check_parquet_images(parts, images)
        return Inputs(parquet, tuple(parts), (), count, (), parquet_stems(tuple(parts)))
    loc = storage.locate(images)
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
        raise RaysegError(f"{images}: no such image folder or Parquet folder")
    files, problems = list_image_files(images, follow_links=follow_links)
    if not files:
        raise RaysegError(
            f"{images}: no images ({', '.join(IMAGE_EXTENSIONS)}) and no Parquet parts"
        )
    return Inputs(None, (), tuple(files), len(files) + len(problems), tuple(problems))


def image_dataset(inputs: Inputs, *, batch_size: int):
    """-> ray.data.Dataset of {"name", "image" (encoded bytes), "reason" ("" unless unreadable)}."""
    import ray

    if inputs.parquet is not None:
        paths = [p.path for p in inputs.parts]
        ds = ray.data.read_parquet(paths, filesystem=inputs.parquet.fs)
        ds = ds.select_columns(["image_id", "image"])
        return ds.map_batches(
            parquet_rows_to_images, fn_kwargs={"stems": inputs.stems}, batch_size=batch_size
        )
    ds = ray.data.from_items(list(inputs.files))
    return ds.map_batches(read_image_files, batch_size=batch_size)


def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    start = time.monotonic()
    # Read the checkpoint on the driver first: a bad one fails here with one line, not in actors.
    _, info = load_checkpoint(cfg.checkpoint)
    class_map: ClassMap = info["class_map"]
    inputs = find_inputs(cfg.images, follow_links=cfg.follow_image_links)
    out = storage.locate(cfg.out)
    outputs.check_apart(cfg.out, inputs={}, images={"--images": cfg.images})
    storage.check_writable(out)
    outputs.claim(out, "predict", writes=PREDICT_WRITES, overwrite=cfg.overwrite)
    storage.make_dirs(out.join("masks"), below=out)
    storage.make_dirs(out.join("overlays"), below=out)

    connect_ray(cfg.address, cfg.num_cpus)
    check_gpus(cfg.use_gpu)
    ds = image_dataset(inputs, batch_size=cfg.batch_size)
    ds = map_with_model(ds, Predictor, checkpoint=worker_uri(info["source"]), cfg=cfg)
    ds = ds.map_batches(write_outputs, fn_kwargs={"out": worker_uri(cfg.out)})
    rows = list(rows_with_progress(ds, total=inputs.count, label="predict"))

    num_inputs = inputs.count
    written = [r for r in rows if not r["reason"]]
    empty = sorted(str(r["name"]) for r in written if int(r["found"]) == 0)
    problems = list(inputs.problems) + [
        Problem(str(r["reason"]), name=str(r["name"])) for r in rows if r["reason"]
    ]
    problems.sort(key=lambda p: p.name)
    summary = {
        "checkpoint": info["source"],
        "model": info["model"],
        "value_scheme": class_map.value_scheme,
        "classes": list(class_map.names),
        "counts": {
            "inputs": num_inputs,
            "written": len(written),
            "nothing_found": len(empty),
            "skipped": len(problems),
        },
        "nothing_found": empty,
        "skipped": [p.to_dict() for p in problems],
        "seconds": round(time.monotonic() - start, 2),
        "config": to_dict(cfg),
    }
    storage.write_json(out.join(SUMMARY_NAME), summary)
    print(summary_line(summary["counts"], out))
    if not written:
        first = problems[0] if problems else Problem("no output", name="-")
        raise RaysegError(
            f"{cfg.images}: no image could be predicted (first: {first.name}: {first.reason})"
        )
    return summary
