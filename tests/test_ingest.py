"""rayseg.ingest: crop checks, decode + augment, each worker's tasks per epoch (pure); rayseg.feed:
those tasks run by Ray."""

from __future__ import annotations

import functools
import os
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from mask_data import META, make_sample, sample_row, write_masks

from rayseg import feed, ingest, raycompat, storage
from rayseg.errors import RaysegError
from rayseg.models import class_map_from_meta

CLASS_MAP = class_map_from_meta(META)


# ---- pure ---------------------------------------------------------------------------------


def test_ingest_stays_torch_free_and_agrees_on_ignore():
    import subprocess
    import sys

    from rayseg.records import TRAIN_IGNORE

    assert ingest.TRAIN_IGNORE == TRAIN_IGNORE
    # The data tasks' processes (and rayseg.prestart's, which start them) import no torch.
    code = "import sys, rayseg.ingest, rayseg.prestart; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_reading_a_part_imports_neither_pandas_nor_pyarrow_dataset(tmp_path):
    # Each fresh data-task process would pay their import, ~0.45 s (issue 22, the first epoch).
    import subprocess
    import sys

    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 4, parts=1)))
    code = (
        "import sys, pyarrow.fs, rayseg.ingest as i\n"
        f"rows = i.read_rows({summary.paths!r}, pyarrow.fs.LocalFileSystem())\n"
        "assert rows['image'].shape == (4,) and isinstance(rows['image'][0], bytes), rows\n"
        "sys.exit(sorted({'pandas', 'pyarrow.dataset'} & set(sys.modules)) or None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_shard_ids_round_robin():
    shards = ingest.shard_ids(np.arange(7), 3)
    assert [s.tolist() for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]


def test_decode_maps_values_to_train_ids():
    image, mask = make_sample(0)
    row = sample_row(1, image, mask)
    rgb, values = ingest.decode_pair(row["image"], row["mask"])
    np.testing.assert_array_equal(values, mask)  # the mask's own values
    ids = CLASS_MAP.train_lut()[values]
    assert rgb.shape == (48, 64, 3) and ids.dtype == np.uint8
    assert set(np.unique(ids)) == {0, 1, 2, 255}
    assert (ids == 2).sum() == (mask == 3).sum()  # category 3 is model class 2
    # RGB order: the square is red.
    assert rgb[mask == 1].mean(0).argmax() == 0


@pytest.mark.parametrize(
    ("image_bytes", "mask_bytes", "code", "reason"),
    [
        (None, storage.encode_png(np.zeros((4, 6), np.uint8)), 1, "row has no image bytes"),
        (b"junk", storage.encode_png(np.zeros((4, 6), np.uint8)), 2, "image does not decode"),
        ("jpeg", b"junk", 3, "mask does not decode"),
        ("jpeg", None, 3, "mask does not decode"),
        # A colour PNG is not a label mask.
        (
            "jpeg",
            cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))[1].tobytes(),
            3,
            "mask does not decode",
        ),
        (
            "jpeg",
            storage.encode_png(np.zeros((4, 5), np.uint8)),
            4,
            "mask is 5x4 but the image is 6x4",
        ),
    ],
)
def test_decode_problems_have_codes_and_reasons(image_bytes, mask_bytes, code, reason):
    if image_bytes == "jpeg":
        image_bytes = cv2.imencode(".jpg", np.zeros((4, 6, 3), np.uint8))[1].tobytes()
    with pytest.raises(ingest.SampleError) as e:
        ingest.decode_pair(image_bytes, mask_bytes)
    assert e.value.code == code and code in ingest.PROBLEMS
    assert e.value.reason.startswith(reason) and str(e.value) == e.value.reason
    assert ingest.problem_record(7, code).to_dict() == {
        "image_id": 7,
        "reason": ingest.PROBLEMS[code],
    }


def test_augment_shapes_and_padding_with_ignore():
    image = np.full((10, 12, 3), 200, np.uint8)
    mask = np.ones((10, 12), np.uint8)
    rng = np.random.default_rng(0)
    seen_pad = False
    for _ in range(20):
        out_image, out_mask = ingest.augment(image, mask, crop_size=16, rng=rng)
        assert out_image.shape == (16, 16, 3) and out_mask.shape == (16, 16)
        assert set(np.unique(out_mask)) <= {1, 255}
        # Image padding is black exactly where the mask is padded with ignore.
        assert np.array_equal(out_image[..., 0] == 0, out_mask == 255)
        seen_pad |= bool((out_mask == 255).any())
    assert seen_pad


