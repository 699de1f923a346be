"""rayseg.synth: deterministic, covers every COCO segmentation form, masks match drawn pixels."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from rayseg.config import SynthConfig
from rayseg.errors import RaysegError
from rayseg.synth import CATEGORY_HUES, encode_uncompressed_rle, make_dataset, run_synth

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

NUM_IMAGES = 24
WIDTH, HEIGHT = 160, 120


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(NUM_IMAGES, seed=0, width=WIDTH, height=HEIGHT)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = run_synth(SynthConfig(out=str(out), num_images=NUM_IMAGES, seed=0))
    return out, summary


def ann_mask(coco: COCO, ann: dict) -> np.ndarray:
    return coco.annToMask(ann).astype(bool)


def hue_matches(bgr_pixels: np.ndarray, hue: int, *, tolerance: int = 10) -> np.ndarray:
    """(N, 3) BGR -> (N,) bool: saturated and within `tolerance` of an OpenCV hue (0..179)."""
    if len(bgr_pixels) == 0:
        return np.zeros(0, bool)
    hsv = cv2.cvtColor(bgr_pixels.reshape(-1, 1, 3), cv2.COLOR_BGR2HSV).reshape(-1, 3).astype(int)
    distance = np.abs(hsv[:, 0] - hue)
    distance = np.minimum(distance, 180 - distance)
    return (distance <= tolerance) & (hsv[:, 1] >= 100)


def visible_class_fractions(coco: COCO, images: dict[int, np.ndarray]) -> dict[int, float]:
    """Per category: share of its visible mask pixels drawn in its hue (later annotations cover
    earlier ones, as the synthetic painter draws them in file order)."""
    hits: dict[int, int] = {}
    totals: dict[int, int] = {}
    for image_id, pixels in images.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        masks = [ann_mask(coco, a) for a in anns]
        for i, ann in enumerate(anns):
            visible = masks[i].copy()
            for later in masks[i + 1 :]:
                visible &= ~later
            cat = ann["category_id"]
            matched = hue_matches(pixels[visible], CATEGORY_HUES[cat])
            hits[cat] = hits.get(cat, 0) + int(matched.sum())
            totals[cat] = totals.get(cat, 0) + int(visible.sum())
    return {cat: hits[cat] / totals[cat] for cat in totals if totals[cat]}


def test_same_seed_same_dataset_and_prefix_stable(dataset):
    coco, images = dataset
    again, again_images = make_dataset(NUM_IMAGES, seed=0, width=WIDTH, height=HEIGHT)
    assert json.dumps(coco) == json.dumps(again)
    assert all(np.array_equal(a, b) for a, b in zip(images, again_images, strict=True))
    shorter, shorter_images = make_dataset(5, seed=0, width=WIDTH, height=HEIGHT)
    assert np.array_equal(shorter_images[4], images[4])
    assert shorter["images"] == coco["images"][:5]


def test_other_seed_other_dataset(dataset):
    coco, images = dataset
    other, other_images = make_dataset(NUM_IMAGES, seed=1, width=WIDTH, height=HEIGHT)
    assert json.dumps(coco["annotations"]) != json.dumps(other["annotations"])
    assert not np.array_equal(images[0], other_images[0])


def test_written_files_are_deterministic(written, tmp_path):
    out, summary = written
    again = tmp_path / "again"
    run_synth(SynthConfig(out=str(again), num_images=NUM_IMAGES, seed=0))
    assert (out / "annotations.json").read_bytes() == (again / "annotations.json").read_bytes()
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == sorted(p.name for p in (again / "images").iterdir())
    assert all(
        (out / "images" / n).read_bytes() == (again / "images" / n).read_bytes() for n in names
    )
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"


def test_summary_and_file_layout(written):
    out, summary = written
    assert summary["annotations"] == str(out / "annotations.json")
    assert summary["num_images"] == NUM_IMAGES
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:012d}.jpg" for i in range(1, NUM_IMAGES + 1)]
    data = json.loads((out / "annotations.json").read_text())
    assert list(data) == ["info", "licenses", "images", "annotations", "categories"]
    assert summary["num_annotations"] == len(data["annotations"])
    image = cv2.imread(str(out / "images" / names[0]))
    assert image.shape == (HEIGHT, WIDTH, 3)


def test_every_feature_present(dataset):
    coco, _ = dataset
    anns = coco["annotations"]
    cat_ids = sorted(c["id"] for c in coco["categories"])
    assert len(cat_ids) == 5 and cat_ids != list(range(1, 6)), "category ids should have gaps"
    assert {a["category_id"] for a in anns} == set(cat_ids)

    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    assert any(len(a["segmentation"]) > 1 for a in polygons), "no multi-part polygon"
    crowds = [a for a in anns if a["iscrowd"]]
    assert len(crowds) >= NUM_IMAGES // 8
    assert all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    assert all(a["segmentation"]["size"] == [HEIGHT, WIDTH] for a in crowds)
    compressed = [a for a in anns if isinstance(a["segmentation"], dict) and not a["iscrowd"]]
    assert compressed and all(isinstance(a["segmentation"]["counts"], str) for a in compressed)

    annotated = {a["image_id"] for a in anns}
    assert any(img["id"] not in annotated for img in coco["images"]), "no image without objects"
    assert len({a["id"] for a in anns}) == len(anns)


def test_polygons_lie_inside_the_image(dataset):
    coco, _ = dataset
    for ann in coco["annotations"]:
        if isinstance(ann["segmentation"], list):
            for polygon in ann["segmentation"]:
                xy = np.array(polygon).reshape(-1, 2)
                assert xy.min() >= 0 and (xy <= [WIDTH, HEIGHT]).all(), ann["id"]


def test_objects_overlap(dataset):
    coco_dict, _ = dataset
    coco = coco_from_dict(coco_dict)
    overlapping_images = 0
    for image_id in coco.getImgIds():
        masks = [ann_mask(coco, a) for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
        if len(masks) > 1 and np.sum(np.sum(masks, axis=0) > 1) > 0:
            overlapping_images += 1
    assert overlapping_images >= 2


def test_file_loads_with_pycocotools_and_area_bbox_match(written):
    out, _ = written
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == NUM_IMAGES
    assert sorted(coco.getCatIds()) == [1, 3, 7, 18, 44]
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = ann_mask(coco, ann)
        assert mask.sum() == ann["area"] > 0
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_masks_match_drawn_colours(dataset):
    coco_dict, images = dataset
    coco = coco_from_dict(coco_dict)
    by_id = {img["id"]: pixels for img, pixels in zip(coco_dict["images"], images, strict=True)}
    fractions = visible_class_fractions(coco, by_id)
    assert set(fractions) == set(CATEGORY_HUES)
    assert min(fractions.values()) > 0.95, fractions


def test_jpeg_files_keep_class_colours(written):
    out, _ = written
    coco = COCO(str(out / "annotations.json"))
    images = {
        img["id"]: cv2.imread(str(out / "images" / img["file_name"]))
        for img in coco.loadImgs(coco.getImgIds())
    }
    fractions = visible_class_fractions(coco, images)
    assert min(fractions.values()) > 0.9, fractions


def test_background_is_not_a_class_colour(dataset):
    coco_dict, images = dataset
    coco = coco_from_dict(coco_dict)
    for img, pixels in zip(coco_dict["images"], images, strict=True):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        covered = np.zeros(pixels.shape[:2], bool)
        for ann in anns:
            covered |= ann_mask(coco, ann)
        background = pixels[~covered]
        for hue in CATEGORY_HUES.values():
            assert hue_matches(background, hue).mean() < 0.01


@pytest.mark.parametrize("corner", [False, True])
def test_uncompressed_rle_round_trips_through_pycocotools(corner):
    rng = np.random.default_rng(3)
    mask = rng.random((7, 5)) > 0.6
    mask[0, 0] = corner
    rle = encode_uncompressed_rle(mask)
    assert sum(rle["counts"]) == mask.size
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 7, 5)).astype(bool)
    assert np.array_equal(decoded, mask)


def test_bad_size_is_a_user_error(tmp_path: Path):
    with pytest.raises(RaysegError, match="num_images"):
        run_synth(SynthConfig(out=str(tmp_path), num_images=0))


def coco_from_dict(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco
