import json

import pytest
from pycocotools.coco import COCO
from tiny_coco import tiny_coco, write_coco

from rayseg.coco import annotations_by_image, load_coco
from rayseg.errors import RaysegError
from rayseg.subset import select_images, subset_bytes


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


def test_subset_is_deterministic_and_loads_with_pycocotools(tiny, tmp_path):
    index = load_coco(str(tiny))
    ids_a, _ = select_images(index, num_images=3, seed=1)
    ids_b, _ = select_images(index, num_images=3, seed=1)
    assert ids_a == ids_b and len(ids_a) == 3
    out = tmp_path / "sub.json"
    out.write_bytes(subset_bytes(index, ids_a))
    assert subset_bytes(load_coco(str(tiny)), ids_a) == out.read_bytes()
    coco = COCO(str(out))
    assert sorted(coco.imgs) == sorted(ids_a)
    expected = {a["id"] for a in tiny_coco()["annotations"] if a["image_id"] in ids_a}
    assert set(coco.anns) == expected
    data = json.loads(out.read_text())
    assert data["categories"] == tiny_coco()["categories"]
    assert data["info"] == {"description": "tiny"}


def test_subset_filters(tiny):
    index = load_coco(str(tiny))
    ids, counts = select_images(index, num_images=10, seed=0, min_annotations=2)
    assert ids == [2, 3] and counts["too_few_annotations"] == 3
    ids, _ = select_images(index, num_images=10, seed=0, categories=[7])
    assert ids == [2, 5]
    ids, counts = select_images(index, num_images=10, seed=0, available_files={"000000000001.jpg"})
    assert ids == [1] and counts["missing_files"] == 4


def test_unknown_category_filter_is_error(tiny):
    with pytest.raises(RaysegError, match=r"ids \[99\]"):
        select_images(load_coco(str(tiny)), num_images=1, seed=0, categories=[99])


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


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty"),
        (b'{"images": [1, 2,\n  ]}', "invalid JSON at line 2, column 3"),
        (b"[1, 2]", "not a COCO instances file"),
        (b'{"images": [], "categories": []}', "no 'annotations' list"),
        (b'{"images": [], "annotations": [], "categories": []}', "'categories' is empty"),
    ],
)
def test_fatal_input_errors(tmp_path, content, message):
    path = tmp_path / "f.json"
    path.write_bytes(content)
    with pytest.raises(RaysegError, match=message):
        load_coco(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(RaysegError, match="file not found"):
        load_coco(str(tmp_path / "nope.json"))
