"""Nothing lost on hostile input (issue 9): names, ids, bad records, damaged or concurrent outputs.

Each test is a case that wrote wrong output without a word, or failed a whole shard, before.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_coco import CATEGORIES, square, write_coco

from rayseg import layout, lease, naming, storage
from rayseg.coco import load_coco
from rayseg.config import MasksConfig, load_config
from rayseg.errors import RaysegError
from rayseg.masks import plan_masks, run_masks
from rayseg.shard import render_shard


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_local):
    yield


def config(annotations, out, **kw):
    return load_config(MasksConfig, None, {"annotations": str(annotations), "out": str(out), **kw})


def coco(images, annotations=None, categories=CATEGORIES):
    """images: (id, file_name, width, height); image k gets one (k+2) x (k+2) square."""
    if annotations is None:
        annotations = [
            {
                "id": 100 + k,
                "image_id": i,
                "category_id": 1,
                "segmentation": [square(0, 0, 1 + k, 1 + k)],
                "area": 1.0,
                "iscrowd": 0,
            }
            for k, (i, *_) in enumerate(images)
        ]
    return {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": annotations,
        "categories": categories,
    }


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "parquet").to_pylist()


def own_mask_pixels(out: Path) -> dict[int, int]:
    """image id -> object pixels of the PNG its row's mask_path names."""
    result = {}
    for r in rows(out):
        mask = storage.decode_png((out / r["mask_path"]).read_bytes())
        assert np.array_equal(mask, storage.decode_png(r["mask"])), r["mask_path"]
        result[r["image_id"]] = int((mask > 0).sum())
    return result


