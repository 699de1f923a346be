"""Stage 2: render one image's COCO annotations into a semantic mask.

Input: the image size and its annotations as `Shape`s (pixel value already mapped by the caller).
Output: a (height, width) uint8/uint16 array of background 0, object values and `ignore_value`, plus
the `Problem`s found in bad records (they are skipped or repaired, never raised); the caller adds
the image id. Rasterizing each segmentation is rayseg.rasterize's. Pure numpy: no Ray, no files.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rayseg.config import CROWD_MODES, OVERLAPS, RASTERIZERS, VALUE_SCHEMES
from rayseg.errors import RaysegError
from rayseg.rasterize import (
    Polygons,
    coco_polygon_masks,
    fill_opencv_polygon,
    opencv_polygon_mask,
    polygon_window,
    read_geometry,
)
from rayseg.records import BACKGROUND, DTYPE_MAX, Problem

DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
Window = tuple[int, int, int, int]  # top, left, bottom, right: mask[top:bottom, left:right]


@dataclass(frozen=True)
class Shape:
    """One annotation as the renderer needs it."""

    annotation_id: int
    value: int
    # COCO: list of polygons [[x1, y1, x2, y2, ...], ...] or RLE {"size": [h, w], "counts": ...}
    # with counts a list of ints (uncompressed, column-major) or a str/bytes (compressed).
    segmentation: Any
    iscrowd: bool = False


@dataclass(frozen=True)
class ValueScheme:
    """How category ids become pixel values."""

    name: str
    values: dict[int, int]
    dtype: str
    ignore_value: int
    background_value: int = BACKGROUND


@dataclass(frozen=True)
class _Layer:
    """One object's pixels: a window mask placed in the image at (top, left), or (opencv) its
    polygons, filled when painted."""

    value: int
    top: int
    left: int
    mask: np.ndarray | None  # (h', w') uint8 0/1, C-contiguous; h' <= height - top, etc.
    overrides: bool = False
    polygons: Polygons | None = None  # set instead of mask


def value_scheme(
    category_ids: Iterable[int], name: str, *, keep_order: bool = False
) -> ValueScheme:
    """The pixel value of each category id under scheme `name`; background is 0.

    train_id numbers the ids 1..K in sorted order, or in the order given with `keep_order`
    (e.g. VOC order).
    """
    ids = list(dict.fromkeys(_category_id(c) for c in category_ids))
    if not keep_order:
        ids.sort()
    if name == "category_id":
        values = {c: c for c in ids}
    elif name == "train_id":
        values = {c: k for k, c in enumerate(ids, start=1)}
    elif name == "scaled":
        values = {c: c * 100 for c in ids}
    else:
        raise RaysegError(
            f"unknown value scheme {name!r}; expected one of {', '.join(VALUE_SCHEMES)}"
        )
    top = max(values.values(), default=0)
    dtype = "uint8" if top < DTYPE_MAX["uint8"] and name != "scaled" else "uint16"
    if top >= DTYPE_MAX["uint16"]:
        worst = max(values, key=values.__getitem__)
        raise RaysegError(
            f"value scheme {name!r} maps category id {worst} to pixel value {top}, which does not "
            f"fit uint16 below its ignore value {DTYPE_MAX['uint16']}; use 'train_id'"
        )
    return ValueScheme(name, values, dtype, DTYPE_MAX[dtype])


def _category_id(value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise RaysegError(f"category id {value!r} is not an integer")
    if value <= 0:
        raise RaysegError(f"category id {value} is not positive; pixel value 0 is the background")
    return int(value)


def render_mask(
    height: int,
    width: int,
    shapes: Sequence[Shape],
    *,
    rasterizer: str = "opencv",
    overlap: str = "max",
    crowd: str = "class",
    ignore_value: int = 255,
    dtype: str = "uint8",
    max_vertices: int | None = None,
    windows: dict[int, Window] | None = None,
) -> tuple[np.ndarray, list[Problem]]:
    """The (height, width) semantic mask of `shapes` and the problems met on the way.

    rasterizer: "opencv" (cv2.fillPoly) or "coco" (bit-identical to pycocotools' annToMask).
    overlap: "max" keeps the larger value, "smallest_on_top" lets objects with fewer pixels win,
      "last" lets later shapes win, "ignore" turns pixels claimed by two different values into
      ignore_value, "ignore_any" turns pixels covered by two or more objects (same value or not)
      into ignore_value (torchvision's COCO target).
    crowd: "class" paints crowds like any object, "ignore" paints them ignore_value (above every
      class pixel), "skip" leaves them out.
    max_vertices: a polygon part with more vertices (or, far outside the image, a longer outline
      than max_vertices times the image's longer side) is dropped as a Problem; None: no cap.
      It bounds one polygon's cost: fillPoly's time grows with the square of its vertices when
      the edges cross, pycocotools' trace takes 80 bytes per pixel of outline. Besides that
      trace, memory is the mask and each object's window.
    windows: if given, filled with each non-zero value the mask may hold and a window that holds
      all of that value's pixels (for counting them without a pass over the whole mask).
    Bad records are skipped or repaired and reported as Problems; a non-positive image size or an
    unknown option is the caller's error (ValueError).
    """
    _check_options(height, width, rasterizer, overlap, crowd, ignore_value, dtype)
    if max_vertices is not None and max_vertices < 3:
        raise ValueError(f"max_vertices={max_vertices}; a polygon needs at least 3")
    layers, problems = _layers(
        height,
        width,
        shapes,
        rasterizer=rasterizer,
        crowd=crowd,
        ignore_value=ignore_value,
        dtype=dtype,
        max_vertices=max_vertices,
    )
    mask = _compose(height, width, layers, overlap=overlap, ignore_value=ignore_value, dtype=dtype)
    if windows is not None:
        contested = overlap in ("ignore", "ignore_any")
        windows.update(_value_windows(height, width, layers, ignore_value if contested else None))
    return mask, problems


def _check_options(
    height: int,
    width: int,
    rasterizer: str,
    overlap: str,
    crowd: str,
    ignore_value: int,
    dtype: str,
) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    for label, value, choices in (
        ("rasterizer", rasterizer, RASTERIZERS),
        ("overlap", overlap, OVERLAPS),
        ("crowd", crowd, CROWD_MODES),
        ("dtype", dtype, tuple(DTYPES)),
    ):
        if value not in choices:
            raise ValueError(f"{label}={value!r}; expected one of {', '.join(choices)}")
    top = DTYPE_MAX[dtype]
    if not 0 < ignore_value <= top:
        raise ValueError(f"ignore_value={ignore_value} does not fit {dtype} (1..{top})")


def _layers(
    height: int,
    width: int,
    shapes: Sequence[Shape],
    *,
    rasterizer: str,
    crowd: str,
    ignore_value: int,
    dtype: str,
    max_vertices: int | None,
) -> tuple[list[_Layer], list[Problem]]:
    """Every paintable shape rasterized into its own window (opencv: its polygons, filled by
    _compose); bad ones become Problems."""
    kept: list[tuple[int, bool, Polygons | np.ndarray]] = []  # value, overrides, geometry
    problems: list[Problem] = []
    for shape in shapes:
        as_ignore = shape.iscrowd and crowd == "ignore"
        if shape.iscrowd and crowd == "skip":
            continue
        if not as_ignore:
            reason = _value_problem(shape.value, dtype, ignore_value)
            if reason:
                problems.append(Problem(reason, annotation_id=shape.annotation_id))
                continue
        geometry, reasons = read_geometry(
            height, width, shape.segmentation, max_vertices=max_vertices
        )
        problems += [Problem(r, annotation_id=shape.annotation_id) for r in reasons]
        if geometry is not None:
            kept.append((ignore_value if as_ignore else int(shape.value), as_ignore, geometry))
    if rasterizer == "opencv":  # filled when composed, without windows where the overlap allows
        layers = [
            _Layer(v, 0, 0, None, o, g) if isinstance(g, Polygons) else _Layer(v, 0, 0, g, o)
            for v, o, g in kept
        ]
        return layers, problems
    polygons = [g for _, _, g in kept if isinstance(g, Polygons)]
    rasterized = iter(coco_polygon_masks(height, width, polygons))
    layers = []
    for value, overrides, geometry in kept:
        placed = next(rasterized) if isinstance(geometry, Polygons) else (0, 0, geometry)
        if placed is not None:
            layers.append(_Layer(value, *placed, overrides=overrides))
    return layers, problems


def _value_problem(value: Any, dtype: str, ignore_value: int) -> str | None:
    top = DTYPE_MAX[dtype]
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        return f"pixel value {value!r} is not an integer; annotation skipped"
    if not 0 < value <= top or value == ignore_value:
        return (
            f"pixel value {value} does not fit {dtype} (1..{top} except ignore value "
            f"{ignore_value}); annotation skipped"
        )
    return None


def _value_windows(
    height: int, width: int, layers: list[_Layer], contested: int | None
) -> dict[int, Window]:
    """Each layer value's window: the box around its layers' extents. `contested`: a value that
    may stand where layers overlap (ignore), so anywhere in the box around all of them."""
    extents: dict[int, list[tuple[float, float, float, float]]] = {}
    for layer in layers:
        if layer.polygons is not None:
            extent = layer.polygons.extent
        else:  # a window of pixels, as the extent of their centres
            rows, cols = layer.mask.shape
            extent = (layer.left, layer.top, layer.left + cols - 1, layer.top + rows - 1)
        extents.setdefault(layer.value, []).append(extent)
        if contested is not None:
            extents.setdefault(contested, []).append(extent)
    windows = {}
    for value, around in extents.items():
        low_x, low_y, high_x, high_y = zip(*around, strict=True)
        extent = (min(low_x), min(low_y), max(high_x), max(high_y))
        windows[value] = polygon_window(height, width, extent)
    return windows


# ---- composition ------------------------------------------------------------------------------


def _compose(
    height: int, width: int, layers: list[_Layer], *, overlap: str, ignore_value: int, dtype: str
) -> np.ndarray:
    canvas = np.zeros((height, width), DTYPES[dtype])
    objects = [layer for layer in layers if not layer.overrides]
    if overlap in ("max", "last"):
        _paint_over(canvas, objects, overlap)
    else:
        objects = _windowed(height, width, objects)
        if overlap == "smallest_on_top":
            # Largest painted first; a stable sort keeps input order (later wins) among equal sizes.
            objects.sort(key=lambda layer: -int(np.count_nonzero(layer.mask)))
        if overlap == "ignore_any":
            _paint_counting(canvas, objects, ignore_value)
        else:
            for layer in objects:
                _paint(_region(canvas, layer), layer.mask, layer.value, overlap, ignore_value)
    # Crowd-ignore regions override class pixels in every overlap mode: a crowd region holds
    # unlabelled instances, so no class label inside it can be trusted.
    for layer in layers:
        if layer.overrides:
            _overwrite(canvas, layer, ignore_value)
    return canvas


def _paint_over(canvas: np.ndarray, objects: list[_Layer], overlap: str) -> None:
    """Overlap "max" or "last": polygons filled straight into the canvas, each over the last."""
    if overlap == "last":
        for layer in objects:
            _overwrite(canvas, layer, layer.value)
        return
    # Filled in ascending value order (stable), each over the last, every pixel keeps its largest.
    for layer in sorted((o for o in objects if o.mask is None), key=lambda o: o.value):
        _overwrite(canvas, layer, layer.value)
    for layer in objects:
        if layer.mask is not None:
            _paint(_region(canvas, layer), layer.mask, layer.value, "max", 0)


def _overwrite(canvas: np.ndarray, layer: _Layer, value: int) -> None:
    if layer.polygons is not None:
        fill_opencv_polygon(canvas, layer.polygons, value)
    else:
        np.copyto(_region(canvas, layer), value, where=layer.mask.view(bool))


def _windowed(height: int, width: int, layers: list[_Layer]) -> list[_Layer]:
    """The layers with their polygons rasterized into windows; those outside the image dropped."""
    windowed = []
    for layer in layers:
        if layer.polygons is None:
            windowed.append(layer)
        elif (placed := opencv_polygon_mask(height, width, layer.polygons)) is not None:
            windowed.append(_Layer(layer.value, *placed, overrides=layer.overrides))
    return windowed


def _paint_counting(canvas: np.ndarray, objects: list[_Layer], ignore_value: int) -> None:
    """Each object's value where it alone covers a pixel; ignore_value where two or more do."""
    claimed = np.zeros(canvas.shape, bool)
    shared = np.zeros(canvas.shape, bool)
    for layer in objects:
        inside = layer.mask.view(bool)
        region_claimed = _region(claimed, layer)
        _region(shared, layer)[...] |= inside & region_claimed
        region_claimed |= inside
        np.copyto(_region(canvas, layer), layer.value, where=inside)
    canvas[shared] = ignore_value


def _region(canvas: np.ndarray, layer: _Layer) -> np.ndarray:
    rows, cols = layer.mask.shape
    return canvas[layer.top : layer.top + rows, layer.left : layer.left + cols]


def _paint(
    region: np.ndarray, mask: np.ndarray, value: int, overlap: str, ignore_value: int
) -> None:
    """Paint one object's 0/1 mask into its region of the canvas, in place."""
    if overlap == "max":
        # Arithmetic instead of where=: masked ufuncs are several times slower on blobs.
        np.maximum(region, np.multiply(mask, value, dtype=region.dtype), out=region)
        return
    inside = mask.view(bool)
    if overlap == "ignore":
        contested = inside & (region != 0) & (region != value)
        np.copyto(region, value, where=inside & (region == 0))
        np.copyto(region, ignore_value, where=contested)
    else:
        np.copyto(region, value, where=inside)
