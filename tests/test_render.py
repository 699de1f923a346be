"""rayseg.render: overlaps, crowds, value schemes, bad values and options, properties (no Ray)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils
from tiny_coco import pixel_counts as counts
from tiny_coco import square

from rayseg.config import CROWD_MODES, OVERLAPS, RASTERIZERS
from rayseg.errors import RaysegError
from rayseg.render import Shape, ValueScheme, render_mask, value_scheme
from rayseg.shard import value_counts


def coco_reference(height: int, width: int, shapes: list[Shape]) -> np.ndarray:
    """COCO.annToMask per shape, np.maximum of value * mask: the original script's rule."""
    out = np.zeros((height, width), np.uint8)
    for s in shapes:
        seg = s.segmentation
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        out = np.maximum(out, mask_utils.decode(rle) * np.uint8(s.value))
    return out


# ---- overlaps and crowds -----------------------------------------------------------------------

# A 12x12 square of value 2 (144 px) listed after a 4x4 square of value 7 inside it (16 px).
INNER_FIRST = [Shape(1, 7, [square(4, 4, 8, 8)]), Shape(2, 2, [square(0, 0, 12, 12)])]


@pytest.mark.parametrize(
    ("overlap", "expected"),
    [
        ("max", {0: 256, 2: 128, 7: 16}),
        ("last", {0: 256, 2: 144}),
        ("smallest_on_top", {0: 256, 2: 128, 7: 16}),
        ("ignore", {0: 256, 2: 128, 255: 16}),
        ("ignore_any", {0: 256, 2: 128, 255: 16}),
    ],
)
def test_overlap_modes_on_nested_squares(overlap, expected):
    mask, _ = render_mask(20, 20, INNER_FIRST, rasterizer="coco", overlap=overlap)
    assert counts(mask) == expected


@pytest.mark.parametrize(
    ("overlap", "expected"),
    [
        ("max", {0: 225, 3: 75, 5: 100}),
        ("last", {0: 225, 3: 100, 5: 75}),
        # equal sizes: the later shape wins, as with "last"
        ("smallest_on_top", {0: 225, 3: 100, 5: 75}),
        ("ignore", {0: 225, 3: 75, 5: 75, 255: 25}),
        ("ignore_any", {0: 225, 3: 75, 5: 75, 255: 25}),
    ],
)
def test_overlap_modes_on_crossing_squares(overlap, expected):
    shapes = [Shape(1, 5, [square(0, 0, 10, 10)]), Shape(2, 3, [square(5, 5, 15, 15)])]
    mask, _ = render_mask(20, 20, shapes, rasterizer="coco", overlap=overlap)
    assert counts(mask) == expected


def test_ignore_overlap_keeps_same_class_overlaps():
    shapes = [Shape(1, 5, [square(0, 0, 10, 10)]), Shape(2, 5, [square(5, 5, 15, 15)])]
    mask, _ = render_mask(20, 20, shapes, rasterizer="coco", overlap="ignore")
    assert counts(mask) == {0: 225, 5: 175}


def test_ignore_any_overlap_also_ignores_same_class_overlaps():
    # Two 10x10 squares of one class sharing a 5x5 corner, and a multi-part object whose own
    # parts overlap: only different objects count (torchvision's COCO target rule).
    same = [Shape(1, 4, [square(0, 0, 10, 10)]), Shape(2, 4, [square(5, 5, 15, 15)])]
    mask, _ = render_mask(20, 20, same, rasterizer="coco", overlap="ignore_any")
    assert counts(mask) == {0: 225, 4: 150, 255: 25}
    parts = [Shape(3, 4, [square(0, 0, 10, 10), square(5, 5, 15, 15)])]
    mask, _ = render_mask(20, 20, parts, rasterizer="coco", overlap="ignore_any")
    assert counts(mask) == {0: 225, 4: 175}