def test_augment_keeps_labels_aligned_with_pixels():
    image, mask = make_sample(3)
    lut = CLASS_MAP.train_lut()
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    rng = np.random.default_rng(1)
    for _ in range(10):
        out_image, out_mask = ingest.augment(rgb, lut[mask], crop_size=32, rng=rng)
        red = out_image[out_mask == 1]
        if len(red) > 10:
            assert np.median(red[:, 0]) > 150 and np.median(red[:, 2]) < 100


def resize_then_crop(image, mask, *, crop_size, rng):
    """The recipe as written before issue 22: resize the whole image, pad, crop, flip."""
    s = rng.uniform(*ingest.SCALE_RANGE)
    h, w = mask.shape
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    height, width = max(crop_size, size[1]), max(crop_size, size[0])
    padded_image = np.zeros((height, width, 3), np.uint8)
    padded_mask = np.full((height, width), 255, np.uint8)
    padded_image[: size[1], : size[0]], padded_mask[: size[1], : size[0]] = image, mask
    y = int(rng.integers(0, height - crop_size + 1))
    x = int(rng.integers(0, width - crop_size + 1))
    image = padded_image[y : y + crop_size, x : x + crop_size]
    mask = padded_mask[y : y + crop_size, x : x + crop_size]
    if rng.random() < ingest.FLIP_PROBABILITY:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def test_crop_then_resize_equals_resizing_the_whole_image():
    # Masks bit for bit (nearest), images within the bilinear's rounding, padding and flips too.
    rng = np.random.default_rng(0)
    for seed in range(150):
        h, w = (int(v) for v in rng.integers(5, 300, 2))
        crop = int(rng.integers(4, 320))
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 2)
        mask = rng.integers(0, 30, (h, w), dtype=np.uint8)
        want = resize_then_crop(image, mask, crop_size=crop, rng=np.random.default_rng(seed))
        got = ingest.augment(image, mask, crop_size=crop, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(got[1], want[1])
        assert np.abs(got[0].astype(int) - want[0].astype(int)).max() <= 1


def test_augment_into_fills_only_its_slot():
    image, mask = np.full((30, 40, 3), 9, np.uint8), np.ones((30, 40), np.uint8)
    images = np.zeros((2, 50, 50, 3), np.uint8)
    masks = np.full((2, 50, 50), 255, np.uint8)
    ingest.augment_into(image, mask, images[1], masks[1], rng=np.random.default_rng(3))
    assert (images[0] == 0).all() and (masks[0] == 255).all()
    assert 0 < (masks[1] == 1).sum() < 50 * 50  # at most 2x of 40x30: padded with ignore
    assert np.array_equal(images[1][..., 0] == 9, masks[1] == 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_to_train_ids_is_the_lookup_table(dtype):
    lut = CLASS_MAP.train_lut()
    mask = np.random.default_rng(0).integers(0, 256, (20, 30)).astype(dtype)
    np.testing.assert_array_equal(ingest.to_train_ids(mask, lut), lut[mask])


def test_val_batch_pads_to_canvas_and_flags_bad_rows():
    image, mask = make_sample(0)
    good = sample_row(1, image, mask)
    broken = sample_row(2, image, mask, image_bytes=b"junk")
    batch = {k: np.array([good[k], broken[k]], dtype=object) for k in ("image", "mask")}
    batch["image_id"] = np.array([1, 2])
    out = ingest.val_batch(batch, lut=CLASS_MAP.train_lut(), height=50, width=70)
    assert out["image"].shape == (2, 50, 70, 3) and out["mask"].shape == (2, 50, 70)
    assert out["problem"].tolist() == [0, 2]
    assert (out["mask"][1] == 255).all()  # a bad row adds nothing to loss or metrics
    assert (out["mask"][0, 48:] == 255).all() and (out["mask"][0, :, 64:] == 255).all()


# ---- driver-side scan -----------------------------------------------------------------------


def test_scan_reads_ids_sizes_and_meta(tmp_path):
    out = write_masks(tmp_path / "m", 5)
    for where in (out, out / "parquet"):
        summary = ingest.scan_data(str(where))
        assert sorted(summary.image_ids.tolist()) == [100, 101, 102, 103, 104]
        assert set(summary.heights) == {48} and set(summary.widths) == {64}
        assert summary.meta["values"] == "category_id" and summary.rows_without_image == 0


def test_image_counts_from_footers(tmp_path):
    _, mask = make_sample(0)
    rows = [sample_row(1, None, mask), sample_row(2, None, mask, image_bytes=b"x")]
    loc = storage.locate(str(tmp_path / "part.parquet"))
    storage.write_parquet(loc, storage.mask_table(rows, META))
    assert ingest.image_counts(loc) == (2, 1)


def test_scan_rejects_empty_dataset(tmp_path):
    folder = tmp_path / "m" / "parquet"
    folder.mkdir(parents=True)
    storage.write_parquet(
        storage.locate(str(folder / "part-00000.parquet")), storage.mask_table([], META)
    )
    with pytest.raises(RaysegError, match="empty"):
        ingest.scan_data(str(tmp_path / "m"))


def test_scan_rejects_rows_without_images(tmp_path):
    folder = tmp_path / "m" / "parquet"
    folder.mkdir(parents=True)
    _, mask = make_sample(0)
    table = storage.mask_table([sample_row(1, None, mask)], META)
    storage.write_parquet(storage.locate(str(folder / "part-00000.parquet")), table)
    with pytest.raises(RaysegError, match="--images-dir"):
        ingest.scan_data(str(tmp_path / "m"))


def test_crop_larger_than_every_image_is_refused(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 3)))
    ingest.check_crop(summary, summary.image_ids, 64)
    with pytest.raises(RaysegError, match="larger than every image"):
        ingest.check_crop(summary, summary.image_ids, 65)


