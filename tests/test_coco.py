"""rayseg.coco: loading and validating an instances file (no pixels)."""

import hashlib
import json
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_coco import tiny_coco, write_coco

from rayseg import coco
from rayseg.coco import FileRecords, annotations_by_image, load_coco, load_coco_apart
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
@pytest.mark.parametrize("load", [load_coco, load_coco_apart])
def test_fatal_input_errors(tmp_path, content, message, load):
    path = tmp_path / "f.json"
    path.write_bytes(content)
    with pytest.raises(RaysegError, match=message):
        load(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(RaysegError, match="file not found"):
        load_coco(str(tmp_path / "nope.json"))


def test_loading_apart_gives_the_same_index_with_records_read_from_the_file(tiny):
    here, apart = load_coco(str(tiny)), load_coco_apart(str(tiny))
    assert isinstance(apart.ann_raw, FileRecords) and apart.buffer == b""
    assert [bytes(r) for r in here.ann_raw] == [apart.ann_raw[i] for i in range(len(apart.ann_raw))]
    assert [bytes(r) for r in here.image_raw] == list(apart.image_raw)
    assert (here.images, here.digest, here.problems) == (apart.images, apart.digest, apart.problems)
    assert here.ann_valid.tolist() == apart.ann_valid.tolist()


def test_records_of_a_file_that_changed_are_refused(tiny):
    index = load_coco_apart(str(tiny))
    tiny.write_bytes(tiny.read_bytes() + b" ")
    with pytest.raises(RaysegError, match="changed while rayseg was using it"):
        index.ann_raw[0]


def test_read_many_matches_single_reads_near_and_far(tiny, monkeypatch):
    index = load_coco_apart(str(tiny))
    positions = np.arange(len(index.ann_raw))
    one_by_one = [index.ann_raw[i] for i in positions]
    assert index.ann_raw.read_many(positions) == one_by_one  # one stretch: a single read
    monkeypatch.setattr(FileRecords, "GAP", 0)  # every record a read of its own
    assert index.ann_raw.read_many(positions[::2]) == one_by_one[::2]


def same_index(scanned, whole) -> None:
    """Two indexes of one file agree on every field; records compared by their bytes."""
    assert scanned.images == whole.images
    for name in ("image_raw", "ann_raw"):
        mine, theirs = getattr(scanned, name), getattr(whole, name)
        assert [bytes(mine[i]) for i in range(len(mine))] == [bytes(r) for r in theirs], name
    for name in ("ann_image_ids", "ann_category_ids", "ann_valid"):
        assert getattr(scanned, name).tolist() == getattr(whole, name).tolist(), name
    assert scanned.categories == whole.categories
    assert [bytes(r) for r in scanned.categories_raw] == [bytes(r) for r in whole.categories_raw]
    assert bytes(scanned.info_raw) == bytes(whole.info_raw)
    assert bytes(scanned.licenses_raw) == bytes(whole.licenses_raw)
    assert [p.to_dict() for p in scanned.problems] == [p.to_dict() for p in whole.problems]
    assert (scanned.num_images_in_file, scanned.digest) == (whole.num_images_in_file, whole.digest)


def scan(path, block: int):
    """_Scan with `block`-byte reads; raises _Unusual where it leaves a file to the whole parse."""
    with open(path, "rb") as f:
        scanner = coco._Scan(str(path), f)
        scanner.BLOCK = block
        return scanner.index()


def hostile_records() -> dict:
    """tiny_coco with records whose strings hold what a cut looks for, and bad records."""
    data = tiny_coco()
    data["images"].insert(2, 17)  # not an object: a listed problem
    data["images"][0]["file_name"] = 'a},{"id": 9}].jpg'
    data["images"].append({"id": 6, "file_name": "b.jpg", "height": 0, "width": 20})
    data["annotations"].insert(1, {"id": "x", "image_id": 1, "category_id": 1})
    data["annotations"][0]["note"] = '}] ,{ \\" }'
    data["annotations"].append({"id": 92, "image_id": 1, "category_id": 95, "segmentation": []})
    return data


def reordered() -> dict:
    """Categories first, annotations before images, no licenses, info not an object."""
    data = tiny_coco()
    return {
        "categories": data["categories"],
        "annotations": data["annotations"],
        "extra": [{"a": [1, {"b": "}]"}]}, {}],
        "images": data["images"],
        "info": "made, by {hand}",
    }


def invalid_utf8(path):
    """An image whose file_name and an annotation whose extra field are not UTF-8."""
    data = tiny_coco()
    data["images"][1]["file_name"] = "BAD.jpg"
    data["annotations"][0]["note"] = "BAD"
    path.write_bytes(json.dumps(data).encode().replace(b"BAD", b"\xff\xfe"))
    return path


def uneven_gaps(path):
    """Records one compact, the next indented: the first gap's width fits no later one."""
    data = tiny_coco()
    text = json.dumps(data, separators=(",", ":"))
    first = json.dumps(data["annotations"][0], separators=(",", ":"))
    return path.write_text(text.replace(first + ",", first + " ,\n  ", 1)) and path


SCANNED_SHAPES = {
    "compact": lambda p: write_coco(p, tiny_coco()),
    "indented": lambda p: p.write_text(json.dumps(tiny_coco(), indent=2)) and p,
    "hostile records": lambda p: write_coco(p, hostile_records()),
    "keys reordered": lambda p: write_coco(p, reordered()),
    "invalid UTF-8": invalid_utf8,
    "uneven gaps": uneven_gaps,
    "escaped key": lambda p: (
        p.write_text(json.dumps(tiny_coco()).replace('"images"', '"imag\\u0065s"')) and p
    ),
}


@pytest.mark.parametrize("block", [1, 16, 4096])
@pytest.mark.parametrize("shape", sorted(SCANNED_SHAPES))
def test_scanning_in_blocks_gives_the_whole_parse_index(tmp_path, shape, block):
    path = SCANNED_SHAPES[shape](tmp_path / "in.json")
    same_index(scan(path, block), load_coco(str(path)))


def test_real_coco_scanned_in_blocks_gives_the_whole_parse_index():
    path = Path(__file__).parents[2] / "shared" / "data" / "coco_sample" / "annotations.json"
    if not path.exists():
        pytest.skip("../shared/data/coco_sample is not here")
    whole = load_coco(str(path))
    for block in (4096, 1 << 20):
        same_index(scan(path, block), whole)


_JSON_VALUES = st.recursive(
    st.none() | st.integers() | st.text(alphabet=' ,{}[]"\\ab\n'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(_JSON_VALUES, max_size=8),
    gaps=st.lists(st.sampled_from([",", ", ", " ,", ",\n  ", "\t,\r\n"]), min_size=8, max_size=8),
    uniform=st.booleans(),
)
def test_run_offsets_agree_with_finding_each_record(records, gaps, uniform):
    texts = [json.dumps(r) for r in records]
    gaps = [gaps[0]] * len(gaps) if uniform else gaps
    piece = ("[ " + "".join(t + g for t, g in zip(texts, gaps[: len(texts)], strict=True))).encode()
    piece = piece[: len(piece) - len(gaps[len(texts) - 1])] if texts else piece
    piece += b" ]"
    raws = msgspec.json.decode(piece, type=list[msgspec.Raw])
    starts, lengths = coco._run_offsets(piece, raws)
    assert [piece[a : a + n] for a, n in zip(starts, lengths, strict=True)] == [
        t.encode() for t in texts
    ]
    searched = coco._offsets(piece, raws)
    assert (starts.tolist(), lengths.tolist()) == (searched[0].tolist(), searched[1].tolist())


@pytest.mark.parametrize(
    "content",
    [
        # msgspec keeps the last of a repeated key: the whole parse does it so.
        b'{"images": [{"id": 1}], "images": [], "annotations": [], "categories": [{"id": 1}]}',
        # An array whose last record is not an object: no cut can be proved.
        b'{"images": [{"id": 1, "file_name": "a", "height": 2, "width": 2}, 7], '
        b'"annotations": [], "categories": [{"id": 1}]}',
        b'{"images": [], "annotations": [], "categories": [{"id": 1}]} trailing',
    ],
)
def test_other_shapes_are_parsed_whole_with_the_same_result(tmp_path, content):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    with pytest.raises(coco._Unusual):
        scan(path, 16)
    try:
        whole = load_coco(str(path))
    except RaysegError as e:
        with pytest.raises(RaysegError, match=re.escape(str(e))):
            load_coco_apart(str(path))
    else:
        same_index(load_coco_apart(str(path)), whole)


def test_the_scan_holds_blocks_not_the_file(tmp_path, monkeypatch):
    data = tiny_coco()
    data["annotations"] = data["annotations"] * 400  # ~130 KB of records, each < 300 bytes
    path = write_coco(tmp_path / "in.json", data)
    held = []
    more = coco._Scan.more

    def counting_more(self):
        found = more(self)
        held.append(len(self.buf))
        return found

    monkeypatch.setattr(coco._Scan, "more", counting_more)
    same_index(scan(path, 4096), load_coco(str(path)))
    assert len(held) > 20 and max(held) <= 2 * 4096 + 300