def test_ignore_overlap_with_uint16():
    shapes = [Shape(1, 500, [square(0, 0, 10, 10)]), Shape(2, 300, [square(5, 5, 15, 15)])]
    mask, _ = render_mask(
        20, 20, shapes, rasterizer="coco", overlap="ignore", ignore_value=65535, dtype="uint16"
    )
    assert mask.dtype == np.uint16
    assert counts(mask) == {0: 225, 300: 75, 500: 75, 65535: 25}


# Crowd: the left 3 columns of a 4x6 image (12 px); a class-9 square over columns 2..4, rows 0..1.
CROWD = Shape(1, 4, {"size": [4, 6], "counts": [0, 12, 12]}, iscrowd=True)
OBJECT = Shape(2, 9, [square(2, 0, 5, 2)])


@pytest.mark.parametrize(
    ("crowd", "expected"),
    [
        ("class", {0: 8, 4: 10, 9: 6}),  # max: 9 beats the crowd's 4 on the 2 shared pixels
        ("ignore", {0: 8, 9: 4, 255: 12}),
        ("skip", {0: 18, 9: 6}),
    ],
)
def test_crowd_modes(crowd, expected):
    mask, _ = render_mask(4, 6, [CROWD, OBJECT], rasterizer="coco", crowd=crowd)
    assert counts(mask) == expected


@pytest.mark.parametrize("overlap", OVERLAPS)
def test_crowd_ignore_overrides_class_pixels_in_every_overlap_mode(overlap):
    # The object comes last and is larger than nothing else; the crowd still wins its pixels.
    mask, _ = render_mask(4, 6, [CROWD, OBJECT], rasterizer="coco", crowd="ignore", overlap=overlap)
    assert (mask[:, :3] == 255).all()
    assert counts(mask)[9] == 4


def test_skipped_crowds_report_nothing_even_when_malformed():
    bad_crowd = Shape(1, 4, {"size": [9, 9], "counts": [81]}, iscrowd=True)
    _, problems = render_mask(4, 6, [bad_crowd], crowd="skip")
    assert problems == []


# ---- value schemes -----------------------------------------------------------------------------


def test_category_id_scheme_is_identity_in_uint8():
    assert value_scheme([90, 1, 3, 3], "category_id") == ValueScheme(
        "category_id", {1: 1, 3: 3, 90: 90}, "uint8", 255
    )


def test_category_id_scheme_falls_back_to_uint16_instead_of_saturating():
    scheme = value_scheme([1, 255], "category_id")
    assert (scheme.dtype, scheme.ignore_value, scheme.values[255]) == ("uint16", 65535, 255)


def test_train_id_scheme_is_contiguous_in_category_order():
    assert value_scheme([90, 3, 1], "train_id") == ValueScheme(
        "train_id", {1: 1, 3: 2, 90: 3}, "uint8", 255
    )
    assert value_scheme(range(1, 255), "train_id").dtype == "uint8"
    wide = value_scheme(range(1, 256), "train_id")
    assert (wide.dtype, wide.ignore_value, wide.values[255]) == ("uint16", 65535, 255)


def test_train_id_scheme_can_keep_the_given_order():
    assert value_scheme([5, 2, 16], "train_id", keep_order=True).values == {5: 1, 2: 2, 16: 3}
    assert value_scheme([5, 2, 16], "train_id").values == {2: 1, 5: 2, 16: 3}


def test_scaled_scheme_is_uint16():
    assert value_scheme([1, 90], "scaled") == ValueScheme(
        "scaled", {1: 100, 90: 9000}, "uint16", 65535
    )
    assert value_scheme([655], "scaled").values == {655: 65500}


def test_scaled_scheme_refuses_values_that_reach_the_ignore_value():
    with pytest.raises(RaysegError, match=r"category id 656 to pixel value 65600"):
        value_scheme([1, 656], "scaled")