# ---- each worker's batches of an epoch, as tasks (pure) -----------------------------------


def planned(tasks: list[ingest.PartTask]) -> list[list[int]]:
    return [b.tolist() for t in tasks for b in t.batches]


def test_train_tasks_give_every_worker_an_equal_share_in_full_batches(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 23, parts=4)))
    wanted = summary.image_ids[summary.image_ids != 107]  # 107 is another split's: 22 images
    shares = [
        ingest.train_tasks(
            summary, wanted, rank=r, world=3, batch_size=3, seed=0, epoch=1
        )
        for r in range(3)
    ]  # fmt: skip
    # 22 // 3 = 7 images each, 2 batches of 3 (the 7th waits, as the 22nd image does)
    assert [[len(b) for b in planned(t)] for t in shares] == [[3, 3]] * 3
    taken = [i for t in shares for b in planned(t) for i in b]
    assert len(set(taken)) == len(taken) == 18 and set(taken) <= set(wanted.tolist())
    for task in (t for tasks in shares for t in tasks):  # each task reads the parts of its rows
        parts = {
            summary.paths[summary.parts[summary.image_ids == i][0]] for b in task.batches for i in b
        }
        assert parts == set(task.paths) and all(len(b) == 3 for b in task.batches)
        first_parts = {summary.parts[summary.image_ids == b[0]][0] for b in task.batches}
        assert len(first_parts) == 1  # a task per part its batches start in


def test_train_tasks_shuffle_by_seed_and_epoch(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 40, parts=4)))
    ids = summary.image_ids

    def order(seed: int, epoch: int) -> list[list[int]]:
        return planned(
            ingest.train_tasks(summary, ids, rank=0, world=1, batch_size=4, seed=seed, epoch=epoch)
        )

    assert order(0, 1) == order(0, 1)  # every worker draws the same order; a resume too
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    flat = sum(order(0, 1), [])
    assert sorted(flat) == sorted(ids.tolist()) and flat != sorted(flat)


