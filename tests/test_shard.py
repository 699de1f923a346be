"""`rayseg masks` end to end on a local 2-CPU Ray cluster: outputs, resume, problems."""

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_coco import square, tiny_coco, write_coco, write_images

from rayseg import masks, storage
from rayseg.coco import load_coco
from rayseg.coco_apart import annotations_by_image
from rayseg.config import MasksConfig, load_config
from rayseg.errors import RaysegError
from rayseg.masks import run_masks
from rayseg.render import value_scheme
from rayseg.shard import plan_jobs, render_shard

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_sample"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_local):
    yield


@pytest.fixture
def dataset(tmp_path):
    data = tiny_coco()
    return write_coco(tmp_path / "in.json", data), write_images(tmp_path / "images", data)


def masks_config(annotations, out, **kw):
    return load_config(MasksConfig, None, {"annotations": str(annotations), "out": str(out), **kw})


def read_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "parquet").to_pylist()


def test_full_run_writes_masks_parquet_manifest(dataset, tmp_path):
    annotations, images = dataset
    out = tmp_path / "out"
    manifest = run_masks(masks_config(annotations, out, images_dir=str(images), shard_size=2))
    assert manifest["counts"]["masks_written"] == 5
    assert manifest["counts"]["failed"] == 0 and manifest["problems"] == []
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == [
        "000000000001_mask_cats_1.png",
        "000000000002_mask_cats_3_7.png",
        "000000000003_mask_cats_1_3.png",
        "000000000004_mask_cats_.png",
        "000000000005_mask_cats_7.png",
    ]
    rows = read_rows(out)
    assert sorted(r["image_id"] for r in rows) == [1, 2, 3, 4, 5]
    for row in rows:
        from_parquet = storage.decode_png(row["mask"])
        from_png = storage.decode_png((out / row["mask_path"]).read_bytes())
        assert np.array_equal(from_parquet, from_png)
        assert from_png.shape == (row["height"], row["width"])
        assert row["image"] == (images / row["file_name"]).read_bytes()
        counts = {c["value"]: c["pixels"] for c in row["value_pixels"]}
        assert sum(counts.values()) == row["height"] * row["width"]
    meta = storage.read_mask_meta(str(out))
    assert [c["category_id"] for c in meta["classes"]] == [1, 3, 7]
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["config"]["shard_size"] == 2
    assert saved["class_pixels"]["background"] > 0
    assert not [p for p in out.rglob("*") if storage.is_temporary(p.name)]
    assert (out / "README.md").read_text().startswith("---\nconfigs:")  # the HF dataset card


def test_preset_run_writes_stem_named_voc_index_masks(dataset, tmp_path):
    annotations, _ = dataset
    out = tmp_path / "out"
    run_masks(masks_config(annotations, out, preset="torchvision-voc"))
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == [f"{i:012d}.png" for i in range(1, 6)]
    mask = storage.decode_png((out / "masks" / "000000000001.png").read_bytes())
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 15}  # person is VOC class 15
    rows = {r["image_id"]: r for r in read_rows(out)}
    assert rows[2]["category_ids"] == [3, 7]  # COCO ids, while the pixels hold VOC indices
    assert {c["value"] for c in rows[2]["value_pixels"]} == {0, 7, 19, 255}
    with pytest.raises(RaysegError, match="classes"):
        run_masks(masks_config(annotations, out, preset="torchvision-voc", classes="1"))


def test_rerun_resumes_and_changed_settings_refused(dataset, tmp_path):
    annotations, _ = dataset
    out = tmp_path / "out"
    run_masks(masks_config(annotations, out, shard_size=2))
    again = run_masks(masks_config(annotations, out, shard_size=2))
    assert again["counts"]["resumed"] == 5 and again["counts"]["masks_written"] == 0
    with pytest.raises(RaysegError, match="overlap differ"):
        run_masks(masks_config(annotations, out, shard_size=2, overlap="last"))
    redo = run_masks(masks_config(annotations, out, shard_size=2, overlap="last", overwrite=True))
    assert redo["counts"]["masks_written"] == 5
    # The plan fingerprints the input by the sha1 of its bytes: an edited file is refused.
    plan = json.loads((out / "_shards" / "plan.json").read_text())
    assert plan["annotations_sha1"] == hashlib.sha1(annotations.read_bytes()).hexdigest()
    annotations.write_bytes(annotations.read_bytes() + b"\n")
    with pytest.raises(RaysegError, match="annotations_sha1 differ"):
        run_masks(masks_config(annotations, out, shard_size=2, overlap="last"))


