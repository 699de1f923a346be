"""rayseg.infer: decoding, predict_labels against a hand-normalised forward pass, checkpoint and
Parquet input checks. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
from mask_data import META, encode_rgb, make_sample, random_rgb, reference_labels, sample_row
from tiny_models import save_tiny_model, tiny_model

from rayseg import storage
from rayseg.errors import RaysegError
from rayseg.infer import (
    check_parquet_images,
    image_stem,
    load_checkpoint,
    objects,
    predict_labels,
)
from rayseg.models import class_map_from_meta

CLASS_MAP = class_map_from_meta(META)
# (height, width) of the test images: all different, and none a multiple of 32.
SIZES = [(40, 48), (36, 52), (44, 30)]


def test_decode_image_is_rgb_and_rejects_garbage():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    decoded = storage.decode_image(encode_rgb(rgb))
    assert decoded.shape == (4, 5, 3)
    assert decoded[0, 0].tolist() == [200, 0, 0]
    assert storage.decode_image(b"not an image") is None
    assert storage.decode_image(b"") is None
    assert storage.decode_image(None) is None


def test_predict_labels_full_size_and_independent_of_batch():
    model = tiny_model(CLASS_MAP.num_classes)
    images = [random_rgb(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    images.append(random_rgb(*SIZES[0], seed=9))  # same size as the first: one shared pass
    labels = predict_labels(model, images)
    assert [lab.shape for lab in labels] == [im.shape[:2] for im in images]
    assert all(lab.dtype == np.uint8 and lab.max() < CLASS_MAP.num_classes for lab in labels)
    assert len(np.unique(np.concatenate([lab.ravel() for lab in labels]))) > 1
    for image, lab in zip(images, labels, strict=True):
        np.testing.assert_array_equal(predict_labels(model, [image])[0], lab)
        # One normalisation (rayseg.models.normalize): the same labels as ImageNet mean/std by hand.
        np.testing.assert_array_equal(reference_labels(model, image), lab)
    assert predict_labels(model, []) == []


def test_load_checkpoint_reads_an_export_and_names_a_bad_file(tmp_path):
    path = tmp_path / "model.pt"
    save_tiny_model(str(path), CLASS_MAP)
    model, info = load_checkpoint(str(tmp_path))  # a run dir: its model.pt
    assert info["class_map"] == CLASS_MAP and info["source"] == str(path)
    assert not model.training
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RaysegError, match="garbage.pt: not a rayseg model export or checkpoint"):
        load_checkpoint(str(garbage))


def write_part(path, rows) -> storage.Location:
    loc = storage.locate(str(path))
    storage.write_parquet(loc, storage.mask_table(rows, META))
    return loc


def test_check_parquet_images_counts_rows_and_needs_image_bytes(tmp_path):
    image, mask = make_sample(0)
    with_image = write_part(tmp_path / "a.parquet", [sample_row(1, image, mask)])
    without = write_part(tmp_path / "b.parquet", [sample_row(i, None, mask) for i in (2, 3)])
    assert check_parquet_images([with_image, without], "d") == 3
    with pytest.raises(RaysegError, match="d: no row carries image bytes.*--images-dir"):
        check_parquet_images([without], "d")
    empty = write_part(tmp_path / "c.parquet", [])
    with pytest.raises(RaysegError, match="d: the Parquet parts hold no rows"):
        check_parquet_images([empty], "d")


def test_small_helpers():
    assert image_stem("train/000042.jpg") == "000042"
    arr = objects([b"ab", b""])
    assert arr.dtype == object and arr.tolist() == [b"ab", b""]
