"""Rasterize one COCO segmentation: polygons (OpenCV or pycocotools' exact rule) and RLE.

Input: the image size and one annotation's `segmentation` (a list of polygons, or an RLE dict with
uncompressed or compressed counts). Output: checked geometry, each object's 0/1 pixels in its own
window of the image (or, with OpenCV, filled straight into the caller's mask), and the reasons a
part was dropped or repaired. An optional vertex cap bounds the time and memory one record can
cost. Pure numpy, cv2 and pycocotools.mask; rayseg.render composes the windows into a mask.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# Beyond this a coordinate is a data error, not geometry; it is clamped so that the
# rasterizers' integer arithmetic cannot overflow.
MAX_COORDINATE = 1e5
# COCO polygons may end a fraction of a pixel past the image edge (float rounding); only
# coordinates further out are reported.
EDGE_TOLERANCE = 1.0
# pycocotools' rleFrPoly traces polygon edges on a 5x upsampled integer grid.
_COCO_SCALE = 5
# cv2.fillPoly fractional bits; 3 bits with the half-pixel shift below matched pycocotools best
# on real COCO (99.546% of pixels vs 99.444% for plain rounding to integers).
_CV_SHIFT = 3


def read_geometry(
    height: int, width: int, segmentation: Any, *, max_vertices: int | None = None
) -> tuple[Polygons | np.ndarray | None, list[str]]:
    """Checked polygons, or an RLE's full-image uint8 0/1 mask, and what was wrong with them.

    The one place that tells polygons, uncompressed RLE and compressed RLE apart. max_vertices
    (None: no cap) bounds the cost of one polygon: a part with more vertices is dropped, and so is
    a part whose outline is longer than a polygon of max_vertices edges inside the image can be.
    """
    if isinstance(segmentation, dict):
        return _rle_mask(height, width, segmentation)
    if not isinstance(segmentation, list):
        return None, [
            f"segmentation has type {type(segmentation).__name__}, expected a list "
            "of polygons or an RLE dict; annotation skipped"
        ]
    return _polygons(height, width, segmentation, max_vertices)


# ---- polygons ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Polygons:
    """One object's usable polygon parts; the object is their union."""

    parts: list[np.ndarray]  # (k, 2) float64 [x, y], k >= 3
    extent: tuple[float, float, float, float]  # min x, min y, max x, max y over all parts


def _polygons(
    height: int, width: int, polygons: list[Any], max_vertices: int | None
) -> tuple[Polygons | None, list[str]]:
    """The usable parts of a COCO polygon list, and what was wrong with the rest."""
    if polygons and all(isinstance(v, numbers.Real) for v in polygons):
        return None, [
            "segmentation is a flat list of numbers, expected a list of polygons "
            "[[x1, y1, ...], ...]; annotation skipped"
        ]
    parts: list[np.ndarray] = []
    extents: list[list[float]] = []
    indices: list[int] = []
    reasons: list[str] = []
    for index, polygon in enumerate(polygons):
        # Checked before parsing: fillPoly's time grows with the square of the vertices once the
        # edges cross each other, pycocotools' memory with the outline's length.
        if max_vertices is not None and _vertices(polygon) > max_vertices:
            reasons.append(
                f"polygon {index} has {_vertices(polygon)} vertices, over --max-vertices "
                f"{max_vertices}; part dropped"
            )
            continue
        points, reason = _polygon_points(index, polygon)
        if reason:
            reasons.append(reason)
        if points is not None:
            parts.append(points[0])
            extents.append(points[1])
            indices.append(index)
    if not parts:
        return None, [*reasons, _nothing_left(reasons, max_vertices)]
    extent = _merge_extents(extents)
    worst = max(-extent[0], -extent[1], extent[2], extent[3])
    if worst > MAX_COORDINATE:
        reasons.append(f"coordinate {worst:g} is beyond {MAX_COORDINATE:g}; clamped to that limit")
        parts = [np.clip(p, -MAX_COORDINATE, MAX_COORDINATE) for p in parts]
        extent = _extent(parts)
    if _beyond_image(height, width, extent):
        reasons.append(_outside_reason(height, width, np.concatenate(parts)))
        if max_vertices is not None:
            parts, too_long = _short_outlines(height, width, parts, indices, max_vertices)
            reasons += too_long
            if not parts:
                return None, [*reasons, _nothing_left(reasons, max_vertices)]
            extent = _extent(parts)
    return Polygons(parts, extent), reasons


