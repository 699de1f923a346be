"""`rayseg masks --classes` and `--preset torchvision-voc` against torchvision's COCO target.

The reference below re-implements torchvision references/segmentation/coco_utils.py
(FilterAndRemapCocoCategories + ConvertCocoPolysToMask) with pycocotools, independently of
rayseg's renderer. No Ray: the shards are rendered in-process.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from tiny_coco import annotation, square, uncompressed_rle, write_coco

from rayseg.config import MASK_PRESETS, MasksConfig, load_config
from rayseg.errors import RaysegError
from rayseg.masks import fingerprint, plan_masks
from rayseg.shard import render_image

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_sample"
# torchvision's CAT_LIST: index k is the training class of COCO category CAT_LIST[k].
CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]


def reference_target(anns: list[dict], height: int, width: int) -> np.ndarray:
    """torchvision's training target for one COCO image, (H, W) uint8."""
    anns = [a for a in anns if a["category_id"] in CAT_LIST]
    if not anns:
        return np.zeros((height, width), np.uint8)
    masks = []
    for a in anns:
        seg = a["segmentation"]
        if isinstance(seg, dict) and isinstance(seg["counts"], str):
            rles = seg  # compressed RLE (not in COCO's own files): decode as is
        else:
            rles = coco_mask.frPyObjects(seg, height, width)
        m = coco_mask.decode(rles)
        if m.ndim < 3:
            m = m[..., None]
        masks.append(m.any(axis=2))
    stacked = np.stack(masks).astype(np.uint8)  # (N, H, W)
    cats = np.array([CAT_LIST.index(a["category_id"]) for a in anns], np.uint8)
    target = (stacked * cats[:, None, None]).max(axis=0)
    target[stacked.sum(axis=0) > 1] = 255
    return target


def voc_coco() -> dict:
    """Every case the rule distinguishes, in 24x24 images, VOC and non-VOC categories mixed."""
    crowd = np.zeros((24, 24), np.uint8)
    crowd[10:20, 10:20] = 1
    cats = [
        {"id": 1, "name": "person"},
        {"id": 18, "name": "dog"},
        {"id": 27, "name": "backpack"},  # not a VOC class
        {"id": 72, "name": "tv"},
    ]
    images = [{"id": i, "file_name": f"img{i}.jpg", "height": 24, "width": 24} for i in (1, 2, 3)]
    anns = [
        annotation(1, 1, 1, [square(2, 2, 10, 10)], 64.0, [2, 2, 8, 8]),
        annotation(2, 1, 1, [square(6, 6, 14, 14)], 64.0, [6, 6, 8, 8]),  # same class overlap
        annotation(3, 1, 18, uncompressed_rle(crowd), 100.0, [10, 10, 10, 10]),  # crowd overlap
        annotation(4, 2, 27, [square(0, 0, 20, 20)], 400.0, [0, 0, 20, 20]),  # filtered out
        annotation(5, 2, 72, [square(4, 4, 8, 8)], 16.0, [4, 4, 4, 4]),
        annotation(6, 2, 18, [square(12, 12, 16, 16), square(14, 14, 20, 20)], 1.0, [12, 12, 8, 8]),
    ]
    # image 3 has no annotations
    return {"images": images, "annotations": anns, "categories": cats}


def rendered(cfg: MasksConfig) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """image id -> (rayseg's mask, the reference target)."""
    planned = plan_masks(cfg)
    out = {}
    for job in planned.jobs:
        for rec in job.images:
            mask, _, _ = render_image(rec, job)
            anns = [json.loads(raw) for raw in rec.annotations]
            out[rec.id] = (mask, reference_target(anns, rec.height, rec.width))
    return out


def preset_config(annotations: Path, out: Path, **kw) -> MasksConfig:
    values = {"annotations": str(annotations), "out": str(out), "preset": "torchvision-voc"}
    return load_config(MasksConfig, None, {**values, **kw})


def test_preset_fills_settings_and_explicit_ones_win(tmp_path):
    cfg = preset_config(tmp_path / "a.json", tmp_path / "o")
    for key, value in MASK_PRESETS["torchvision-voc"].items():
        assert getattr(cfg, key) == value
    cfg = preset_config(tmp_path / "a.json", tmp_path / "o", overlap="max", naming="cats")
    assert (cfg.overlap, cfg.naming, cfg.values) == ("max", "cats", "train_id")


def test_preset_matches_the_reference_on_tiny_data(tmp_path):
    cfg = preset_config(write_coco(tmp_path / "in.json", voc_coco()), tmp_path / "o")
    masks = rendered(cfg)
    for image_id, (mask, expected) in masks.items():
        assert mask.dtype == np.uint8
        assert np.array_equal(mask, expected), image_id
    first, second = masks[1][0], masks[2][0]
    assert first[7, 7] == 255  # two persons
    assert first[15, 15] == CAT_LIST.index(18)  # the crowd alone, painted as dog
    assert first[12, 12] == 255  # person and crowd
    assert second[5, 5] == CAT_LIST.index(72)  # tv on top of a filtered-out backpack
    assert second[15, 15] == CAT_LIST.index(18)  # two parts of one dog are not an overlap
    assert not masks[3][0].any()


def test_classes_keep_only_the_chosen_categories_in_the_given_order(tmp_path):
    annotations = write_coco(tmp_path / "in.json", voc_coco())
    cfg = load_config(
        MasksConfig,
        None,
        {"annotations": str(annotations), "out": "o", "classes": "72,1", "values": "train_id"},
    )
    planned = plan_masks(cfg)
    assert planned.scheme.values == {72: 1, 1: 2}
    assert list(planned.names.values()) == ["tv", "person"]
    masks = rendered(cfg)
    assert set(np.unique(masks[2][0])) == {0, 1}  # the dog and the backpack are gone


def test_voc_classes_keep_voc_indices_when_the_file_lacks_some(tmp_path):
    planned = plan_masks(preset_config(write_coco(tmp_path / "in.json", voc_coco()), tmp_path))
    assert planned.scheme.values == {c: k for k, c in enumerate(CAT_LIST) if k}
    assert planned.names[5] == "airplane"  # not in the file: COCO's name


def test_unknown_class_ids_are_refused(tmp_path):
    annotations = write_coco(tmp_path / "in.json", voc_coco())
    cfg = load_config(
        MasksConfig, None, {"annotations": str(annotations), "out": "o", "classes": "1,99"}
    )
    with pytest.raises(RaysegError, match=r"category ids \[99\]"):
        plan_masks(cfg)


def test_class_choice_and_overlap_are_in_the_plan_fingerprint(tmp_path):
    base = {"annotations": "a.json", "out": "o"}
    plain = fingerprint("d", load_config(MasksConfig, None, base))
    voc = fingerprint("d", load_config(MasksConfig, None, {**base, "classes": "voc"}))
    assert plain["classes"] == "all" and voc["classes"] == "voc"
    preset = fingerprint("d", load_config(MasksConfig, None, {**base, "preset": "torchvision-voc"}))
    assert preset["overlap"] == "ignore_any" and preset != plain


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/coco_sample not present")
def test_preset_matches_the_reference_on_real_coco(tmp_path):
    masks = rendered(preset_config(SAMPLE / "annotations.json", tmp_path))
    assert len(masks) == 160
    differing = [i for i, (mask, expected) in masks.items() if not np.array_equal(mask, expected)]
    assert differing == []
    assert sum(int((m == 255).any()) for m, _ in masks.values()) > 0  # overlaps were exercised