def test_interrupted_run_redoes_only_unfinished_shards(dataset, tmp_path):
    annotations, _ = dataset
    out = tmp_path / "out"
    run_masks(masks_config(annotations, out, shard_size=2))
    # What a kill between a shard's PNGs and its record leaves behind.
    (out / "_shards" / "shard-00001.json").unlink()
    (out / "parquet" / "part-00001.parquet").unlink()
    (out / "parquet" / storage.temporary_name("part-00001.parquet")).write_bytes(b"half")
    manifest = run_masks(masks_config(annotations, out, shard_size=2))
    assert manifest["counts"]["shards_run"] == 1
    assert manifest["counts"]["masks_written"] == 2 and manifest["counts"]["resumed"] == 3
    assert sorted(r["image_id"] for r in read_rows(out)) == [1, 2, 3, 4, 5]
    assert not [p for p in out.rglob("*") if storage.is_temporary(p.name)]


def test_driver_renders_while_ray_starts_and_ray_renders_the_rest(tmp_path, monkeypatch):
    """Shards the driver renders before Ray is up and those Ray renders make one output, each
    image exactly once; a rerun resumes all of them."""
    data = tiny_coco()
    for k in range(6, 41):  # 40 images, 10 shards of 4
        data["images"].append({"id": k, "file_name": f"extra{k}.jpg", "height": 20, "width": 20})
        data["annotations"].append(
            {
                "id": 1000 + k,
                "image_id": k,
                "category_id": 3,
                "iscrowd": 0,
                "area": 36.0,
                "bbox": [2, 2, 6, 6],
                "segmentation": [square(2, 2, 8, 8)],
            }
        )
    annotations = write_coco(tmp_path / "in.json", data)
    out = tmp_path / "out"
    real_connect = masks.connect_ray

    ray_up = []  # the event masks sets once Ray is up (render_until's `stop`)
    started_after_up = []
    fourth_started = threading.Event()

    def slow_start(address, num_cpus):  # Ray "starts" until the driver is on its 4th shard
        assert fourth_started.wait(60), "the driver rendered no shard while Ray started"
        real_connect(address, num_cpus)

    def watching_render_until(prepared, stop, progress):
        ray_up.append(stop)
        return real_render_until(prepared, stop, progress)

    def render_in_driver(job):
        # Events, not sleeps, order it: Ray comes up while the 4th shard renders, which holds
        # until masks has seen Ray up, however slow or busy this machine is.
        started_after_up.append(ray_up[0].is_set())
        if len(started_after_up) == 4:
            fourth_started.set()
        record = render_shard(job)
        if len(started_after_up) >= 4:
            assert ray_up[0].wait(60), "Ray did not come up"
        return record

    real_render_until = masks.render_until
    monkeypatch.setattr(masks, "connect_ray", slow_start)
    monkeypatch.setattr(masks, "render_until", watching_render_until)
    monkeypatch.setattr(masks, "render_shard", render_in_driver)
    manifest = run_masks(masks_config(annotations, out, shard_size=4))
    records = [json.loads(p.read_text()) for p in (out / "_shards").glob("shard-*.json")]
    by_driver = [r["shard"] for r in records if r["pid"] == os.getpid()]
    # The driver rendered while Ray started, finished the shard it was on, and began none
    # once Ray was up: Ray rendered the rest.
    assert sorted(by_driver) == [0, 1, 2, 3]
    assert started_after_up == [False] * 4
    assert len(records) == 10 and manifest["counts"]["shards_run"] == 10
    assert manifest["counts"]["masks_written"] == 40
    written = sorted(i for r in records for i in r["written"])
    assert written == list(range(1, 41))
    assert sorted(r["image_id"] for r in read_rows(out)) == written
    assert len(list((out / "masks").iterdir())) == 40
    again = run_masks(masks_config(annotations, out, shard_size=4))
    assert again["counts"]["resumed"] == 40 and again["counts"]["shards_run"] == 0


def test_a_shard_job_carries_each_image_its_own_annotations_and_pickles_equal(dataset, tmp_path):
    import pickle

    import ray.cloudpickle

    annotations, _ = dataset
    index = load_coco(str(annotations))
    by_image = annotations_by_image(index)
    cfg = masks_config(annotations, tmp_path / "out", shard_size=3)
    images = []
    for job in plan_jobs(index, cfg, value_scheme([1, 3, 7], "category_id")):
        assert job.images and any(rec.annotations for rec in job.images)
        assert pickle.loads(ray.cloudpickle.dumps(job)) == job
        for rec in job.images:
            images.append(rec.id)
            own = by_image.get(rec.id, [])
            assert list(rec.annotations) == [bytes(index.ann_raw[p]) for p in own]
    assert images == [im.id for im in index.images]


def test_ray_equals_single_process_path(dataset, tmp_path):
    annotations, _ = dataset
    cfg = masks_config(
        annotations,
        tmp_path / "ray",
        shard_size=2,
        overlap="ignore",
        values="train_id",
        naming="stem",
    )
    run_masks(cfg)
    local = masks_config(
        annotations,
        tmp_path / "local",
        shard_size=2,
        overlap="ignore",
        values="train_id",
        naming="stem",
    )
    index = load_coco(local.annotations)
    for sub in ("masks", "parquet", "_shards"):
        (tmp_path / "local" / sub).mkdir(parents=True)
    for job in plan_jobs(index, local, value_scheme([1, 3, 7], "train_id")):
        render_shard(job)
    for png in sorted((tmp_path / "ray" / "masks").iterdir()):
        assert png.read_bytes() == (tmp_path / "local" / "masks" / png.name).read_bytes()
    ray_rows = read_rows(tmp_path / "ray")
    local_rows = read_rows(tmp_path / "local")
    assert ray_rows == local_rows


