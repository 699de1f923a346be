"""rayseg.predict: the pure inference core without Ray, then run_predict on one local Ray."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from rayseg import storage
from rayseg.checkpoint import load_model, save_model
from rayseg.config import PredictConfig
from rayseg.errors import RaysegError
from rayseg.infer import predict_labels
from rayseg.models import ClassMap
from rayseg.predict import overlay, overlay_palette, render_outputs, run_predict
from rayseg.storage import decode_image

# Model class 1 is mask value 1 (person), class 2 is mask value 3 (car).
CLASS_MAP = ClassMap(
    mask_values=(1, 3),
    category_ids=(1, 3),
    names=("background", "person", "car"),
    ignore_value=255,
    value_scheme="category_id",
)
# (height, width) of the test images: all different, and none a multiple of 32.
SIZES = [(40, 48), (36, 52), (44, 30)]


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(rgb: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(
        str(path),
        tiny_model(CLASS_MAP.num_classes),
        name="lraspp_mobilenet_v3_large",
        class_map=CLASS_MAP,
        aux_loss=False,
    )
    return str(path)


# ---- pure core -----------------------------------------------------------------------------------


def test_decode_image_is_rgb_and_rejects_garbage():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    decoded = decode_image(encode(rgb, ".png"))
    assert decoded.shape == (4, 5, 3)
    assert decoded[0, 0].tolist() == [200, 0, 0]
    assert decode_image(b"not an image") is None
    assert decode_image(b"") is None
    assert decode_image(None) is None


def test_predict_labels_full_size_and_independent_of_batch():
    model = tiny_model(CLASS_MAP.num_classes)
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    images.append(random_image(*SIZES[0], seed=9))  # same size as the first: one shared pass
    labels = predict_labels(model, images)
    assert [lab.shape for lab in labels] == [im.shape[:2] for im in images]
    assert all(lab.dtype == np.uint8 and lab.max() < CLASS_MAP.num_classes for lab in labels)
    assert len(np.unique(np.concatenate([lab.ravel() for lab in labels]))) > 1
    for image, lab in zip(images, labels, strict=True):
        np.testing.assert_array_equal(predict_labels(model, [image])[0], lab)


def test_overlay_tints_only_foreground():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 0]], np.uint8)
    palette = np.array([[0, 0, 0], [200, 0, 0], [0, 0, 200]], np.uint8)
    out = overlay(image, labels, palette)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [150, 50, 50]
    assert out[1, 0].tolist() == [50, 50, 150]


def test_render_outputs_uses_the_masks_value_scheme():
    labels = np.array([[0, 1], [2, 2]], np.uint8)
    image = random_image(2, 2, seed=0)
    mask_png, jpg = render_outputs(image, labels, CLASS_MAP, overlay_palette(3))
    np.testing.assert_array_equal(storage.decode_png(mask_png), [[0, 1], [3, 3]])
    assert decode_image(jpg).shape == (2, 2, 3)
    # 16-bit schemes (ignore 65535) give 16-bit PNGs with the same values.
    wide = ClassMap((1, 300), (1, 300), ("background", "a", "b"), 65535, "category_id")
    mask_png, _ = render_outputs(image, labels, wide, overlay_palette(3))
    decoded = storage.decode_png(mask_png)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, [[0, 1], [300, 300]])


# ---- run_predict on Ray --------------------------------------------------------------------------


def expected_mask(model_file: str, rgb: np.ndarray) -> np.ndarray:
    """What predict must write for one image, computed here from the model directly."""
    model, info = load_model(model_file)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = model((x - mean) / std)["out"].argmax(1)[0].numpy()
    return info["class_map"].to_mask_values(pred)


def test_predict_image_folder(ray_local, model_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rgbs = {}
    for i, (h, w) in enumerate(SIZES):
        rgbs[f"img{i}"] = random_image(h, w, seed=i)
        ext = ".png" if i % 2 else ".jpg"  # PNG keeps pixels exact; JPEG is decoded as stored
        (images / f"img{i}{ext}").write_bytes(encode(rgbs[f"img{i}"], ext))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (images / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"

    summary = run_predict(
        PredictConfig(checkpoint=model_file, images=str(images), out=str(out), batch_size=2)
    )

    assert summary["counts"] == {"inputs": 4, "written": 3, "skipped": 1}
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
    meta = {
        "values": "category_id",
        "dtype": "uint8",
        "ignore_value": 255,
        "background_value": 0,
        "classes": [
            {"value": 1, "category_id": 1, "name": "person"},
            {"value": 3, "category_id": 3, "name": "car"},
        ],
    }
    rows = []
    for i, (h, w) in enumerate(SIZES):
        image = encode(random_image(h, w, seed=i), ".png")
        rows.append(
            {
                "image_id": i,
                "file_name": f"train/{i:06d}.jpg",
                "height": h,
                "width": w,
                "categories": [],
                "class_pixels": [],
                "mask_path": "",
                "mask": storage.encode_png(np.zeros((h, w), np.uint8)),
                "image": image,
            }
        )
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

    assert summary["counts"] == {"inputs": 4, "written": 3, "skipped": 1}
    assert summary["skipped"][0]["name"] == "no_bytes"
    for i, (h, w) in enumerate(SIZES):
        assert storage.decode_png((out / "masks" / f"{i:06d}.png").read_bytes()).shape == (h, w)


def test_bad_checkpoint_is_one_clear_error(model_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode(random_image(8, 8, seed=0), ".png"))
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