def _vertices(polygon: Any) -> int:
    return len(polygon) // 2 if isinstance(polygon, list | tuple | np.ndarray) else 0


def _nothing_left(reasons: list[str], max_vertices: int | None) -> str:
    if any("--max-vertices" in r for r in reasons):
        return f"no polygon left within --max-vertices {max_vertices}; annotation skipped"
    return "empty segmentation: no polygon with 3 or more points; annotation skipped"


def _polygon_points(
    index: int, polygon: Any
) -> tuple[tuple[np.ndarray, list[float]] | None, str | None]:
    """The part as (k, 2) float64 points and its [min x, min y, max x, max y], or the reason not."""
    if not isinstance(polygon, list | tuple | np.ndarray):
        return None, (
            f"polygon {index} has type {type(polygon).__name__}, expected a list of "
            "coordinates; part dropped"
        )
    try:
        raw = np.asarray(polygon)
    except ValueError:  # ragged nesting
        raw = None
    if raw is None or raw.ndim != 1 or (raw.size and raw.dtype.kind not in "iuf"):
        return None, f"polygon {index} is not a flat list of numbers; part dropped"
    if raw.size == 0:
        return None, None
    if raw.size % 2:
        return None, f"polygon {index} has {raw.size} coordinates (odd length); part dropped"
    if raw.size < 6:
        return None, (
            f"polygon {index} has {raw.size // 2} points, a polygon needs at least 3; part dropped"
        )
    points = raw.astype(np.float64, copy=False).reshape(-1, 2)
    extent = [*points.min(axis=0).tolist(), *points.max(axis=0).tolist()]
    # min and max carry any NaN or infinity; the sum can also overflow, hence the second look.
    if not math.isfinite(sum(extent)) and not np.isfinite(points).all():
        bad = points[~np.isfinite(points)][0]
        return None, f"polygon {index} has a non-finite coordinate ({bad}); part dropped"
    return (points, extent), None


def _merge_extents(extents: list[list[float]]) -> tuple[float, float, float, float]:
    if len(extents) == 1:
        low_x, low_y, high_x, high_y = extents[0]
        return low_x, low_y, high_x, high_y
    low_x, low_y, high_x, high_y = zip(*extents, strict=True)
    return min(low_x), min(low_y), max(high_x), max(high_y)


def _extent(parts: list[np.ndarray]) -> tuple[float, float, float, float]:
    points = parts[0] if len(parts) == 1 else np.concatenate(parts)
    (low_x, low_y), (high_x, high_y) = points.min(axis=0).tolist(), points.max(axis=0).tolist()
    return low_x, low_y, high_x, high_y


def _short_outlines(
    height: int, width: int, parts: list[np.ndarray], indices: list[int], max_vertices: int
) -> tuple[list[np.ndarray], list[str]]:
    """The parts whose outline is at most max_vertices times the image's longer side.

    No polygon of max_vertices points inside the image is longer; pycocotools traces the whole
    outline, points far outside included, on a 5x grid (16 bytes a step).
    """
    limit = max_vertices * max(height, width)
    kept, reasons = [], []
    for index, part in zip(indices, parts, strict=True):
        # Each edge's longer axis: the steps rleFrPoly traces it in.
        length = float(np.abs(np.diff(part, axis=0, append=part[:1])).max(axis=1).sum())
        if length <= limit:
            kept.append(part)
        else:
            reasons.append(
                f"polygon {index} has an outline of {length:.0f} px, over the {limit} px "
                f"(--max-vertices {max_vertices} x {max(height, width)} px) a polygon may "
                "trace; part dropped"
            )
    return kept, reasons


def _beyond_image(height: int, width: int, extent: tuple[float, float, float, float]) -> bool:
    low_x, low_y, high_x, high_y = extent
    # COCO coordinates are continuous: the image spans [0, width] x [0, height].
    return (
        min(low_x, low_y) < -EDGE_TOLERANCE
        or high_x > width + EDGE_TOLERANCE
        or high_y > height + EDGE_TOLERANCE
    )


def _outside_reason(height: int, width: int, points: np.ndarray) -> str:
    """The point furthest outside the image, as a reason."""
    excess = np.maximum(np.maximum(-points, points - (width, height)), 0).max(axis=1)
    far = int(np.argmax(excess))
    x, y = points[far]
    return (
        f"polygon point ({x:g}, {y:g}) lies {excess[far]:g} px outside the {width}x{height} "
        "image; the polygon is clipped to the image"
    )


