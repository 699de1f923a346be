"""`rayseg masks --layout voc` loaded by torchvision's own VOCSegmentation (local Ray cluster)."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_coco import tiny_coco, write_coco, write_images

from rayseg import export, layout, naming, storage
from rayseg.config import VAL_FRACTION, MasksConfig, load_config
from rayseg.errors import RaysegError
from rayseg.masks import plan_masks, run_masks
from rayseg.split import split_ids

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported
VOCSegmentation = pytest.importorskip("torchvision.datasets").VOCSegmentation


@pytest.fixture(scope="module")
def voc_out(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("voc")
    data = tiny_coco()
    values = {
        "annotations": str(write_coco(tmp / "in.json", data)),
        "out": str(tmp / "out"),
        "images_dir": str(write_images(tmp / "images", data)),
        "preset": "torchvision-voc",
        "layout": "voc",
        "shard_size": 2,
    }
    manifest = run_masks(load_config(MasksConfig, None, values))
    return tmp / "out", manifest


def parquet_masks(out) -> dict[str, np.ndarray]:
    rows = pq.read_table(out / "parquet", columns=["file_name", "mask"]).to_pylist()
    return {naming.base_stem(r["file_name"]): storage.decode_png(r["mask"]) for r in rows}


def test_torchvision_loads_the_voc_folder_as_it_is(voc_out):
    out, _ = voc_out
    expected = parquet_masks(out)
    seen = []
    for image_set in ("train", "val"):
        ds = VOCSegmentation(str(out), year=layout.VOC_YEAR, image_set=image_set, download=False)
        for k in range(len(ds)):
            image, target = ds[k]
            stem = naming.base_stem(ds.masks[k])
            assert naming.base_stem(ds.images[k]) == stem
            assert target.mode == "P"  # indexed PNG: the values are class indices
            assert np.array_equal(np.asarray(target), expected[stem])
            assert image.size == target.size
            seen.append(stem)
    assert sorted(seen) == sorted(expected)


def test_split_is_the_one_rayseg_train_uses(voc_out):
    out, manifest = voc_out
    sets = out / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    train, val = split_ids(np.arange(1, 6), VAL_FRACTION, seed=0)
    assert (sets / "train.txt").read_text().split() == [f"{i:012d}" for i in train]
    assert (sets / "val.txt").read_text().split() == [f"{i:012d}" for i in val]
    assert manifest["voc"] == {"train": 4, "val": 1, "trainval": 5}


def test_hf_card_lists_the_voc_split(voc_out, tmp_path):
    datasets = pytest.importorskip("datasets")
    out, _ = voc_out
    card = (out / "README.md").read_text()
    assert "Split: 4 train and 1 val images" in card  # before: one `train` split, no word of it
    cache = str(tmp_path / "hf")
    split = datasets.load_dataset(str(out), "split", split="train", cache_dir=cache)
    by_split = {"train": set(), "val": set()}
    for image_id, name in zip(split["image_id"], split["split"], strict=True):
        by_split[name].add(image_id)
    train, val = split_ids(np.arange(1, 6), VAL_FRACTION, seed=0)
    assert by_split == {"train": set(train.tolist()), "val": set(val.tolist())}
    ds = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    held_out = ds.filter(lambda r: r["image_id"] in by_split["val"])
    assert held_out["image_id"] == sorted(by_split["val"])


def test_class_list_names_every_value_with_its_palette_colour(voc_out):
    out, _ = voc_out
    classes = json.loads((out / "VOCdevkit" / "VOC2012" / "classes.json").read_text())
    assert [c["value"] for c in classes] == [*range(21), 255]
    assert (classes[0]["name"], classes[15]["name"], classes[-1]["name"]) == (
        "background",
        "person",
        "ignore",
    )
    assert classes[15]["category_id"] == 1
    assert classes[1]["color"] == [128, 0, 0]  # VOC's aeroplane red


def test_voc_layout_needs_the_images(tmp_path):
    annotations = write_coco(tmp_path / "in.json", tiny_coco())
    cfg = load_config(
        MasksConfig, None, {"annotations": str(annotations), "out": "o", "layout": "voc"}
    )
    with pytest.raises(RaysegError, match="--layout voc needs --images-dir"):
        plan_masks(cfg)


def test_voc_palette_is_pascals():
    pal = export.voc_palette()
    assert pal[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert pal[255].tolist() == list(export.IGNORE_COLOR)
