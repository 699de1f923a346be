"""rayseg.predict: overlays and output files without Ray, then run_predict on one local Ray.

The shared inference core (decoding, predict_labels) is tested in test_infer.py.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from mask_data import category_meta, encode_rgb, random_rgb, reference_labels, sample_row
from tiny_models import PERSON_CAR, save_tiny_model

from rayseg import storage
from rayseg.checkpoint import load_model
from rayseg.config import PredictConfig
from rayseg.errors import RaysegError
from rayseg.models import ClassMap
from rayseg.predict import (
    classes_found,
    overlay,
    overlay_palette,
    render_outputs,
    run_predict,
    summary_line,
)
from rayseg.storage import decode_image

CLASS_MAP = PERSON_CAR
# (height, width) of the test images: all different, and none a multiple of 32.
SIZES = [(40, 48), (36, 52), (44, 30)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_tiny_model(str(path))
    return str(path)


# ---- pure core -----------------------------------------------------------------------------------


def assert_three_of_four_written(summary: dict, out) -> None:
    """3 of 4 inputs written, 1 skipped, and the masks with no class found counted and named."""
    masks = {p.stem: storage.decode_png(p.read_bytes()) for p in (out / "masks").iterdir()}
    empty = sorted(stem for stem, m in masks.items() if not m.any())
    assert summary["counts"] == {
        "inputs": 4,
        "written": 3,
        "nothing_found": len(empty),
        "skipped": 1,
    }
    assert summary["nothing_found"] == empty


def test_overlay_tints_only_foreground():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 0]], np.uint8)
    palette = np.array([[0, 0, 0], [200, 0, 0], [0, 0, 200]], np.uint8)
    out = overlay(image, labels, palette)
    assert out[0, 0].tolist() == [100, 100, 100] and out[1, 1].tolist() == [100, 100, 100]
    # One-pixel regions are all outline: their exact palette colour.
    assert out[0, 1].tolist() == [200, 0, 0]
    assert out[1, 0].tolist() == [0, 0, 200]


def test_overlay_outline_and_legend_use_the_palette_colours_of_mask_values():
    palette = overlay_palette(CLASS_MAP)
    pal = storage.label_palette(256)
    # Class 1 is mask value 1, class 2 mask value 3: the colours `rayseg masks --palette` uses.
    assert palette[1].tolist() == pal[1].tolist() and palette[2].tolist() == pal[3].tolist()
    assert palette[0].tolist() == [0, 0, 0]
    image = np.full((120, 160, 3), 128, np.uint8)
    labels = np.zeros((120, 160), np.uint8)
    labels[60:100, 20:60] = 1  # a 40x40 square of class 1 (person)
    labels[60:100, 100:140] = 2  # and one of class 2 (car)
    plain = overlay(image, labels, palette)
    assert plain[60, 40].tolist() == pal[1].tolist()  # top edge of the square: outline
    assert plain[99, 120].tolist() == pal[3].tolist()
    inside = plain[80, 40]
    assert inside.tolist() not in (pal[1].tolist(), image[0, 0].tolist())  # tinted, not solid
    with_legend = overlay(image, labels, palette, CLASS_MAP.names)
    corner = np.abs(with_legend[:30, :60].astype(int) - plain[:30, :60]).sum(-1) > 0
    assert corner.mean() > 0.3  # the legend box darkens the corner and writes on it
    np.testing.assert_array_equal(with_legend[60:, :], plain[60:, :])  # the regions untouched
    # A legend of classes present only: no car, a smaller box.
    person_only = overlay(image, np.where(labels == 2, 0, labels), palette, CLASS_MAP.names)
    rows_changed = (np.abs(person_only.astype(int) - image).sum(-1) > 0)[:60].any(1).sum()
    assert (
        0 < rows_changed < (np.abs(with_legend.astype(int) - image).sum(-1) > 0)[:60].any(1).sum()
    )


def test_an_overlay_with_nothing_found_says_so_in_its_legend():
    palette = overlay_palette(CLASS_MAP)
    image = np.full((120, 160, 3), 128, np.uint8)
    nothing = np.zeros((120, 160), np.uint8)
    assert classes_found(nothing) == 0
    out = overlay(image, nothing, palette, CLASS_MAP.names)
    changed = np.abs(out.astype(int) - image).sum(-1) > 0
    # Before: the photo itself, unchanged. Now a legend box in the corner, the rest untouched.
    assert changed[:20, :60].mean() > 0.5
    assert not changed[40:].any() and not changed[:, 120:].any()
    # Its text: white pixels beside no colour swatch (the swatch column stays dark grey).
    assert (out[:20, :100] > 200).all(-1).sum() > 20
    assert (out[2:12, 4:12] < 60).all()
    some = nothing.copy()
    some[60:80, 60:80] = 2
    assert classes_found(some) == 1


def test_summary_line_counts_images_with_no_class_found(tmp_path):
    out = storage.locate(str(tmp_path))
    counts = {"inputs": 12, "written": 12, "nothing_found": 3, "skipped": 0}
    line = summary_line(counts, out)
    assert line.endswith(
        "; 3 of 12 images with no class found (only background; listed in predict_summary.json)"
    )
    one = summary_line({"inputs": 1, "written": 1, "nothing_found": 0, "skipped": 0}, out)
    assert one.startswith("predict: 1 of 1 image -> ") and "no class" not in one


def test_render_outputs_uses_the_masks_value_scheme():
    labels = np.array([[0, 1], [2, 2]], np.uint8)
    image = random_rgb(2, 2, seed=0)
    mask_png, jpg = render_outputs(image, labels, CLASS_MAP, overlay_palette(CLASS_MAP))
    np.testing.assert_array_equal(storage.decode_png(mask_png), [[0, 1], [3, 3]])
    assert decode_image(jpg).shape == (2, 2, 3)
    # 16-bit schemes (ignore 65535) give 16-bit PNGs with the same values.
    wide = ClassMap((1, 300), (1, 300), ("background", "a", "b"), 65535, "category_id")
    mask_png, _ = render_outputs(image, labels, wide, overlay_palette(wide))
    decoded = storage.decode_png(mask_png)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, [[0, 1], [300, 300]])


# ---- run_predict on Ray --------------------------------------------------------------------------


def expected_mask(model_file: str, rgb: np.ndarray) -> np.ndarray:
    """What predict must write for one image, computed here from the model directly."""
    model, info = load_model(model_file)
    return info["class_map"].to_mask_values(reference_labels(model, rgb))


def test_predict_image_folder(ray_local, model_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rgbs = {}
    for i, (h, w) in enumerate(SIZES):
        rgbs[f"img{i}"] = random_rgb(h, w, seed=i)
        ext = ".png" if i % 2 else ".jpg"  # PNG keeps pixels exact; JPEG is decoded as stored
        (images / f"img{i}{ext}").write_bytes(encode_rgb(rgbs[f"img{i}"], ext))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (images / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"

    summary = run_predict(
        PredictConfig(checkpoint=model_file, images=str(images), out=str(out), batch_size=2)
    )

    assert_three_of_four_written(summary, out)
    assert summary["skipped"] == [{"name": "broken", "reason": "image does not decode"}]
    assert json.loads((out / "predict_summary.json").read_text())["counts"]["written"] == 3
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "img0.jpg",
        "img1.jpg",
        "img2.jpg",
    ]
    for stem, rgb in rgbs.items():
        mask = storage.decode_png((out / "masks" / f"{stem}.png").read_bytes())
        assert mask.shape == rgb.shape[:2] and mask.dtype == np.uint8
        stored = decode_image((images / next(images.glob(f"{stem}.*")).name).read_bytes())
        np.testing.assert_array_equal(mask, expected_mask(model_file, stored))
        assert cv2.imread(str(out / "overlays" / f"{stem}.jpg")).shape == rgb.shape


def test_predict_parquet_rows(ray_local, model_file, tmp_path):
    meta = category_meta({1: "person", 3: "car"})
    rows = []
    for i, (h, w) in enumerate(SIZES):
        image = encode_rgb(random_rgb(h, w, seed=i))
        row = sample_row(i, None, np.zeros((h, w), np.uint8), image_bytes=image)
        rows.append({**row, "file_name": f"train/{i:06d}.jpg"})
    rows.append({**rows[0], "image_id": 7, "file_name": "no_bytes.jpg", "image": None})
    parquet = tmp_path / "masks" / "parquet"
    parquet.mkdir(parents=True)
    storage.write_parquet(
        storage.locate(str(parquet / "part-00000.parquet")), storage.mask_table(rows, meta)
    )
    out = tmp_path / "out"

    summary = run_predict(
        PredictConfig(checkpoint=model_file, images=str(tmp_path / "masks"), out=str(out))
    )

    assert_three_of_four_written(summary, out)
    assert summary["skipped"][0]["name"] == "no_bytes"
    for i, (h, w) in enumerate(SIZES):
        assert storage.decode_png((out / "masks" / f"{i:06d}.png").read_bytes()).shape == (h, w)


def test_bad_checkpoint_is_one_clear_error(model_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode_rgb(random_rgb(8, 8, seed=0), ".png"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    for checkpoint, expected in [
        (str(tmp_path / "missing"), "no such model file"),
        (str(garbage), "garbage.pt: not a rayseg model export or checkpoint"),
    ]:
        cfg = PredictConfig(checkpoint=checkpoint, images=str(images), out=str(tmp_path / "o"))
        with pytest.raises(RaysegError, match=expected):
            run_predict(cfg)

    # An export whose weights belong to another architecture.
    record = torch.load(model_file, map_location="cpu")
    record["model"] = "deeplabv3_mobilenet_v3_large"
    other = tmp_path / "other.pt"
    torch.save(record, other)
    cfg = PredictConfig(checkpoint=str(other), images=str(images), out=str(tmp_path / "o"))
    with pytest.raises(RaysegError, match="weights do not fit"):
        run_predict(cfg)


def test_empty_input_fails(model_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    cfg = PredictConfig(checkpoint=model_file, images=str(empty), out=str(tmp_path / "o1"))
    with pytest.raises(RaysegError, match="no images"):
        run_predict(cfg)
    cfg = PredictConfig(checkpoint=model_file, images=str(tmp_path / "nope"), out=str(tmp_path))
    with pytest.raises(RaysegError, match="no such image folder"):
        run_predict(cfg)