def coco_polygon_masks(
    height: int, width: int, objects: list[Polygons]
) -> list[tuple[int, int, np.ndarray] | None]:
    """pycocotools' polygon rasterization of each object, run on its window of the image.

    Equal bit for bit to `decode(merge(frPyObjects(parts, height, width)))` cropped to the window.
    The window keeps the image edge on every side the polygon crosses it, because rleFrPoly
    clips there in its own way; elsewhere the shift is exact (see _window, _exact_offsets). The
    points of all objects go through numpy together: per-object calls would cost more than the
    rasterization.
    """
    windows = [_coco_window(height, width, o.extent) for o in objects]
    inside = {k: w for k, w in enumerate(windows) if w is not None}
    parts = [p for k in inside for p in objects[k].parts]
    if not parts:
        return [None] * len(objects)
    sizes = [len(p) for p in parts]
    part_owner = [k for k in inside for _ in objects[k].parts]
    vertex_owner = np.repeat(part_owner, sizes)  # (N,)
    # rleFrPoly: x = (int)(scale * x + .5), a C cast that truncates toward zero.
    grid = np.trunc(_COCO_SCALE * np.concatenate(parts) + 0.5)  # (N, 2) integers as float64
    corners = np.array([(0, 0) if w is None else w[:2] for w in windows])  # (K, 2) [left, top]
    offsets = _exact_offsets(grid.astype(np.int64), sizes, vertex_owner, corners)
    # Coordinates that rleFrPoly maps back onto exactly these grid points: 5x + .5 lands a
    # quarter step inside the cell that C's truncation toward zero selects.
    local = grid - _COCO_SCALE * offsets[vertex_owner] + 0.25
    local -= local < 0
    coordinates = local / _COCO_SCALE
    polygons: dict[int, list[np.ndarray]] = {k: [] for k in inside}
    stop = 0
    for k, size in zip(part_owner, sizes, strict=True):
        polygons[k].append(coordinates[stop : stop + size].ravel())
        stop += size
    masks: list[tuple[int, int, np.ndarray] | None] = [None] * len(objects)
    for (k, (left, top, right, bottom)), (shift_left, shift_top) in zip(
        inside.items(), offsets[list(inside)].tolist(), strict=True
    ):
        rles = mask_utils.frPyObjects(polygons[k], bottom - shift_top, right - shift_left)
        rle = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
        # The rows and columns between a lowered offset and the window are empty.
        mask = mask_utils.decode(rle)[top - shift_top :, left - shift_left :]
        masks[k] = (top, left, np.ascontiguousarray(mask))
    return masks