def test_category_id_scheme_refuses_ids_beyond_uint16():
    with pytest.raises(RaysegError, match="65535"):
        value_scheme([70000], "category_id")


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_category_ids_are_errors(bad):
    with pytest.raises(RaysegError, match=f"category id {bad} is not positive"):
        value_scheme([1, bad], "category_id")


def test_unknown_scheme_is_an_error():
    with pytest.raises(RaysegError, match="unknown value scheme 'ids'"):
        value_scheme([1], "ids")


# ---- bad values and options ------------------------------------------------------------------

GOOD = [square(0, 0, 4, 4)]


@pytest.mark.parametrize(
    ("value", "dtype", "text"),
    [
        (300, "uint8", "pixel value 300 does not fit uint8 (1..255 except ignore value 255)"),
        (0, "uint8", "pixel value 0 does not fit uint8"),
        (255, "uint8", "pixel value 255 does not fit uint8"),
        (70000, "uint16", "pixel value 70000 does not fit uint16"),
        (2.5, "uint8", "pixel value 2.5 is not an integer"),
    ],
)
def test_values_that_do_not_fit_are_skipped(value, dtype, text):
    ignore = {"uint8": 255, "uint16": 65535}[dtype]
    mask, problems = render_mask(5, 5, [Shape(5, value, GOOD)], dtype=dtype, ignore_value=ignore)
    assert [p.annotation_id for p in problems] == [5]
    assert problems[0].reason.startswith(text)
    assert not mask.any()


@pytest.mark.parametrize(("height", "width"), [(0, 5), (5, 0), (-1, 5)])
def test_empty_image_size_is_a_caller_error(height, width):
    with pytest.raises(ValueError, match="image size must be positive"):
        render_mask(height, width, [])


@pytest.mark.parametrize(
    "options",
    [
        {"rasterizer": "skimage"},
        {"overlap": "min"},
        {"crowd": "drop"},
        {"dtype": "int32"},
        {"ignore_value": 256},
        {"ignore_value": 0},
    ],
)
def test_unknown_options_are_caller_errors(options):
    with pytest.raises(ValueError):
        render_mask(5, 5, [], **options)


# ---- properties --------------------------------------------------------------------------------


@st.composite
def coordinates(draw, size: int) -> float:
    """Coordinates in and around an image side, with the 0.1 / 0.05 steps that real COCO has."""
    low, high = -size // 3 - 2, size + size // 3 + 2
    return draw(
        st.one_of(
            st.floats(low, high, allow_nan=False),
            st.integers(low, high).map(float),
            st.integers(10 * low, 10 * high).map(lambda v: v / 10),
            st.integers(20 * low, 20 * high).map(lambda v: v / 20),
        )
    )


@st.composite
def polygons(draw, height: int, width: int) -> list[list[float]]:
    parts = []
    for _ in range(draw(st.integers(1, 2))):
        points = draw(st.integers(3, 8))
        part: list[float] = []
        for _ in range(points):
            part += [draw(coordinates(width)), draw(coordinates(height))]
        parts.append(part)
    return parts


@st.composite
def scenes(draw, *, crowds: bool) -> tuple[int, int, list[Shape]]:
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    shapes = []
    for k in range(draw(st.integers(0, 4))):
        value = draw(st.integers(1, 254))
        if crowds and draw(st.booleans()):
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            known = rng.random((height, width)) < draw(st.sampled_from([0.1, 0.5, 0.9]))
            rle = mask_utils.encode(np.asfortranarray(known, dtype=np.uint8))
            shapes.append(Shape(k, value, rle, iscrowd=True))
        else:
            shapes.append(Shape(k, value, draw(polygons(height, width))))
    return height, width, shapes


@settings(max_examples=150, deadline=None)
@given(scene=scenes(crowds=True))
@example(
    scene=(24, 33, [Shape(1, 1, [[32.2, 7.0, 0.9, 28.0, 12.75, 6.0, 32.35, 20.0, 2.85, 26.0]])])
)
def test_coco_rasterizer_equals_pycocotools_on_the_full_image(scene):
    height, width, shapes = scene
    mask, _ = render_mask(height, width, shapes, rasterizer="coco")
    assert np.array_equal(mask, coco_reference(height, width, shapes))


