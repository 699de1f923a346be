"""The masks Parquet as Hugging Face `datasets` reads it: Image features, class names kept.

Shards are rendered in-process (rayseg.shard.render_shard is plain Python), no Ray.
"""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before `datasets` is imported

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_coco import tiny_coco, write_coco, write_images

import rayseg
from rayseg import export, storage
from rayseg.config import MasksConfig, load_config
from rayseg.masks import plan_masks
from rayseg.shard import render_shard, scheme_meta

datasets = pytest.importorskip("datasets")


def write_parts(tmp_path, **settings):
    data = tiny_coco()
    values = {
        "annotations": str(write_coco(tmp_path / "in.json", data)),
        "out": str(tmp_path / "out"),
        "images_dir": str(write_images(tmp_path / "images", data)),
        "shard_size": 2,
        **settings,
    }
    cfg = load_config(MasksConfig, None, values)
    out = tmp_path / "out"
    for sub in ("masks", "parquet", "_shards"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    planned = plan_masks(cfg)
    for job in planned.jobs:
        render_shard(job)
    meta = scheme_meta(planned.scheme, planned.names)
    (out / "README.md").write_text(export.dataset_card(meta))
    return out


def load_hf(out, tmp_path):
    """What a user types: `load_dataset(OUT)`, read through OUT/README.md."""
    return datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))


def test_plain_parquet_loading_keeps_class_names_through_the_schema_metadata(tmp_path):
    out = write_parts(tmp_path, values="train_id")
    files = sorted(str(p) for p in (out / "parquet").glob("*.parquet"))
    ds = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    labels = ds.features["value_pixels"].feature["value"]
    assert labels.int2str(3) == "train"
    assert ds.features["mask"] == datasets.Value("binary")  # Image needs the card or features=


def test_datasets_loads_images_and_masks_as_image_features(tmp_path):
    out = write_parts(tmp_path, values="train_id")
    ds = load_hf(out, tmp_path)
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["mask"], datasets.Image)
    row = next(r for r in ds if r["image_id"] == 2)
    parquet = {r["image_id"]: r for r in pq.read_table(out / "parquet").to_pylist()}
    assert np.array_equal(np.asarray(row["mask"]), storage.decode_png(parquet[2]["mask"]))
    assert np.asarray(row["image"].convert("RGB")).shape == (20, 20, 3)


def test_datasets_keeps_the_class_names_of_mask_values(tmp_path):
    ds = load_hf(write_parts(tmp_path, values="train_id"), tmp_path)
    labels = ds.features["value_pixels"].feature["value"]
    assert isinstance(labels, datasets.ClassLabel)
    assert [labels.int2str(v) for v in (0, 1, 2, 3, 255)] == [
        "background",
        "person",
        "car",
        "train",
        "ignore",
    ]
    row = next(r for r in ds if r["image_id"] == 2)
    assert row["category_ids"] == [3, 7]  # COCO ids, whatever the value scheme
    assert [labels.int2str(p["value"]) for p in row["value_pixels"]] == [
        "background",
        "car",
        "train",
    ]


def test_sixteen_bit_masks_keep_plain_integer_values(tmp_path):
    ds = load_hf(write_parts(tmp_path, values="scaled"), tmp_path)
    assert isinstance(ds.features["value_pixels"].feature["value"], datasets.Value)
    row = next(r for r in ds if r["image_id"] == 1)
    assert np.asarray(row["mask"]).max() == 100  # person (id 1) x 100, still 16-bit
    assert [p["value"] for p in row["value_pixels"]] == [0, 100]


def test_rayseg_metadata_names_its_version(tmp_path):
    meta = storage.read_mask_meta(str(write_parts(tmp_path)))
    assert meta["rayseg_version"] == rayseg.__version__
    assert [c["name"] for c in meta["classes"]] == ["person", "car", "train"]