def _coco_window(
    height: int, width: int, extent: tuple[float, float, float, float]
) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels rleFrPoly can set, None if there are none."""
    # (int)(5 * v + .5) is monotonic, so the extent maps onto the grid's extent (Python floats
    # are the same doubles as C's).
    low_x, low_y, high_x, high_y = (math.trunc(_COCO_SCALE * v + 0.5) for v in extent)
    left, right = _window(low_x, high_x, width)
    top, bottom = _window(low_y, high_y, height)
    if bottom <= top or right <= left:
        return None  # entirely outside: rleFrPoly's toggles cancel out there too
    return left, top, right, bottom


def _window(low: int, high: int, size: int) -> tuple[int, int]:
    """[start, stop) pixels along one axis that hold every pixel rleFrPoly can set.

    low, high: the extreme grid values. start > 0 only when every grid value is at least 5 steps
    above it, so all values stay positive (C truncation equals floor) and rleFrPoly's clipping at
    0 never triggers; stop < size only when it sits 2 pixels beyond the furthest point, so the
    clipping at the far edge never triggers either. Where the polygon crosses an image edge the
    window ends at that edge.
    """
    start = min(max(0, low // _COCO_SCALE - 1), size)
    stop = max(min(size, high // _COCO_SCALE + 2), 0)
    return start, stop


def _exact_offsets(
    begin: np.ndarray, sizes: list[int], vertex_owner: np.ndarray, corners: np.ndarray
) -> np.ndarray:
    """Each object's (left, top) window corner, lowered until the shift cannot move a point.

    begin: (N, 2) [x, y] grid vertices of all parts, `sizes` per part, `vertex_owner` (N,) the
    object of each; corners: (K, 2). rleFrPoly walks the major axis of each edge and rounds the
    minor one as (int)(first + s * t + .5) with s = delta / major in doubles. Where the exact
    value is a half step H, s * t may miss it by about |H| * 2**-52 <= |delta| * 2**-52, and
    whether first + s * t rounds back onto H depends on the magnitude of first: a shift can move
    the traced point by one step. Once the whole edge lies above 4 * |delta| in the shifted
    frame, half an ulp of first + H exceeds that miss, so both frames round onto H. Only edges
    whose reduced slope has an even denominator that is not a power of two reach such H with an
    inexact s. Returns (K, 2) int64.
    """
    stops = np.cumsum(sizes)
    following = np.arange(1, len(begin) + 1)
    following[stops - 1] = stops - sizes  # each part closes on its first vertex
    end = begin[following]
    dx, dy = np.abs(end[:, 0] - begin[:, 0]), np.abs(end[:, 1] - begin[:, 1])
    denominator = np.maximum(dx, dy) // np.maximum(np.gcd(dx, dy), 1)
    risky = np.flatnonzero((denominator % 2 == 0) & (denominator & (denominator - 1) != 0))
    offsets = corners.astype(np.int64)
    if risky.size:
        # rleFrPoly traces y as the minor axis when dx >= dy, x otherwise.
        minor = (dx >= dy)[risky].astype(np.intp)
        lowest = np.minimum(begin[risky], end[risky])[np.arange(risky.size), minor]
        limit = (lowest - 4 * np.minimum(dx, dy)[risky] - 1) // _COCO_SCALE  # in pixels
        np.minimum.at(offsets, (vertex_owner[risky], minor), limit)
    return np.maximum(offsets, 0)


def opencv_polygon_mask(
    height: int, width: int, polygons: Polygons
) -> tuple[int, int, np.ndarray] | None:
    """cv2.fillPoly of every part (their union) into the object's window: (top, left, 0/1 mask)."""
    fixed = _opencv_parts(height, width, polygons)
    if fixed is None:
        return None
    (top, left, bottom, right), parts = fixed
    canvas = np.zeros((bottom - top, right - left), np.uint8)
    corner = np.array([left, top], np.int32) << _CV_SHIFT
    for part in parts:
        # One call per part: fillPoly fills several contours even-odd, COCO parts are a union.
        cv2.fillPoly(canvas, [part - corner], 1, cv2.LINE_8, _CV_SHIFT)
    return top, left, canvas


def fill_opencv_polygon(canvas: np.ndarray, polygons: Polygons, value: int) -> None:
    """Set the object's pixels of the (height, width) canvas to value, in place.

    The same pixels as opencv_polygon_mask, without a window: the fastest way to paint when later
    objects simply overwrite earlier ones.
    """
    fixed = _opencv_parts(*canvas.shape, polygons)
    for part in [] if fixed is None else fixed[1]:
        cv2.fillPoly(canvas, [part], value, cv2.LINE_8, _CV_SHIFT)


def _opencv_parts(
    height: int, width: int, polygons: Polygons
) -> tuple[tuple[int, int, int, int], list[np.ndarray]] | None:
    """The object's window (top, left, bottom, right) and its parts as cv2 fixed-point (k, 2)
    int32 image coordinates, or None if it covers no pixel of the image."""
    parts, extent = polygons.parts, polygons.extent
    if _beyond_image(height, width, extent):
        parts = [c for c in (_clip_to_image(height, width, p) for p in parts) if len(c) >= 3]
        if not parts:
            return None
        extent = _extent(parts)
    top, left, bottom, right = polygon_window(height, width, extent)
    if bottom <= top or right <= left:
        return None
    # COCO puts pixel centres at +0.5, cv2 at integers.
    scale = 1 << _CV_SHIFT
    fixed = [np.round((p - 0.5) * scale).astype(np.int32) for p in parts]
    return (top, left, bottom, right), fixed


