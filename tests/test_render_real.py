"""rayseg.render on 160 real COCO images against pycocotools annToMask; skipped without them."""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from rayseg.render import Shape, render_mask, value_scheme

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_sample"
# Measured 99.546%; fillPoly also paints boundary pixels, so its objects are ~1.7% larger.
MIN_OPENCV_AGREEMENT = 0.994


@pytest.fixture(scope="module")
def sample():
    """[(height, width, shapes, pycocotools reference mask)] for every image of the sample."""
    if not (SAMPLE / "annotations.json").exists():
        pytest.skip(f"no real COCO sample at {SAMPLE}")
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        coco = COCO(str(SAMPLE / "annotations.json"))
    scheme = value_scheme(coco.getCatIds(), "category_id")
    images = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        anns = coco.imgToAnns[image_id]
        shapes = [
            Shape(a["id"], scheme.values[a["category_id"]], a["segmentation"], bool(a["iscrowd"]))
            for a in anns
        ]
        # The original script: category_id * annToMask, np.maximum, crowds painted as class.
        reference = np.zeros((info["height"], info["width"]), np.uint8)
        for a in anns:
            reference = np.maximum(reference, coco.annToMask(a) * np.uint8(a["category_id"]))
        images.append((info["height"], info["width"], shapes, reference))
    return images


def test_sample_is_the_documented_one(sample):
    assert len(sample) == 160
    assert sum(len(shapes) for _, _, shapes, _ in sample) == 1444


def test_coco_rasterizer_is_identical_on_every_image(sample):
    differing = []
    for height, width, shapes, reference in sample:
        mask, problems = render_mask(height, width, shapes, rasterizer="coco")
        assert problems == [], "real COCO coordinates only stray outside by float rounding"
        if not np.array_equal(mask, reference):
            differing.append((shapes[0].annotation_id, int((mask != reference).sum())))
    assert differing == []


def test_opencv_rasterizer_agrees_on_almost_every_pixel(sample):
    equal = total = 0
    for height, width, shapes, reference in sample:
        mask, problems = render_mask(height, width, shapes, rasterizer="opencv")
        assert problems == []
        equal += int((mask == reference).sum())
        total += reference.size
    assert equal / total >= MIN_OPENCV_AGREEMENT
