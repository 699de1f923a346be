"""rayseg.coco: loading and validating an instances file (no pixels)."""

import hashlib
import json

import numpy as np
import pytest
from tiny_coco import tiny_coco, write_coco

from rayseg.coco import MemoryRecords, load_coco
from rayseg.coco_apart import annotations_by_image
from rayseg.errors import RaysegError


@pytest.fixture
def tiny(tmp_path):
    return write_coco(tmp_path / "tiny.json", tiny_coco())


def test_load_groups_annotations(tiny):
    index = load_coco(str(tiny))
    assert [im.id for im in index.images] == [1, 2, 3, 4, 5]
    assert [c.id for c in index.categories] == [1, 3, 7]
    groups = annotations_by_image(index)
    assert {k: len(v) for k, v in groups.items()} == {1: 1, 2: 2, 3: 2, 5: 1}
    assert index.problems == []


def test_digest_is_the_sha1_of_the_file_bytes(tiny):
    # masks fingerprints its input with it: the value must stay the file's plain sha1.
    assert load_coco(str(tiny)).digest == hashlib.sha1(tiny.read_bytes()).hexdigest()


def test_per_record_problems_are_listed(tmp_path):
    data = tiny_coco()
    data["images"].append({"id": 6, "file_name": "x.jpg", "height": 0, "width": 20})
    data["images"].append({"id": 7, "file_name": "y.jpg", "width": 20})
    data["annotations"].append(
        {"id": 90, "image_id": 999, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]]}
    )
    data["annotations"].append(
        {"id": 91, "image_id": 1, "category_id": 95, "segmentation": [[0, 0, 1, 0, 1, 1]]}
    )
    index = load_coco(str(write_coco(tmp_path / "bad.json", data)))
    reasons = {(p.image_id, p.annotation_id): p.reason for p in index.problems}
    assert "height is 0" in reasons[(6, None)]
    assert "no height" in reasons[(7, None)]
    assert "image_id 999" in reasons[(999, 90)]
    assert "category_id 95" in reasons[(1, 91)]
    assert len(index.images) == 5
    assert sum(len(v) for v in annotations_by_image(index).values()) == 6


def test_problems_keep_the_manifest_shape(tmp_path):
    data = tiny_coco()
    data["images"].append(17)
    data["annotations"].append({"id": 92, "image_id": 1, "category_id": 95, "segmentation": []})
    index = load_coco(str(write_coco(tmp_path / "bad.json", data)))
    assert [p.to_dict() for p in index.problems] == [
        {"image_id": None, "reason": "image record #5 is not an object"},
        {"image_id": 1, "annotation_id": 92, "reason": "category_id 95 is not in 'categories'"},
    ]


def test_a_record_that_is_not_utf8_is_a_listed_problem(tmp_path):
    index = load_coco(str(invalid_utf8(tmp_path / "in.json")))
    image = tiny_coco()["images"][1]["id"]
    assert image not in {im.id for im in index.images}
    assert index.problems[0].to_dict() == {
        "image_id": None,
        "reason": "image record #1 is not valid JSON: Invalid UTF-8 encoded string",
    }
    # The annotation's unread field is not checked; its image's are listed as that image's.
    assert {p.image_id for p in index.problems[1:]} == {image}


FATAL_INPUTS = [
    (b"", "file is empty"),
    (b'{"images": [1, 2,\n  ]}', "invalid JSON at line 2, column 3"),
    (b"[1, 2]", "not a COCO instances file"),
    (b'{"images": [], "categories": []}', "no 'annotations' list"),
    (b'{"images": [], "annotations": [], "categories": []}', "'categories' is empty"),
]


def test_records_are_held_as_views_and_read_in_any_order(tiny):
    index = load_coco(str(tiny))
    assert isinstance(index.ann_raw, MemoryRecords)
    data = tiny.read_bytes()
    texts = [bytes(r) for r in index.ann_raw]
    assert all(t in data for t in texts) and len(texts) == len(tiny_coco()["annotations"])
    assert index.ann_raw.read(np.array([2, 0, 2])) == [texts[2], texts[0], texts[2]]
    assert index.ann_raw.read(np.zeros(0, np.int64)) == []


def test_the_index_is_not_changed_after_it_is_built(tiny):
    index = load_coco(str(tiny))
    with pytest.raises(AttributeError):
        index.digest = ""  # type: ignore[misc]


def test_missing_file(tmp_path):
    with pytest.raises(RaysegError, match="file not found"):
        load_coco(str(tmp_path / "nope.json"))


def invalid_utf8(path):
    """An image whose file_name and an annotation whose extra field are not UTF-8."""
    data = tiny_coco()
    data["images"][1]["file_name"] = "BAD.jpg"
    data["annotations"][0]["note"] = "BAD"
    path.write_bytes(json.dumps(data).encode().replace(b"BAD", b"\xff\xfe"))
    return path
