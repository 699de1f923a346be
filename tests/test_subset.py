"""rayseg.subset: deterministic selection and byte-identical writing of a COCO subset."""

import json

import pytest
from pycocotools.coco import COCO
from tiny_coco import tiny_coco, write_coco

from rayseg.coco import load_coco
from rayseg.errors import RaysegError
from rayseg.subset import select_images, subset_bytes


@pytest.fixture
def tiny(tmp_path):
    return write_coco(tmp_path / "tiny.json", tiny_coco())


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