def test_a_batch_running_over_into_the_next_part_reads_only_the_row_groups_it_takes(tmp_path):
    # Parts of 12 rows in row groups of 4: of batch 3 (places 10-14), 2 images are the first
    # part's and 3 the second's, all 3 drawn from one row group of it, which is all that the
    # first part's task reads of the second part.
    out = write_masks(tmp_path / "m", 24, parts=2, row_group_size=4)
    summary = ingest.scan_data(str(out))
    assert summary.groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2] * 2
    for seed in range(20):
        first, second = ingest.train_tasks(
            summary, summary.image_ids, rank=0, world=1, batch_size=5, seed=seed, epoch=1
        )
        a, b = first.paths
        assert second.paths == (b,) and [len(t.batches) for t in (first, second)] == [3, 1]
        over = first.batches[2]
        in_b = [i for i in over if summary.paths[summary.parts[summary.image_ids == i][0]] == b]
        assert len(in_b) == 3
        (group,) = first.groups[1]
        assert {int(summary.groups[summary.image_ids == i][0]) for i in in_b} == {group}
        for task in (first, second):  # of each part, the groups of the task's images in it
            ids = np.concatenate(task.batches)
            where = [summary.paths[summary.parts[summary.image_ids == i][0]] for i in ids]
            in_groups = [summary.groups[summary.image_ids == i][0] for i in ids]
            assert task.groups == tuple(
                tuple(sorted({int(g) for w, g in zip(where, in_groups, strict=True) if w == path}))
                for path in task.paths
            )
    draws = {
        tuple(
            ingest.train_tasks(
                summary, summary.image_ids, rank=0, world=1, batch_size=5, seed=seed, epoch=1
            )[0].groups[1]
        )
        for seed in range(20)
    }
    assert len(draws) > 1, "the row group is drawn at random"


@pytest.mark.parametrize("parts", [1, 3])
def test_tasks_read_their_row_groups_and_make_every_batch_of_every_worker(tmp_path, parts):
    out = write_masks(tmp_path / "m", 41, parts=parts, row_group_size=3)
    summary = ingest.scan_data(str(out))
    make = functools.partial(ingest.val_batch, lut=CLASS_MAP.train_lut(), height=48, width=64)
    for world, batch_size in [(1, 4), (2, 3), (3, 5), (50, 1)]:
        made = []
        for rank in range(world):
            tasks = ingest.train_tasks(
                summary, summary.image_ids, rank=rank, world=world, batch_size=batch_size,
                seed=world, epoch=2,
            )  # fmt: skip
            assert sum(len(t.batches) for t in tasks) == 41 // world // batch_size
            assert len(tasks) <= parts
            for task in tasks:
                got = list(ingest.task_batches(task, summary.location.fs, make))
                assert [b["image_id"].tolist() for b in got] == [b.tolist() for b in task.batches]
                made += [i for b in got for i in b["image_id"].tolist()]
        assert len(made) == len(set(made)) == world * (41 // world // batch_size) * batch_size


def test_read_rows_reads_the_row_groups_it_is_given(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 10, parts=1, row_group_size=4)))
    fs = summary.location.fs
    assert ingest.read_rows(summary.paths, fs, groups=((0, 2),))["image_id"].tolist() == [
        100, 101, 102, 103, 108, 109,
    ]  # fmt: skip
    assert len(ingest.read_rows(summary.paths, fs)["image_id"]) == 10
    # Rewritten since the scan in fewer row groups: a group it no longer has is rayseg's line.
    write_masks(tmp_path / "m", 10, parts=1, row_group_size=8)
    with pytest.raises(RaysegError, match=r"part-.*: the data changed while training read it"):
        ingest.read_rows(summary.paths, fs, summary.stamps, groups=((2,),))


def test_val_tasks_take_every_image_once_in_part_order(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 9, parts=2)))  # 100, 102, ...
    tasks = ingest.val_tasks(summary, np.array([108, 101, 104, 100, 106]), batch_size=2)
    assert planned(tasks) == [[100, 104], [106, 108], [101]]
    assert [t.paths for t in tasks] == [(summary.paths[0],), (summary.paths[1],)]
    assert ingest.val_tasks(summary, np.array([], np.int64), batch_size=2) == []


def test_task_batches_make_each_planned_batch(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 6, bad={101: "mask"})))
    (task,) = ingest.val_tasks(summary, np.array([101, 103]), batch_size=4)
    make = functools.partial(ingest.val_batch, lut=CLASS_MAP.train_lut(), height=48, width=64)
    (batch,) = ingest.task_batches(task, summary.location.fs, make)
    assert batch["image_id"].tolist() == [101, 103] and batch["problem"].tolist() == [3, 0]
    _, mask = make_sample(3)
    np.testing.assert_array_equal(batch["mask"][1], CLASS_MAP.to_train_ids(mask))
    spanning = ingest.PartTask(summary.paths, (np.array([105, 100]),))  # two parts, any order
    make = functools.partial(ingest.train_batch, lut=CLASS_MAP.train_lut(), crop_size=24)
    (batch,) = ingest.task_batches(spanning, summary.location.fs, make)
    assert batch["image_id"].tolist() == [105, 100] and batch["image"].shape == (2, 24, 24, 3)