def test_value_schemes_in_pixels(dataset, tmp_path):
    annotations, _ = dataset
    for values, expected, dtype in (
        ("category_id", 7, np.uint8),
        ("train_id", 3, np.uint8),
        ("scaled", 700, np.uint16),
    ):
        out = tmp_path / values
        run_masks(masks_config(annotations, out, values=values, naming="stem"))
        mask = storage.decode_png((out / "masks" / "000000000005.png").read_bytes())
        assert mask.dtype == dtype
        assert set(np.unique(mask).tolist()) == {0, expected}


def test_palette_masks_keep_values(dataset, tmp_path):
    annotations, _ = dataset
    out = tmp_path / "pal"
    run_masks(masks_config(annotations, out, palette=True, naming="stem"))
    data = (out / "masks" / "000000000002.png").read_bytes()
    assert data[25] == 3
    assert set(np.unique(storage.decode_png(data)).tolist()) == {0, 3, 7}


def test_bad_records_listed_and_good_images_rendered(tmp_path):
    data = tiny_coco()
    data["images"] += [
        {"id": 6, "file_name": "000000000006.jpg", "height": 0, "width": 20},
        {"id": 7, "file_name": "000000000007.jpg", "height": 20, "width": 20},
        {"id": 8, "file_name": "000000000008.jpg", "height": 20, "width": 20},
        {"id": 9, "file_name": "000000000009.jpg", "height": 20, "width": 20},
    ]
    bad = [
        {"id": 101, "image_id": 999, "category_id": 1, "segmentation": [square(0, 0, 5, 5)]},
        {"id": 102, "image_id": 1, "category_id": 42, "segmentation": [square(0, 0, 5, 5)]},
        {"id": 103, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5]]},
        {"id": 104, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1]]},
        {"id": 105, "image_id": 1, "category_id": 1, "segmentation": []},
        {"id": 106, "image_id": 1, "category_id": 3, "segmentation": [square(15, 15, 90, 90)]},
        {
            "id": 107,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": {"size": [10, 10], "counts": [100]},
        },
    ]
    data["annotations"] += bad
    annotations = write_coco(tmp_path / "bad.json", data)
    images = write_images(tmp_path / "images", data | {"images": data["images"][:5]})
    (images / "000000000007.jpg").write_bytes(b"not a jpeg")
    write_images(
        images, {"images": [{"id": 8, "file_name": "000000000008.jpg", "height": 30, "width": 20}]}
    )
    manifest = run_masks(masks_config(annotations, tmp_path / "out", images_dir=str(images)))
    by_ann = {p.get("annotation_id"): p for p in manifest["problems"]}
    for ann_id in (101, 102, 103, 104, 105, 106, 107):
        assert ann_id in by_ann, ann_id
    # Entries keep the manifest shape: the render task fills in the image id.
    assert list(by_ann[103]) == ["image_id", "annotation_id", "reason"]
    assert by_ann[103]["image_id"] == 1 and by_ann[107]["image_id"] == 2
    by_image = {
        p["image_id"]: p["reason"] for p in manifest["problems"] if "annotation_id" not in p
    }
    assert "height is 0" in by_image[6]
    assert "does not decode" in by_image[7]
    assert "20x30" in by_image[8]
    assert "missing" in by_image[9]
    assert manifest["counts"]["masks_written"] == 5
    assert manifest["counts"]["failed"] == 4
    mask = storage.decode_png(
        (tmp_path / "out" / "masks" / "000000000001_mask_cats_1_3.png").read_bytes()
    )
    assert (mask == 3).sum() > 0  # the clipped object is still drawn


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/coco_sample not present")
def test_real_coco_sample_matches_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "real"
    manifest = run_masks(
        masks_config(
            SAMPLE / "annotations.json",
            out,
            rasterizer="coco",
            images_dir=str(SAMPLE / "images"),
            naming="stem",
        )
    )
    assert manifest["counts"]["masks_written"] == 160 and manifest["counts"]["failed"] == 0
    coco = COCO(str(SAMPLE / "annotations.json"))
    for image_id, info in coco.imgs.items():
        ref = np.zeros((info["height"], info["width"]), np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            ref = np.maximum(ref, coco.annToMask(ann) * ann["category_id"])
        mask = storage.decode_png(
            (out / "masks" / (Path(info["file_name"]).stem + ".png")).read_bytes()
        )
        assert np.array_equal(mask, ref), image_id