def polygon_window(
    height: int, width: int, extent: tuple[float, float, float, float]
) -> tuple[int, int, int, int]:
    """(top, left, bottom, right): the box, cut to the image, that holds every pixel cv2 fills for
    a polygon of this extent (min x, min y, max x, max y); empty when bottom <= top or right <=
    left. A pixel of margin on each side covers the shift of pixel centres and the rounding."""
    low_x, low_y, high_x, high_y = extent
    top, left = max(0, math.floor(low_y) - 1), max(0, math.floor(low_x) - 1)
    bottom, right = min(height, math.ceil(high_y) + 1), min(width, math.ceil(high_x) + 1)
    return top, left, bottom, right


def _clip_to_image(height: int, width: int, points: np.ndarray) -> np.ndarray:
    """The polygon cut to the image plus a margin (Sutherland-Hodgman).

    cv2's fixed-point edges overflow beyond ~32k pixels; the cut edges run outside the image.
    """
    margin = EDGE_TOLERANCE
    for axis, bound, keep_below in (
        (0, -margin, False),
        (0, width + margin, True),
        (1, -margin, False),
        (1, height + margin, True),
    ):
        points = _clip_half_plane(points, axis, bound, keep_below=keep_below)
        if len(points) == 0:
            break
    return points


def _clip_half_plane(
    points: np.ndarray, axis: int, bound: float, *, keep_below: bool
) -> np.ndarray:
    inside = points[:, axis] <= bound if keep_below else points[:, axis] >= bound
    kept: list[np.ndarray] = []
    for i in range(len(points)):
        j = (i + 1) % len(points)
        if inside[i]:
            kept.append(points[i])
        if inside[i] != inside[j]:
            a, b = points[i], points[j]
            kept.append(a + (b - a) * ((bound - a[axis]) / (b[axis] - a[axis])))
    return np.array(kept).reshape(-1, 2)


# ---- RLE --------------------------------------------------------------------------------------


def _rle_mask(height: int, width: int, rle: dict[str, Any]) -> tuple[np.ndarray | None, list[str]]:
    """The full-image uint8 0/1 mask of an RLE segmentation, checked before pycocotools decodes it.

    pycocotools writes counts straight into the mask buffer, so counts that do not sum to
    height * width would read or write out of bounds.
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not (
        isinstance(size, list | tuple)
        and len(size) == 2
        and all(isinstance(v, numbers.Integral) for v in size)
    ):
        return None, [f"RLE size {size!r} is not [height, width]; annotation skipped"]
    if [int(v) for v in size] != [height, width]:
        return None, [
            f"RLE size {list(size)} differs from the image size [{height}, {width}]; "
            "annotation skipped"
        ]
    if isinstance(counts, str | bytes):
        text = counts.encode("utf-8", "surrogatepass") if isinstance(counts, str) else counts
        runs = _compressed_counts(text)
        if runs is None:
            return None, ["compressed RLE counts are not valid COCO RLE text; annotation skipped"]
        coded: Any = {"size": [height, width], "counts": text}
    elif isinstance(counts, list | tuple | np.ndarray):
        # JSON gives plain ints: checking their type first skips the slow ABC check.
        if not all(type(v) is int for v in counts) and not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in counts
        ):
            return None, ["RLE counts hold non-integers; annotation skipped"]
        runs = [int(v) for v in counts]
        coded = None
    else:
        return None, [
            f"RLE counts have type {type(counts).__name__}, expected a list of ints "
            "or a compressed string; annotation skipped"
        ]
    if not runs:
        return None, ["empty segmentation: RLE has no counts; annotation skipped"]
    if min(runs) < 0 or sum(runs) != height * width:
        return None, [
            f"RLE counts sum to {sum(runs)} (min {min(runs)}), expected "
            f"{height} * {width} = {height * width}; annotation skipped"
        ]
    if coded is None:
        coded = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    # decode gives column-major (Fortran) order; cv2.transpose of its (w, h) view copies it to
    # row-major ~15x faster than np.ascontiguousarray.
    return cv2.transpose(mask_utils.decode(coded).T), []


def _compressed_counts(text: bytes) -> list[int] | None:
    """Run lengths of COCO's compressed RLE string (rleFrString), or None if malformed.

    Each run is a little-endian base-32 varint of 6-bit chars offset by 48 (0x20 = more
    follows, 0x10 in the last char = negative); runs after the third are deltas to the run
    two before.
    """
    runs: list[int] = []
    value = shift = 0
    for byte in text:
        char = byte - 48
        if not 0 <= char < 64:
            return None
        value |= (char & 0x1F) << shift
        shift += 5
        if char & 0x20:
            continue
        if char & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    return None if shift else runs