@settings(max_examples=100, deadline=None)
@given(
    scene=scenes(crowds=True),
    rasterizer=st.sampled_from(RASTERIZERS),
    overlap=st.sampled_from(OVERLAPS),
    crowd=st.sampled_from(CROWD_MODES),
    dtype=st.sampled_from(["uint8", "uint16"]),
    ignore_value=st.sampled_from([255, 254, 7]),
    scale=st.sampled_from([1, 2]),
)
def test_mask_holds_only_background_shape_values_and_ignore(
    scene, rasterizer, overlap, crowd, dtype, ignore_value, scale
):
    height, width, shapes = scene
    # scale 2 pushes some values past uint8, where they must be skipped, not wrapped
    shapes = [Shape(s.annotation_id, s.value * scale, s.segmentation, s.iscrowd) for s in shapes]
    windows = {}
    mask, problems = render_mask(
        height,
        width,
        shapes,
        rasterizer=rasterizer,
        overlap=overlap,
        crowd=crowd,
        ignore_value=ignore_value,
        dtype=dtype,
        windows=windows,
    )
    assert mask.shape == (height, width) and mask.dtype == np.dtype(dtype)
    allowed = {0, ignore_value} | {s.value for s in shapes}
    assert set(np.unique(mask).tolist()) <= allowed
    assert all(p.annotation_id in {s.annotation_id for s in shapes} for p in problems)
    # Each non-zero value's window holds all of its pixels (what value_counts' fast path needs).
    for value in set(np.unique(mask).tolist()) - {0}:
        top, left, bottom, right = windows[value]
        inside = np.count_nonzero(mask[top:bottom, left:right] == value)
        assert inside == np.count_nonzero(mask == value), (value, windows[value])


@settings(max_examples=100, deadline=None)
@given(scene=scenes(crowds=True))
def test_opencv_fills_into_the_mask_the_pixels_of_its_windows(scene):
    # "max" and "last" fill polygons straight into the mask; "smallest_on_top" rasterizes each
    # object into its own window first, so one object alone gives its windowed pixels.
    height, width, shapes = scene
    alone = [render_mask(height, width, [s], overlap="smallest_on_top")[0] for s in shapes]
    highest = np.zeros((height, width), np.uint8)
    latest = np.zeros((height, width), np.uint8)
    for mask in alone:
        highest = np.maximum(highest, mask)
        latest = np.where(mask > 0, mask, latest)
    assert np.array_equal(render_mask(height, width, shapes, overlap="max")[0], highest)
    assert np.array_equal(render_mask(height, width, shapes, overlap="last")[0], latest)


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint16]),
    present=st.lists(st.integers(0, 255), min_size=1, max_size=20),
    named=st.lists(
        st.tuples(st.integers(0, 300), st.lists(st.integers(-2, 20), min_size=4, max_size=4)),
        max_size=20,
    ),
    seed=st.integers(0, 2**16),
)
def test_value_counts_counts_every_value_whatever_the_windows_say(dtype, present, named, seed):
    """Windows that miss a value, cut off some of its pixels or name absent values never drop or
    invent pixels; windows that hold every pixel give the same counts (the fast path)."""
    rng = np.random.default_rng(seed)
    mask = rng.choice(np.array(present, dtype=dtype), size=(13, 17))
    values, pixels = np.unique(mask, return_counts=True)
    truth = {int(v): int(n) for v, n in zip(values, pixels, strict=True)}
    windows = {v: tuple(box) for v, box in named}  # negative bounds slice from the end
    assert value_counts(mask, windows) == truth
    whole = {v: (0, 0, 13, 17) for v in truth}
    assert value_counts(mask, whole) == truth
    assert value_counts(mask) == truth