def test_a_part_changed_since_the_scan_is_said_by_name(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 4, parts=1)))
    make = functools.partial(ingest.train_batch, lut=CLASS_MAP.train_lut(), crop_size=24)
    rewritten = ingest.PartTask(summary.paths, (np.array([100, 999]),))  # 999: not in the part
    with pytest.raises(RaysegError, match=r"part-.*: image 999 is no longer in these Parquet"):
        list(ingest.task_batches(rewritten, summary.location.fs, make))
    (task,) = ingest.val_tasks(summary, summary.image_ids, batch_size=4)
    assert len(list(ingest.task_batches(task, summary.location.fs, make))) == 1  # as scanned
    part = summary.paths[0]
    scanned = os.stat(part)
    os.utime(part, ns=(scanned.st_atime_ns, scanned.st_mtime_ns + 10**9))  # the same bytes
    with pytest.raises(RaysegError, match=r"part-.*: the data changed .* size or modification"):
        list(ingest.task_batches(task, summary.location.fs, make))
    write_masks(tmp_path / "m", 4, parts=1, bad={101: "image"})  # the same ids, other pixels
    with pytest.raises(RaysegError, match=r"part-.*: the data changed .* size or modification"):
        list(ingest.task_batches(task, summary.location.fs, make))
    os.remove(part)
    with pytest.raises(RaysegError, match=r"part-.*: the data changed while training read it"):
        list(ingest.task_batches(task, summary.location.fs, make))


def test_task_batch_groups_hand_over_the_first_batch_alone_then_doubling(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 10, parts=1)))
    (task,) = ingest.val_tasks(summary, summary.image_ids, batch_size=1)
    make = functools.partial(ingest.val_batch, lut=CLASS_MAP.train_lut(), height=48, width=64)
    groups = list(ingest.task_batch_groups(task, summary.location.fs, make, group=4))
    assert [[b["image_id"].tolist() for b in g] for g in groups] == [
        [[100]],
        [[101], [102]],
        [[103], [104], [105], [106]],
        [[107], [108], [109]],
    ]


def test_split_first_puts_every_batch_in_exactly_one_half():
    ids = (np.array([5, 6]), np.array([7, 8]), np.array([9, 1]))
    task = ingest.PartTask(("a.parquet", "b.parquet"), ids)
    head, rest = ingest.split_first(task)
    assert head.paths == rest.paths == task.paths  # a batch may run over into the next part
    assert [b.tolist() for b in head.batches] == [[5, 6]]
    assert [b.tolist() for b in rest.batches] == [[7, 8], [9, 1]]
    head, rest = ingest.split_first(ingest.PartTask(("a.parquet",), ids[:1]))
    assert [b.tolist() for b in head.batches] == [[5, 6]] and rest is None


def test_a_first_batch_made_elsewhere_is_left_out_only_when_it_is_the_first():
    ids = (np.array([5, 6]), np.array([7, 8]))
    tasks = [ingest.PartTask(("a",), ids), ingest.PartTask(("b",), (np.array([3, 4]),))]
    head = ingest.split_first(tasks[0])[0]
    left = ingest.without_first(tasks, head)
    assert [(t.paths, [b.tolist() for b in t.batches]) for t in left] == [
        (("a",), [[7, 8]]),
        (("b",), [[3, 4]]),
    ]
    assert [t.paths for t in ingest.without_first(left[1:], ingest.split_first(left[1])[0])] == []
    other = ingest.PartTask(("a",), (np.array([5, 7]),))  # planned otherwise
    assert ingest.without_first(tasks, other) is None
    assert ingest.without_first(tasks, ingest.PartTask(("b",), ids[:1])) is None


def test_task_batch_groups_reuse_the_arrays_of_groups_already_handed_over(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 7, parts=1)))
    (task,) = ingest.val_tasks(summary, summary.image_ids, batch_size=1)
    make = functools.partial(ingest.val_batch, lut=CLASS_MAP.train_lut(), height=48, width=64)
    fresh = list(ingest.task_batches(task, summary.location.fs, make))
    handed, arrays = [], set()
    for group in ingest.task_batch_groups(task, summary.location.fs, make, group=4, reuse=True):
        arrays |= {id(b["image"]) for b in group}
        handed += [{k: v.copy() for k, v in b.items()} for b in group]  # as a Ray yield copies
    assert len(arrays) == 4, "7 batches in groups of 1, 2, 4 are made in 4 batches' arrays"
    assert [b["image_id"].tolist() for b in handed] == [b["image_id"].tolist() for b in fresh]
    for got, want in zip(handed, fresh, strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["mask"], want["mask"])


