"""rayseg.coco_apart: the masks driver's parse equals load_coco, records read from the file."""

import json
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_coco import FATAL_INPUTS, invalid_utf8
from tiny_coco import tiny_coco, write_coco

from rayseg import coco_apart
from rayseg.coco import load_coco
from rayseg.coco_apart import FileRecords, load_coco_apart
from rayseg.errors import RaysegError


@pytest.fixture
def tiny(tmp_path):
    return write_coco(tmp_path / "tiny.json", tiny_coco())


@pytest.mark.parametrize("load", [load_coco, load_coco_apart])
@pytest.mark.parametrize("content, message", FATAL_INPUTS)
def test_fatal_input_errors_are_the_same_in_both_loaders(tmp_path, load, content, message):
    path = tmp_path / "f.json"
    path.write_bytes(content)
    with pytest.raises(RaysegError, match=message):
        load(str(path))


def test_loading_apart_gives_the_same_index_with_records_read_from_the_file(tiny):
    here, apart = load_coco(str(tiny)), load_coco_apart(str(tiny))
    assert isinstance(apart.ann_raw, FileRecords) and isinstance(apart.image_raw, FileRecords)
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
        scanner = coco_apart.BlockScanner(str(path), f)
        scanner.BLOCK = block
        return scanner.build_index()


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
    starts, lengths = coco_apart.run_offsets(piece, raws)
    assert [piece[a : a + n] for a, n in zip(starts, lengths, strict=True)] == [
        t.encode() for t in texts
    ]
    searched = coco_apart.search_offsets(piece, raws)
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
def test_other_shapes_are_parsed_whole_with_the_same_result(tmp_path, content, capsys):
    path = tmp_path / "in.json"
    path.write_bytes(content)
    with pytest.raises(coco_apart.NotScanned):
        scan(path, 16)
    try:
        whole = load_coco(str(path))
    except RaysegError as e:
        with pytest.raises(RaysegError, match=re.escape(str(e))):
            load_coco_apart(str(path))
    else:
        same_index(load_coco_apart(str(path)), whole)
        # The fallback says so, once, and why.
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"rayseg: {path}: parsed whole (") and line.endswith(")")


def test_the_scan_holds_blocks_not_the_file(tmp_path, monkeypatch):
    data = tiny_coco()
    data["annotations"] = data["annotations"] * 400  # ~130 KB of records, each < 300 bytes
    path = write_coco(tmp_path / "in.json", data)
    held = []
    more = coco_apart.BlockScanner.read_block

    def counting_more(self):
        found = more(self)
        held.append(len(self.window))
        return found

    monkeypatch.setattr(coco_apart.BlockScanner, "read_block", counting_more)
    same_index(scan(path, 4096), load_coco(str(path)))
    assert len(held) > 20 and max(held) <= 2 * 4096 + 300


def test_a_usual_file_is_scanned_without_a_word(tiny, capsys):
    load_coco_apart(str(tiny))
    assert capsys.readouterr().err == ""


def never_in_the_driver(path):
    raise AssertionError("the file was loaded whole in the driver")


@pytest.mark.parametrize(
    "child_code, why",
    [
        (  # what the kernel's OOM killer does
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
            "killed by SIGKILL, as the kernel's OOM killer does",
        ),
        ("import pickle, sys; sys.stdout.buffer.write(pickle.dumps(MemoryError()))", "MemoryError"),
    ],
    ids=["killed", "MemoryError"],
)
def test_a_child_out_of_memory_is_an_error_not_a_parse_in_the_driver(
    tiny, monkeypatch, child_code, why
):
    monkeypatch.setattr(coco_apart, "CHILD_CODE", child_code)
    monkeypatch.setattr(coco_apart, "load_coco", never_in_the_driver)
    size_mib = f"{tiny.stat().st_size / 2**20:.0f} MiB"
    with pytest.raises(RaysegError) as raised:
        load_coco_apart(str(tiny))
    message = str(raised.value)
    assert message.startswith(f"{tiny}: the parse child ran out of memory ({why}) holding ")
    assert f"on a file of {size_mib}" in message
    held = re.search(r"holding (\d+) MiB", message)
    assert held and int(held.group(1)) > 0  # an interpreter's own memory, at least


def test_a_child_that_fails_otherwise_is_replaced_by_load_coco_with_one_line(
    tiny, monkeypatch, capsys
):
    monkeypatch.setattr(coco_apart, "CHILD_CODE", "import sys; sys.exit('child broke: no disk')")
    index = load_coco_apart(str(tiny))
    same_index(index, load_coco(str(tiny)))
    assert capsys.readouterr().err.splitlines() == [
        f"rayseg: {tiny}: the parse child failed (child broke: no disk); parsing it here"
    ]


def test_file_records_read_in_any_order(tiny):
    records = load_coco_apart(str(tiny)).ann_raw
    positions = np.array([3, 0, 5, 0, 1])
    assert records.read(positions) == [records[int(i)] for i in positions]
    assert records.read(np.zeros(0, np.int64)) == []
    with pytest.raises(IndexError):
        records[len(records)]