def test_unique_stems_rule():
    stems = naming.unique_stems(
        [(1, "a/x.jpg"), (2, "b/x.jpg"), (3, "X.png"), (4, "x-1.jpg"), (5, "y.jpg"), (6, ".z.jpg")]
    )
    # x-1 is image 4's own stem, so image 1 (whose stem x is shared) gets x-1-2.
    assert stems == ["x-1-2", "x-2", "X-3", "x-1", "y", "_z"]
    assert len({s.casefold() for s in stems}) == len(stems)
    long = naming.unique_stems([(7, "é" * 200 + ".jpg")])[0]
    assert len(long.encode()) <= naming.STEM_BYTES and long == "é" * (naming.STEM_BYTES // 2)


def test_mask_name_with_many_categories_fits_name_max():
    name = naming.mask_name("x", list(range(1, 1204)), "cats")
    assert len(name.encode()) <= naming.NAME_MAX and name.endswith("_more.png")
    assert name.startswith("x_mask_cats_1_2_3_")


def test_same_stems_in_subfolders_get_their_own_masks(tmp_path):
    data = coco([(1, "a/x.jpg", 8, 8), (2, "b/x.jpg", 8, 8), (3, "c/y.jpg", 8, 8)])
    out = tmp_path / "out"
    manifest = run_masks(config(write_coco(tmp_path / "in.json", data), out, naming="stem"))
    assert manifest["counts"]["masks_written"] == 3 and manifest["problems"] == []
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["x-1.png", "x-2.png", "y.png"]
    # squares of 4, 9 and 16 pixels: each row's mask_path is that image's own mask
    assert own_mask_pixels(out) == {1: 4, 2: 9, 3: 16}


def test_file_name_with_tmp_marker_keeps_its_mask(tmp_path):
    data = coco([(1, "keep.tmp-1.jpg", 8, 8)])
    out = tmp_path / "out"
    run_masks(config(write_coco(tmp_path / "in.json", data), out, naming="stem"))
    assert (out / "masks" / "keep.tmp-1.png").exists()
    assert own_mask_pixels(out) == {1: 4}


def test_negative_image_ids_keep_their_annotations(tmp_path):
    data = coco([(-5, "neg.jpg", 8, 8), (-1, "minus_one.jpg", 8, 8)])
    out = tmp_path / "out"
    manifest = run_masks(config(write_coco(tmp_path / "in.json", data), out))
    assert manifest["problems"] == []
    assert own_mask_pixels(out) == {-5: 4, -1: 9}


def test_ids_beyond_64_bits_are_listed_problems(tmp_path):
    data = coco([(2**70, "huge.jpg", 8, 8), (1, "fine.jpg", 8, 8)])
    data["annotations"][1]["id"] = 2**64
    data["annotations"].append({**data["annotations"][1], "id": 7})
    out = tmp_path / "out"
    manifest = run_masks(config(write_coco(tmp_path / "in.json", data), out))
    reasons = [p["reason"] for p in manifest["problems"]]
    assert any("image id 1180591620717411303424 does not fit" in r for r in reasons), reasons
    assert any("id is 18446744073709551616" in r for r in reasons), reasons
    assert own_mask_pixels(out) == {1: 9}


def test_unrepresentable_file_names_are_listed_not_fatal(tmp_path):
    long_name = "n" * 250 + ".jpg"
    data = coco([(1, "nul\x00name.jpg", 8, 8), (2, long_name, 8, 8), (3, "ok.jpg", 8, 8)])
    out = tmp_path / "out"
    manifest = run_masks(config(write_coco(tmp_path / "in.json", data), out, naming="stem"))
    # the image, and its annotation (whose image is now not in the file)
    assert [p["image_id"] for p in manifest["problems"]] == [1, 1]
    assert "contains a NUL character" in manifest["problems"][0]["reason"]
    assert own_mask_pixels(out) == {2: 9, 3: 16}


def test_one_record_that_cannot_be_written_does_not_fail_its_shard(tmp_path):
    data = coco([(1, "a.jpg", 8, 8), (2, "b.jpg", 8, 8), (3, "c.jpg", 8, 8)])
    cfg = config(write_coco(tmp_path / "in.json", data), tmp_path / "out", naming="stem")
    job = plan_masks(cfg).jobs[0]
    # A stem no file system takes (over NAME_MAX): writing it raises ENAMETOOLONG.
    bad = job.images[1].__class__(**{**job.images[1].__dict__, "stem": "b" * 300})
    job = job.__class__(**{**job.__dict__, "images": (job.images[0], bad, job.images[2])})
    for sub in ("masks", "parquet", "_shards"):
        (tmp_path / "out" / sub).mkdir(parents=True, exist_ok=True)
    record = render_shard(job)
    assert record["written"] == [1, 3] and record["failed"] == [2]
    assert "File name too long" in record["problems"][0]["reason"]


def test_images_over_the_pixel_cap_are_listed_with_the_cap(tmp_path):
    data = coco([(1, "big.jpg", 20000, 20000), (2, "small.jpg", 8, 8)])
    out = tmp_path / "out"
    manifest = run_masks(config(write_coco(tmp_path / "in.json", data), out))
    (problem,) = manifest["problems"]
    assert problem["image_id"] == 1 and "over --max-pixels 100000000" in problem["reason"]
    assert own_mask_pixels(out) == {2: 9}


def many_images(tmp_path, n=6):
    data = coco([(i, f"{i:03d}.jpg", 8, 8) for i in range(1, n + 1)])
    return write_coco(tmp_path / "in.json", data)


def test_rerun_redoes_a_shard_whose_files_were_damaged(tmp_path, capsys):
    annotations, out = many_images(tmp_path), tmp_path / "out"
    run_masks(config(annotations, out, shard_size=2, naming="stem"))
    (out / "masks" / "003.png").unlink()  # shard 1
    part = out / "parquet" / "part-00002.parquet"
    part.write_bytes(part.read_bytes()[:100])  # shard 2, cut short
    capsys.readouterr()
    manifest = run_masks(config(annotations, out, shard_size=2, naming="stem"))
    text = capsys.readouterr().out
    assert "shard 1 is damaged (masks/003.png is missing)" in text
    assert "shard 2 is damaged (parquet/part-00002.parquet is 100 bytes" in text
    assert (manifest["counts"]["masks_written"], manifest["counts"]["resumed"]) == (4, 2)
    assert sorted(own_mask_pixels(out)) == [1, 2, 3, 4, 5, 6]


def test_verify_finds_damage_of_the_same_size(tmp_path, capsys):
    annotations, out = many_images(tmp_path), tmp_path / "out"
    run_masks(config(annotations, out, shard_size=2, naming="stem"))
    png = out / "masks" / "005.png"
    data = bytearray(png.read_bytes())
    data[40:48] = b"\0" * 8  # same size: the cheap check cannot tell
    png.write_bytes(bytes(data))
    capsys.readouterr()
    again = run_masks(config(annotations, out, shard_size=2, naming="stem"))
    assert again["counts"]["shards_run"] == 0
    verified = run_masks(config(annotations, out, shard_size=2, naming="stem", verify=True))
    assert "shard 2 is damaged (masks/005.png" in capsys.readouterr().out
    assert verified["counts"]["shards_run"] == 1
    assert own_mask_pixels(out)[5] == 36


@pytest.mark.parametrize("content", [b"", b'{"shard": 1, '])
def test_corrupt_shard_record_means_render_it_again(tmp_path, capsys, content):
    annotations, out = many_images(tmp_path), tmp_path / "out"
    run_masks(config(annotations, out, shard_size=2))
    (out / "_shards" / "shard-00001.json").write_bytes(content)
    capsys.readouterr()
    manifest = run_masks(config(annotations, out, shard_size=2))
    assert "shard 1 is damaged (its record _shards/shard-00001.json is unreadable" in (
        capsys.readouterr().out
    )
    assert manifest["counts"]["shards_run"] == 1 and manifest["counts"]["rendered_total"] == 6


def test_corrupt_plan_means_render_everything_again(tmp_path, capsys):
    annotations, out = many_images(tmp_path), tmp_path / "out"
    run_masks(config(annotations, out, shard_size=2))
    (out / "_shards" / "plan.json").write_text("{")
    capsys.readouterr()
    manifest = run_masks(config(annotations, out, shard_size=2))
    assert "plan.json is unreadable" in capsys.readouterr().out
    assert manifest["counts"]["shards_run"] == 3
    assert json.loads((out / "_shards" / "plan.json").read_text())["num_shards"] == 3


def test_auto_shard_size_uses_every_core_and_is_kept_on_resume(tmp_path):
    annotations, out = many_images(tmp_path, n=40), tmp_path / "out"
    # 2 CPUs x 4 shards would be 5 images each; the minimum of 8 gives 5 shards.
    manifest = run_masks(config(annotations, out))
    assert manifest["counts"]["shards"] == 5
    plan = json.loads((out / "_shards" / "plan.json").read_text())
    assert plan["shard_size"] == 8
    again = run_masks(config(annotations, out, num_cpus=1))
    assert again["counts"]["shards_run"] == 0 and again["counts"]["resumed"] == 40


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    annotations, out = many_images(tmp_path), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # What a first run still working on OUT holds.
        loc = storage.locate(str(out)).join(layout.LOCK)
        body = lease.Lease(loc, "first", 0.0).body()
        storage.write_json(loc, {**body, "pid": holder.pid})
        with pytest.raises(RaysegError, match=r"is in use by another rayseg run \(pid \d+"):
            run_masks(config(annotations, out))
        assert not (out / "_shards").exists()
    finally:
        holder.kill()
        holder.wait()
    # Its process is gone: the lease is stale and taken over.
    assert run_masks(config(annotations, out))["counts"]["masks_written"] == 6
    assert not (out / layout.LOCK).exists()


def test_lease_is_refused_on_s3_too(moto_server, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="leases")
    out = storage.locate("s3://leases/run")
    first = lease.acquire(out)
    try:
        with pytest.raises(RaysegError, match="in use by another rayseg run"):
            lease.acquire(out)
    finally:
        first.release()
    lease.acquire(out).release()
    assert not storage.exists(out.join(layout.LOCK))


def test_index_keeps_rejected_annotations_out_of_the_groups(tmp_path):
    # An annotation of image -1 that does not exist must be a listed problem, not silently kept
    # or dropped (image id -1 used to be the "rejected" marker).
    data = coco([(1, "a.jpg", 8, 8)])
    data["annotations"].append({**data["annotations"][0], "id": 9, "image_id": -1})
    index = load_coco(str(write_coco(tmp_path / "in.json", data)))
    assert [p.annotation_id for p in index.problems] == [9]
    assert index.ann_valid.tolist() == [True, False]


def test_polygons_over_the_vertex_cap_are_listed_and_the_image_is_rendered(tmp_path):
    # A self-crossing 30,000-vertex star: fillPoly took 133 s on it before the cap.
    angles = np.linspace(0, 60 * np.pi, 30_000, endpoint=False)
    radius = np.where(np.arange(30_000) % 2 == 0, 30, 3)
    star = np.stack([32 + radius * np.cos(angles), 32 + radius * np.sin(angles)], 1)
    data = coco([(1, "star.jpg", 64, 64)])
    data["annotations"].append(
        {**data["annotations"][0], "id": 5, "segmentation": [star.ravel().round(2).tolist()]}
    )
    out = tmp_path / "out"
    manifest = run_masks(config(write_coco(tmp_path / "in.json", data), out, max_vertices=1000))
    problem = manifest["problems"][0]
    assert problem["annotation_id"] == 5 and "--max-vertices 1000" in problem["reason"]
    assert own_mask_pixels(out) == {1: 4}