# ---- rayseg.feed: the tasks run by Ray ----------------------------------------------------

CPU = torch.device("cpu")


def feed_of(summary, tasks, **kwargs) -> feed.Feed:
    make = functools.partial(ingest.train_batch, lut=CLASS_MAP.train_lut(), crop_size=32)
    options = {"make_batch": make, "in_flight": 2, "num_cpus": 1.0, **kwargs}
    return feed.Feed(tasks, fs=summary.location.fs, device=CPU, **options)


def test_feed_yields_every_planned_batch_as_tensors(ray_local, tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 12, parts=3, bad={101: "mask"})))
    tasks = ingest.train_tasks(
        summary, summary.image_ids, rank=0, world=1, batch_size=2, seed=0, epoch=1
    )
    assert len(tasks) >= 3
    got = list(feed_of(summary, tasks))
    assert sorted(b["image_id"].tolist() for b in got) == sorted(planned(tasks))
    for b in got:
        assert b["image"].shape == (2, 32, 32, 3) and b["image"].dtype == torch.uint8
        assert b["mask"].shape == (2, 32, 32)
        assert b["problem"].tolist() == [3 if i == 101 else 0 for i in b["image_id"].tolist()]


def test_feed_starts_the_next_task_once_one_has_made_its_last_batch(ray_local, tmp_path):
    # in_flight=1: the second part is read while the first one's batches are still being taken
    # (before, it started only once they all were: a wait at every part's start).
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 16, parts=2)))
    tasks = ingest.train_tasks(
        summary, summary.image_ids, rank=0, world=1, batch_size=2, seed=0, epoch=1
    )
    assert [len(t.batches) for t in tasks] == [4, 4]
    made = tmp_path / "made"
    make = functools.partial(ingest.train_batch, lut=CLASS_MAP.train_lut(), crop_size=32)

    def noted(batch, out=None):
        with made.open("a") as f:
            f.write(f"{int(batch['image_id'][0])}\n")
        return make(batch, out=out)

    def made_firsts(count: int) -> set[int]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = made.read_text().split() if made.exists() else []
            if len(lines) >= count:
                return {int(x) for x in lines}
            time.sleep(0.05)
        return {int(x) for x in made.read_text().split()}

    first_task = {int(b[0]) for b in tasks[0].batches}
    epoch = iter(feed_of(summary, tasks, make_batch=noted, in_flight=1))
    taken = [next(epoch)]
    assert made_firsts(4) == first_task  # the first task alone has run, to its end
    time.sleep(1)  # its end reaches the driver
    taken += [next(epoch) for _ in range(3)]  # the first task's batches, the last one held
    assert {int(b["image_id"][0]) for b in taken} == first_task
    assert len(made_firsts(5)) >= 5, "the second task waited for the first one's last batch"
    rest = list(epoch)
    assert len(rest) == 4 and {int(b["image_id"][0]) for b in rest} == {
        int(b[0]) for b in tasks[1].batches
    }


def test_feed_says_a_part_gone_since_the_scan_in_rayseg_s_line(ray_local, tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 8, parts=2)))
    tasks = ingest.train_tasks(
        summary, summary.image_ids, rank=0, world=1, batch_size=2, seed=0, epoch=1
    )
    os.remove(summary.paths[1])
    with pytest.raises(RaysegError, match=r"part-.*: the data changed while training") as e:
        list(feed_of(summary, tasks))
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)


def test_task_objects_hand_arrays_over_1_mib_to_ray_in_chunks(tmp_path):
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 3, parts=1)))
    (task,) = ingest.val_tasks(summary, summary.image_ids, batch_size=1)
    make = functools.partial(ingest.val_batch, lut=CLASS_MAP.train_lut(), height=600, width=700)
    groups = list(ingest.task_objects(task, summary.location.fs, make, group=4))
    assert [len(g) for g in groups] == [1, 2]
    for batch in (b for g in groups for b in g):
        assert isinstance(batch["image"], raycompat.InChunks)  # (1, 600, 700, 3): 1.26 MB
        assert isinstance(batch["mask"], np.ndarray) and batch["mask"].nbytes < raycompat.CHUNK


