"""rayseg.verify: a finished shard is trusted only while its outputs are whole (no Ray: the
shards are rendered in this process, as the masks driver does while Ray starts)."""

import json

import pytest
from tiny_coco import tiny_coco, write_coco

from rayseg import storage
from rayseg.coco import load_coco
from rayseg.config import MasksConfig, load_config
from rayseg.render import value_scheme
from rayseg.shard import plan_jobs, render_shard
from rayseg.verify import check_shards

SHARDS = [0, 1, 2]  # tiny_coco's 5 images, 2 a shard


@pytest.fixture
def finished(tmp_path):
    """A finished masks output and the records its shards wrote."""
    annotations = write_coco(tmp_path / "in.json", tiny_coco())
    out = tmp_path / "out"
    cfg = load_config(
        MasksConfig, None, {"annotations": str(annotations), "out": str(out), "shard_size": 2}
    )
    for folder in ("masks", "parquet", "_shards"):  # as the masks driver makes them
        (out / folder).mkdir(parents=True)
    jobs = plan_jobs(load_coco(str(annotations)), cfg, value_scheme([1, 3, 7], "category_id"))
    records = {job.shard: render_shard(job) for job in jobs}
    assert sorted(records) == SHARDS
    return out, records


def check(out, *, deep):
    return check_shards(storage.locate(str(out)), SHARDS, deep=deep)


def record_path(out, k):
    return out / "_shards" / f"shard-{k:05d}.json"


def first_mask(out, k):
    """Shard k's first mask file, from its record."""
    name, _ = json.loads(record_path(out, k).read_text())["masks"][0]
    return out / "masks" / name


@pytest.mark.parametrize("deep", [False, True])
def test_a_whole_output_is_trusted_as_written(finished, deep):
    out, records = finished
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    good, damaged = check(out, deep=deep)
    assert damaged == {}
    assert good == {k: json.loads(json.dumps(r)) for k, r in records.items()}  # as read back
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("deep", [False, True])
def test_a_missing_or_resized_file_is_found_by_the_cheap_check(finished, deep):
    out, _ = finished
    gone = first_mask(out, 0)
    gone.unlink()
    cut = first_mask(out, 1)
    size = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[:-1])
    (out / "parquet" / "part-00002.parquet").unlink()
    good, damaged = check(out, deep=deep)
    assert good == {}
    assert damaged == {
        0: f"masks/{gone.name} is missing",
        1: f"masks/{cut.name} is {size - 1} bytes, {size} were written",
        2: "parquet/part-00002.parquet is missing",
    }


def test_a_changed_part_of_the_same_size_is_refused(finished):
    out, _ = finished
    part = out / "parquet" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-8] + b"\0" * 8)  # Parquet's footer length and magic
    good, damaged = check(out, deep=False)
    assert 1 in good  # the listing cannot see it
    good, damaged = check(out, deep=True)
    assert set(good) == {0, 2}
    assert damaged[1].startswith("parquet/part-00001.parquet does not read (")


def test_a_changed_mask_of_the_same_size_is_found_by_the_deep_check(finished):
    out, _ = finished
    mask = first_mask(out, 2)
    data = bytearray(mask.read_bytes())
    data[-20] ^= 0xFF  # inside the PNG: same size, other bytes
    mask.write_bytes(bytes(data))
    assert check(out, deep=False)[1] == {}
    good, damaged = check(out, deep=True)
    assert set(good) == {0, 1}
    assert damaged == {2: f"masks/{mask.name} differs from the mask in parquet/part-00002.parquet"}


def test_a_record_that_lists_other_images_than_its_part_is_redone(finished):
    out, _ = finished
    record = json.loads(record_path(out, 0).read_text())
    record["written"] = record["written"][:1]
    record_path(out, 0).write_text(json.dumps(record))
    assert 0 in check(out, deep=False)[0]
    assert check(out, deep=True)[1] == {
        0: "parquet/part-00000.parquet does not hold the shard's 1 images"
    }


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "JSONDecodeError: "),
        (json.dumps({"shard": 2, "written": [], "failed": [], "problems": []}), "not the record"),
        (json.dumps({"shard": 0, "written": [], "failed": []}), "no problems, class_pixels"),
        (json.dumps([0]), "not the record of shard 0"),
    ],
)
def test_an_unreadable_or_foreign_record_is_redone(finished, content, reason):
    out, _ = finished
    record_path(out, 0).write_text(content)
    good, damaged = check(out, deep=False)
    assert set(good) == {1, 2}
    assert damaged[0].startswith("its record _shards/shard-00000.json is unreadable (")
    assert reason in damaged[0]


def test_a_missing_record_is_redone(finished):
    out, _ = finished
    record_path(out, 1).unlink()
    good, damaged = check(out, deep=False)
    assert set(good) == {0, 2}
    assert damaged[1].startswith("its record _shards/shard-00001.json is unreadable (")


def test_records_of_older_versions_without_a_mask_list_still_check_their_part(finished):
    out, _ = finished
    record = json.loads(record_path(out, 0).read_text())
    del record["masks"]
    record_path(out, 0).write_text(json.dumps(record))
    first_mask(out, 1).unlink()  # shard 1 still lists its masks
    good, damaged = check(out, deep=False)
    assert set(good) == {0, 2} and set(damaged) == {1}
    (out / "parquet" / "part-00000.parquet").unlink()
    assert check(out, deep=False)[1][0] == "parquet/part-00000.parquet is missing"
