"""The masks Parquet as Hugging Face `datasets` reads it: Image features, class names kept.

Shards are rendered in-process (rayseg.shard.render_shard is plain Python), no Ray.
"""

import os
import re

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


def write_parts(tmp_path, split=None, **settings):
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
    (out / "README.md").write_text(export.dataset_card(meta, split=split))
    export.write_hf_classes(storage.locate(str(out)), meta)
    return out


def load_hf(out, tmp_path):
    """What a user types: `load_dataset(OUT)`, read through OUT/README.md."""
    return datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))


def test_plain_parquet_loading_keeps_the_features_of_the_schema_metadata(tmp_path):
    out = write_parts(tmp_path, values="train_id")
    files = sorted(str(p) for p in (out / "parquet").glob("*.parquet"))
    ds = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.features["value_pixels"].feature["value"] == datasets.Value("int64")
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


def load_classes(out, tmp_path):
    """The README's recipe: the card's `classes` config."""
    return datasets.load_dataset(
        str(out), "classes", split="train", cache_dir=str(tmp_path / "hf-classes")
    )


def test_datasets_names_only_the_classes_that_exist_and_ignore(tmp_path):
    out = write_parts(tmp_path, values="train_id", overlap="ignore_any", crowd="ignore")
    ds = load_hf(out, tmp_path)
    # Before: a ClassLabel of 256 names (252 `unused_N`), num_classes 256.
    assert ds.features["value_pixels"].feature["value"] == datasets.Value("int64")
    classes = load_classes(out, tmp_path)
    names = dict(zip(classes["value"], classes["name"], strict=True))
    assert names == {0: "background", 1: "person", 2: "car", 3: "train", 255: "ignore"}
    num_classes = len(names) - 1  # as the README says: ignore is not a class
    assert num_classes == 4
    assert classes["category_id"] == [None, 1, 3, 7, None]
    values = {p["value"] for row in ds for p in row["value_pixels"]}
    assert 255 in values and values <= set(names)  # every value in the data has a name
    row = next(r for r in ds if r["image_id"] == 2)
    assert row["category_ids"] == [3, 7]  # COCO ids, whatever the value scheme
    assert [names[p["value"]] for p in row["value_pixels"]][:3] == ["background", "car", "train"]


def test_card_says_the_split_rayseg_made(tmp_path):
    where = "VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt"
    split = {"train": 4, "val": 1, "where": where}
    out = write_parts(tmp_path, values="train_id", split=split)
    card = (out / "README.md").read_text()
    assert "Split: 4 train and 1 val images" in card
    assert "VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt" in card
    assert "Classes: 4 (background and 3 categories); mask value 255 is ignore" in card
    (tmp_path / "plain").mkdir()
    plain = (write_parts(tmp_path / "plain", values="train_id") / "README.md").read_text()
    assert "Split: none" in plain


def readme_block(title: str) -> str:
    """The first python block after `title` in docs/outputs.md (the README's "outputs with
    other tools")."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
    after = text[text.index(title) :]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_dataloader_over_load_dataset_runs(tmp_path):
    torch = pytest.importorskip("torch")
    out = write_parts(tmp_path, values="train_id", overlap="ignore_any", crowd="ignore")
    code = readme_block("## Hugging Face `datasets`").replace('"OUT"', repr(str(out)))
    code = code.replace("SIZE = 480", "SIZE = 64")
    code = code.replace('split="train")', f'split="train", cache_dir={str(tmp_path / "c")!r})')
    namespace: dict = {}
    exec(compile(code, "docs/outputs.md", "exec"), namespace)  # noqa: S102 - the README's own code
    batch = next(iter(namespace["loader"]))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 64, 64) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 255}
    assert namespace["num_classes"] == 4


def test_sixteen_bit_masks_keep_plain_integer_values(tmp_path):
    out = write_parts(tmp_path, values="scaled")
    ds = load_hf(out, tmp_path)
    assert isinstance(ds.features["value_pixels"].feature["value"], datasets.Value)
    classes = load_classes(out, tmp_path)
    assert dict(zip(classes["value"], classes["name"], strict=True))[100] == "person"
    row = next(r for r in ds if r["image_id"] == 1)
    assert np.asarray(row["mask"]).max() == 100  # person (id 1) x 100, still 16-bit
    assert [p["value"] for p in row["value_pixels"]] == [0, 100]


def test_rayseg_metadata_names_its_version(tmp_path):
    meta = storage.read_mask_meta(str(write_parts(tmp_path)))
    assert meta["rayseg_version"] == rayseg.__version__
    assert [c["name"] for c in meta["classes"]] == ["person", "car", "train"]


@pytest.mark.slow  # starts a Ray of its own: ~15 s on an idle 2-core machine
def test_readme_ray_data_snippet_is_quiet(tmp_path):
    """The README's Ray Data block, run as a user runs it: nothing on stderr, the mask read."""
    import shutil
    import subprocess
    import sys
    import tempfile

    out = write_parts(tmp_path, values="train_id")
    code = readme_block("Ray Data (2.60), quiet").replace('"OUT/', f'"{out}/')
    code += "\nprint(mask.shape, mask.dtype)\nray.shutdown()\n"
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths must be short
    try:
        env = {**os.environ, "RAY_TMPDIR": ray_tmp}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    # A raylet's own warning on a machine too loaded to start workers at Ray's pace is not the
    # snippet's to silence (Ray prints it whatever the log settings).
    lines = [
        line
        for line in result.stdout.splitlines()
        if not ("(raylet)" in line and "worker processes have been started" in line)
    ]
    # One mask of the folder (which row comes first depends on Ray Data's read order).
    assert len(lines) == 1 and re.fullmatch(r"\(\d+, \d+\) uint8", lines[0]), result.stdout
    # Before: a deprecation warning for `columns=` and Ray Data's INFO lines.
    assert result.stderr.strip() == "", result.stderr
