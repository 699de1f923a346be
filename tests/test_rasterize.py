"""rayseg.rasterize through render_mask: polygons, RLE and bad segmentations (no Ray)."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from tiny_coco import pixel_counts as counts
from tiny_coco import square

from rayseg.config import RASTERIZERS
from rayseg.records import Problem
from rayseg.render import Shape, render_mask


def reasons(problems: list[Problem], annotation_id: int) -> str:
    return " | ".join(p.reason for p in problems if p.annotation_id == annotation_id)


# ---- polygons ----------------------------------------------------------------------------------


def test_square_is_100_pixels_with_coco_and_121_with_opencv():
    # A 10x10 square covers pixel centres 2.5 .. 11.5: rows and columns 2..11. fillPoly also
    # paints the boundary pixels, so opencv adds row and column 12.
    shapes = [Shape(1, 7, [square(2, 2, 12, 12)])]
    coco, problems = render_mask(20, 20, shapes, rasterizer="coco")
    assert problems == []
    assert counts(coco) == {0: 300, 7: 100}
    assert np.array_equal(np.argwhere(coco == 7).min(0), [2, 2])
    assert np.array_equal(np.argwhere(coco == 7).max(0), [11, 11])
    opencv, _ = render_mask(20, 20, shapes, rasterizer="opencv")
    assert counts(opencv) == {0: 400 - 121, 7: 121}
    assert np.array_equal(np.argwhere(opencv == 7).max(0), [12, 12])


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_multi_part_polygon_is_the_union_of_its_parts(rasterizer):
    # Two disjoint 4x4 squares plus one overlapping the first: 16 + 16 + 12 new pixels (coco).
    parts = [square(0, 0, 4, 4), square(10, 10, 14, 14), square(2, 2, 6, 6)]
    mask, _ = render_mask(20, 20, [Shape(1, 2, parts)], rasterizer=rasterizer)
    expected = {"coco": 44, "opencv": 66}[rasterizer]
    assert counts(mask)[2] == expected
    assert mask[3, 3] == 2, "overlapping parts of one object are not an even-odd hole"


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_image_without_shapes_is_background(rasterizer):
    mask, problems = render_mask(3, 4, [], rasterizer=rasterizer, dtype="uint16")
    assert mask.shape == (3, 4) and mask.dtype == np.uint16
    assert not mask.any() and problems == []


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_polygon_past_the_border_is_clipped_and_reported_once(rasterizer):
    shape = Shape(9, 4, [[-30.0, 2.0, 5.0, 2.0, 5.0, 6.0, -30.0, 6.0, -40.0, 4.0]])
    mask, problems = render_mask(10, 10, [shape], rasterizer=rasterizer)
    assert len(problems) == 1 and problems[0].annotation_id == 9
    assert "(-40, 4)" in problems[0].reason and "outside the 10x10 image" in problems[0].reason
    # coco: columns 0..4 of rows 2..5; opencv adds boundary row 6 and column 5
    assert counts(mask)[4] == {"coco": 20, "opencv": 30}[rasterizer]


def test_coordinates_a_fraction_outside_the_image_are_not_problems():
    # COCO polygons may end a fraction of a pixel past the image edge (float rounding).
    shape = Shape(1, 3, [[-0.6, -0.2, 20.9, -0.4, 20.7, 10.8, -0.3, 10.5]])
    for rasterizer in RASTERIZERS:
        _, problems = render_mask(10, 20, [shape], rasterizer=rasterizer)
        assert problems == []


def test_coco_rasterizer_survives_a_shift_sensitive_edge():
    # On the object's window, which starts at row 5, one edge of this polygon reaches a half step
    # where (int)(first + s * t + .5) rounds differently than on the full image: a plain shift of
    # the coordinates moves pixel (17, 16). render_mask lowers the window's top until the
    # rounding provably agrees.
    height, width = 24, 33
    polygon = [32.2, 7.0, 0.9, 28.0, 12.75, 6.0, 32.35, 20.0, 2.85, 26.0]
    reference = mask_utils.decode(mask_utils.frPyObjects([polygon], height, width)[0])
    top = 5
    shifted = np.asarray(polygon).reshape(-1, 2) - (0, top)
    naive = np.zeros_like(reference)
    naive[top:] = mask_utils.decode(
        mask_utils.frPyObjects([shifted.ravel()], height - top, width)[0]
    )
    assert np.argwhere(naive != reference).tolist() == [[17, 16]]
    mask, _ = render_mask(height, width, [Shape(1, 1, [polygon])], rasterizer="coco")
    assert np.array_equal(mask, reference)


# ---- bounded cost per record -------------------------------------------------------------------


def self_crossing(vertices: int, height: int, width: int) -> list[float]:
    """Random points over the whole image: nearly every pair of edges crosses (fillPoly's worst)."""
    rng = np.random.default_rng(0)
    return (rng.random((vertices, 2)) * (width, height)).ravel().round(2).tolist()


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_polygon_over_the_vertex_cap_is_skipped_and_named(rasterizer):
    # Uncapped, fillPoly needs minutes for this polygon and pycocotools' trace ~1 GB.
    shapes = [
        Shape(7, 3, [self_crossing(30_000, 480, 640)]),
        Shape(8, 5, [self_crossing(30_000, 480, 640), square(2, 2, 12, 12)]),
    ]
    mask, problems = render_mask(480, 640, shapes, rasterizer=rasterizer, max_vertices=10_000)
    cap = "polygon 0 has 30000 vertices, over --max-vertices 10000; part dropped"
    skipped = "no polygon left within --max-vertices 10000; annotation skipped"
    assert reasons(problems, 7) == f"{cap} | {skipped}"
    assert reasons(problems, 8) == cap, "the other part of annotation 8 is kept"
    assert counts(mask) == {0: 480 * 640 - _sq(rasterizer), 5: _sq(rasterizer)}


def _sq(rasterizer: str) -> int:
    """Pixels of square(2, 2, 12, 12): fillPoly adds a boundary row and column."""
    return {"coco": 100, "opencv": 121}[rasterizer]


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_polygon_at_the_vertex_cap_is_drawn(rasterizer):
    mask, problems = render_mask(
        20, 20, [Shape(1, 7, [square(2, 2, 12, 12)])], rasterizer=rasterizer, max_vertices=4
    )
    assert problems == [] and counts(mask)[7] == _sq(rasterizer)


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_outline_far_outside_the_image_is_capped_too(rasterizer):
    # 4 vertices, but pycocotools would trace 3e5 px of outline (16 bytes per 1/5 px) because
    # the coordinates reach 1e5; 4 edges inside a 20x20 image trace at most 4 x 20 px.
    far = [[0.0, 0.0, 1e5, 0.0, 1e5, 1e5, 0.0, 10.0], square(2, 2, 12, 12)]
    mask, problems = render_mask(20, 20, [Shape(1, 7, far)], rasterizer=rasterizer, max_vertices=4)
    found = reasons(problems, 1)
    assert (
        "polygon 0 has an outline of 300010 px, over the 80 px (--max-vertices 4 x 20 px)" in found
    )
    assert counts(mask)[7] == _sq(rasterizer), "the part inside the image is drawn alone"
    _, uncapped = render_mask(20, 20, [Shape(1, 7, far)], rasterizer=rasterizer)
    assert "outline" not in reasons(uncapped, 1)


def test_vertex_cap_below_a_triangle_is_a_caller_error():
    with pytest.raises(ValueError, match="max_vertices=2"):
        render_mask(5, 5, [], max_vertices=2)


# ---- RLE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
def test_uncompressed_rle_is_column_major(rasterizer):
    # 4 rows x 5 columns: 5 zeros (column 0 and the top of column 1), 3 ones, 12 zeros.
    rle = {"size": [4, 5], "counts": [5, 3, 12]}
    mask, problems = render_mask(4, 5, [Shape(1, 6, rle, iscrowd=True)], rasterizer=rasterizer)
    assert problems == []
    assert np.argwhere(mask == 6).tolist() == [[1, 1], [2, 1], [3, 1]]


@pytest.mark.parametrize("as_text", [False, True])
def test_compressed_rle_round_trips_a_known_array(as_text):
    known = np.zeros((6, 7), np.uint8)
    known[1:5, 2:4] = 1
    known[5, 6] = 1
    rle = mask_utils.encode(np.asfortranarray(known))
    if as_text:
        rle = {"size": rle["size"], "counts": rle["counts"].decode()}
    mask, problems = render_mask(6, 7, [Shape(1, 9, rle)])
    assert problems == []
    assert np.array_equal(mask, known * 9)


def test_uncompressed_rle_may_start_with_an_empty_zero_run():
    # COCO counts always begin with the zeros run; a mask starting with a one has 0 there.
    mask, _ = render_mask(2, 2, [Shape(1, 5, {"size": [2, 2], "counts": [0, 1, 3]})])
    assert mask.tolist() == [[5, 0], [0, 0]]


# ---- bad segmentations ---------------------------------------------------------------------

GOOD = [square(0, 0, 4, 4)]


@pytest.mark.parametrize("rasterizer", RASTERIZERS)
@pytest.mark.parametrize(
    ("segmentation", "expected", "rendered"),
    [
        (
            [[0, 0, 4, 0, 4, 4, 0]],
            ["polygon 0 has 7 coordinates (odd length)", "empty segmentation"],
            False,
        ),
        ([[0, 0, 4, 0]], ["polygon 0 has 2 points", "empty segmentation"], False),
        (
            [[0, 0, 4, 0, 4]] + GOOD,
            ["polygon 0 has 5 coordinates (odd length); part dropped"],
            True,
        ),
        ([], ["empty segmentation"], False),
        ([[]], ["empty segmentation"], False),
        ([[0, 0, 4, 0, float("nan"), 4]], ["polygon 0 has a non-finite coordinate (nan)"], False),
        ([[0, 0, float("inf"), 0, 4, 4]] + GOOD, ["non-finite coordinate (inf)"], True),
        (
            [[0, 0, 1e7, 0, 4, 4]],
            [
                "coordinate 1e+07 is beyond 100000; clamped",
                "(100000, 0) lies 99995 px outside the 5x5 image",
            ],
            True,
        ),
        ([["0", "0", "4", "0", "4", "4"]], ["polygon 0 is not a flat list of numbers"], False),
        ([[0, 0, [4], 0, 4, 4]], ["polygon 0 is not a flat list of numbers"], False),
        ([7, GOOD[0]], ["polygon 0 has type int, expected a list"], True),
        ([0, 0, 4, 0, 4, 4], ["flat list of numbers, expected a list of polygons"], False),
        ("0 0 4 0 4 4", ["segmentation has type str"], False),
        (None, ["segmentation has type NoneType"], False),
        ({"size": [5, 5], "counts": []}, ["empty segmentation: RLE has no counts"], False),
        ({"size": [5, 5], "counts": ""}, ["empty segmentation: RLE has no counts"], False),
        (
            {"size": [6, 5], "counts": [30]},
            ["RLE size [6, 5] differs from the image size [5, 5]"],
            False,
        ),
        ({"size": [5, 5], "counts": [3, 4]}, ["RLE counts sum to 7", "expected 5 * 5 = 25"], False),
        ({"size": [5, 5], "counts": [30, -5]}, ["min -5"], False),
        ({"size": [5, 5], "counts": [3.5, 21.5]}, ["RLE counts hold non-integers"], False),
        ({"size": [5, 5], "counts": [True, 24]}, ["RLE counts hold non-integers"], False),
        ({"size": [5, 5], "counts": "~~~"}, ["not valid COCO RLE text"], False),
        ({"size": [5, 5], "counts": "61"}, ["RLE counts sum to 7"], False),
        ({"size": [5, 5], "counts": 25}, ["RLE counts have type int"], False),
        ({"counts": [25]}, ["RLE size None is not [height, width]"], False),
    ],
)
def test_bad_records_become_problems_and_rendering_goes_on(
    rasterizer, segmentation, expected, rendered
):
    shapes = [Shape(41, 3, segmentation), Shape(42, 8, [square(1, 1, 3, 3)])]
    mask, problems = render_mask(5, 5, shapes, rasterizer=rasterizer)
    found = reasons(problems, 41)
    for text in expected:
        assert text in found
    assert all(p.annotation_id == 41 for p in problems)
    assert (mask == 8).sum() > 0, "the good annotation is still painted"
    assert ((mask == 3).sum() > 0) == rendered