# A process allocates, writes and frees 64 MiB twice; prints the page faults of the second time
# and Arrow's allocator (args: "keep" to call keep_freed_memory first).
_SECOND_BLOCK_FAULTS = """
import resource, sys, numpy as np, pyarrow as pa
from rayseg import ingest
if sys.argv[1:] == ["keep"]:
    ingest.keep_freed_memory()
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 << 20, np.uint8)
    del block
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults, pa.default_memory_pool().backend_name)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_data_task_process_keeps_the_memory_it_frees_for_its_next_task():
    import subprocess

    def second_block(*args: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-c", _SECOND_BLOCK_FAULTS, *args], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        faults, pool = done.stdout.split()
        return int(faults), pool

    # glibc's defaults: a block of 64 MiB is mapped anew, and faulted in (4 KiB or 2 MiB pages).
    returned, pool = second_block()
    assert returned >= 32 and pool != "system"
    kept, pool = second_block("keep")  # the first block's memory, reused
    assert kept < 8 and pool == "system"


def test_feed_batches_equal_those_made_in_process_though_tasks_reuse_arrays(ray_local, tmp_path):
    # A data task writes a group's arrays over once Ray has copied it at its yield (reuse), and
    # hands its images (1.26 MB each) over in chunks: every batch through Ray equals the same
    # batch made here, each in arrays of its own.
    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 9, parts=1, bad={102: "mask"})))
    (task,) = ingest.val_tasks(summary, summary.image_ids, batch_size=1)
    make = functools.partial(ingest.val_batch, lut=CLASS_MAP.train_lut(), height=600, width=700)
    want = {int(b["image_id"][0]): b for b in ingest.task_batches(task, summary.location.fs, make)}
    got = list(feed_of(summary, [task], make_batch=make))
    assert sorted(int(b["image_id"][0]) for b in got) == sorted(want) and len(got) == 9
    for b in got:
        one = want[int(b["image_id"][0])]
        np.testing.assert_array_equal(b["image"].numpy(), one["image"])
        np.testing.assert_array_equal(b["mask"].numpy(), one["mask"])
        assert b["problem"].tolist() == one["problem"].tolist()


def test_feed_closed_early_cancels_its_tasks(ray_local, tmp_path):
    import ray

    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 8, parts=2)))
    tasks = ingest.train_tasks(
        summary, summary.image_ids, rank=0, world=1, batch_size=2, seed=0, epoch=1
    )
    make = functools.partial(ingest.train_batch, lut=CLASS_MAP.train_lut(), crop_size=32)

    def slow(batch, out=None):  # each task's first batch at once, the others after a minute
        if batch["image_id"][0] not in firsts:
            time.sleep(60)
        return make(batch, out=out)

    firsts = {int(t.batches[0][0]) for t in tasks}
    epoch = iter(feed_of(summary, tasks, make_batch=slow))
    next(epoch)
    epoch.close()  # as when training stops mid-epoch
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2, "a data task still holds its CPU"


def test_data_loading_fits_beside_workers_holding_all_but_half_a_cpu(ray_local, tmp_path):
    # As on 1-CPU nodes after a lost node: training workers of half a CPU leave half a CPU on
    # each node. Every data-loading task must ask for no more (Ray Data's default Parquet
    # read listed files in 1-CPU tasks: it waited forever here).
    import threading

    import ray

    summary = ingest.scan_data(str(write_masks(tmp_path / "m", 6)))
    ids = summary.image_ids
    tasks = ingest.train_tasks(summary, ids, rank=0, world=1, batch_size=2, seed=0, epoch=1)
    val = functools.partial(ingest.val_batch, lut=CLASS_MAP.train_lut(), height=48, width=64)
    feeds = [
        feed_of(summary, tasks, num_cpus=0.5),
        feed_of(
            summary, ingest.val_tasks(summary, ids, batch_size=2), make_batch=val, num_cpus=0.5
        ),
    ]

    @ray.remote(num_cpus=1.5)
    class Workers:
        def ready(self) -> bool:
            return True

    held = Workers.remote()
    assert ray.get(held.ready.remote())
    rows = []
    reading = threading.Thread(
        target=lambda: [rows.extend(b["image_id"].tolist()) for f in feeds for b in f],
        daemon=True,
    )
    reading.start()
    reading.join(timeout=120)
    ray.kill(held)
    assert not reading.is_alive(), "a data-loading task waited for a whole CPU"
    assert sorted(rows) == sorted([*ids, *ids])
