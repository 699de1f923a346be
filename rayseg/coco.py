"""Stage 1: load and validate a COCO instances file (subsets are rayseg.subset's).

No pixels here. The file is parsed once with msgspec: image and annotation records are kept as
`msgspec.Raw` (zero-copy slices of the file's bytes) beside small typed heads, so a 448 MB
train2017 file parses in seconds at about its own size in memory, and later stages copy or hand
out the chosen records' original bytes. Bad records become listed `Problem`s.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from rayseg.errors import RaysegError
from rayseg.records import Problem


class _RawFile(msgspec.Struct):
    images: list[msgspec.Raw]
    annotations: list[msgspec.Raw]
    categories: list[msgspec.Raw]
    info: msgspec.Raw = msgspec.Raw(b"{}")
    licenses: msgspec.Raw = msgspec.Raw(b"[]")


class _ImageHead(msgspec.Struct):
    id: Any = None
    file_name: Any = None
    height: Any = None
    width: Any = None


class _AnnHead(msgspec.Struct):
    id: int
    image_id: int
    category_id: int


class _LenientAnnHead(msgspec.Struct):
    id: Any = None
    image_id: Any = None
    category_id: Any = None


class Category(msgspec.Struct, frozen=True):
    id: int
    name: str = ""
    supercategory: str = ""


class Annotation(msgspec.Struct):
    """One annotation as a render task needs it (decoded inside the task from its raw bytes)."""

    id: int
    category_id: int
    segmentation: Any = None
    iscrowd: int = 0
    area: float = 0.0


_ANNOTATION = msgspec.json.Decoder(Annotation)


@dataclass(frozen=True, slots=True)
class Image:
    id: int
    file_name: str
    height: int
    width: int


@dataclass
class CocoIndex:
    """A parsed instances file: valid records, their raw bytes, and per-record problems."""

    path: str
    images: list[Image]
    image_raw: list[msgspec.Raw]
    ann_image_ids: np.ndarray  # (N,) int64, -1 where the annotation was rejected
    ann_category_ids: np.ndarray  # (N,) int64
    ann_raw: list[msgspec.Raw]
    categories: list[Category]
    categories_raw: list[msgspec.Raw]
    info_raw: msgspec.Raw
    licenses_raw: msgspec.Raw
    problems: list[Problem] = field(default_factory=list)
    num_images_in_file: int = 0
    digest: str = ""  # sha1 of the file's bytes, from the one read that parsed it


def load_coco(path: str) -> CocoIndex:
    """Parse and validate; fatal problems raise RaysegError, per-record ones are listed."""
    data = _read_file(path)
    try:
        raw = msgspec.json.decode(data, type=_RawFile)
    except msgspec.ValidationError as e:
        raise RaysegError(f"{path}: not a COCO instances file ({_describe(e)})") from None
    except msgspec.DecodeError as e:
        raise RaysegError(f"{path}: invalid JSON{_position(data, str(e))}") from None
    categories = _categories(path, raw.categories)
    images, image_raw, problems = _images(raw.images)
    ann_image_ids, ann_category_ids, ann_problems = _annotation_heads(
        raw.annotations, {im.id for im in images}, {c.id for c in categories}
    )
    return CocoIndex(
        path=path,
        images=images,
        image_raw=image_raw,
        ann_image_ids=ann_image_ids,
        ann_category_ids=ann_category_ids,
        ann_raw=raw.annotations,
        categories=categories,
        categories_raw=raw.categories,
        info_raw=raw.info,
        licenses_raw=raw.licenses,
        problems=problems + ann_problems,
        num_images_in_file=len(raw.images),
        digest=hashlib.sha1(data).hexdigest(),
    )


def _read_file(path: str) -> bytes:
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        raise RaysegError(f"{path}: file not found") from None
    except (OSError, IsADirectoryError) as e:
        raise RaysegError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not data.strip():
        raise RaysegError(f"{path}: file is empty")
    return data


def _describe(e: msgspec.ValidationError) -> str:
    text = str(e)
    m = re.match(r"Object missing required field `(\w+)`", text)
    if m:
        return f"no '{m.group(1)}' list"
    return text.replace("$", "top level")


def _position(data: bytes, message: str) -> str:
    """msgspec reports a byte offset; users want line and column."""
    m = re.search(r"byte (\d+)", message)
    if not m:
        return f" ({message})"
    offset = int(m.group(1))
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    reason = message.split("(")[0].replace("JSON is malformed:", "").strip()
    return f" at line {line}, column {column}: {reason}"


def _categories(path: str, raws: list[msgspec.Raw]) -> list[Category]:
    decoder = msgspec.json.Decoder(Category)
    cats = []
    for i, raw in enumerate(raws):
        try:
            cats.append(decoder.decode(raw))
        except msgspec.MsgspecError as e:
            raise RaysegError(f"{path}: category #{i} is malformed ({_describe(e)})") from None
    if not cats:
        raise RaysegError(f"{path}: 'categories' is empty")
    dup = [cid for cid, n in Counter(c.id for c in cats).items() if n > 1]
    if dup:
        raise RaysegError(f"{path}: category id {dup[0]} appears more than once")
    bad = [c.id for c in cats if c.id <= 0]
    if bad:
        raise RaysegError(f"{path}: category id {bad[0]} is not positive (0 is background)")
    return sorted(cats, key=lambda c: c.id)


def _images(raws: list[msgspec.Raw]) -> tuple[list[Image], list[msgspec.Raw], list[Problem]]:
    decoder = msgspec.json.Decoder(_ImageHead)
    images, kept, problems, seen = [], [], [], set()
    for i, raw in enumerate(raws):
        try:
            h = decoder.decode(raw)
        except msgspec.MsgspecError:
            problems.append(Problem(f"image record #{i} is not an object"))
            continue
        reason = _image_problem(h, seen)
        if reason:
            image_id = h.id if _is_int(h.id) else None
            problems.append(Problem(reason, image_id=image_id))
            continue
        seen.add(h.id)
        images.append(Image(h.id, h.file_name, h.height, h.width))
        kept.append(raw)
    return images, kept, problems


def _image_problem(h: _ImageHead, seen: set[int]) -> str | None:
    if not _is_int(h.id):
        return f"image id {h.id!r} is not an integer"
    if h.id in seen:
        return f"image id {h.id} appears more than once; later record skipped"
    if not isinstance(h.file_name, str) or not h.file_name:
        return "image has no file_name"
    for key in ("width", "height"):
        v = getattr(h, key)
        if v is None:
            return f"image has no {key}"
        if not _is_int(v) or v <= 0:
            return f"image {key} is {v!r}, expected a positive integer"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _annotation_heads(
    raws: list[msgspec.Raw], image_ids: set[int], category_ids: set[int]
) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
    """(image id, category id) per annotation, -1 where rejected, and the rejections."""
    n = len(raws)
    ann_ids = np.zeros(n, dtype=np.int64)
    img = np.full(n, -1, dtype=np.int64)
    cat = np.full(n, -1, dtype=np.int64)
    malformed = []
    decode = msgspec.json.Decoder(_AnnHead).decode
    # One tight loop: this is most of a 860k-annotation file's parse time.
    for i, raw in enumerate(raws):
        try:
            h = decode(raw)
        except msgspec.MsgspecError:
            malformed.append(i)
            continue
        ann_ids[i], img[i], cat[i] = h.id, h.image_id, h.category_id
    problems = [_malformed_problem(i, raws[i]) for i in malformed]
    decoded = img != -1
    bad_image = decoded & ~np.isin(img, np.fromiter(image_ids, np.int64, len(image_ids)))
    bad_cat = decoded & ~bad_image & ~np.isin(cat, np.fromiter(category_ids, np.int64))
    for i in np.flatnonzero(bad_image | bad_cat):
        what = (
            f"image_id {img[i]} is not a valid image of the file"
            if bad_image[i]
            else f"category_id {cat[i]} is not in 'categories'"
        )
        problems.append(Problem(what, image_id=int(img[i]), annotation_id=int(ann_ids[i])))
    img[bad_image | bad_cat] = -1
    cat[bad_image | bad_cat] = -1
    return img, cat, problems


def _malformed_problem(i: int, raw: msgspec.Raw) -> Problem:
    try:
        h = msgspec.json.decode(raw, type=_LenientAnnHead)
    except msgspec.MsgspecError:
        return Problem(f"annotation record #{i} is not an object")
    for key in ("id", "image_id", "category_id"):
        value = getattr(h, key)
        if not _is_int(value):
            return Problem(
                f"annotation #{i}: {key} is {value!r}, expected an integer",
                image_id=h.image_id if _is_int(h.image_id) else None,
                annotation_id=h.id if _is_int(h.id) else None,
            )
    return Problem(f"annotation #{i} is malformed", image_id=h.image_id, annotation_id=h.id)


def _read_bytes(path: str) -> bytes:
    if "://" not in path:
        # Plain open(): rayseg.storage pulls in pyarrow and OpenCV (~75 MB) this stage can skip.
        with open(path, "rb") as f:
            return f.read()
    from rayseg import storage

    return storage.read_bytes(storage.locate(path))


def decode_annotation(raw: bytes) -> Annotation:
    return _ANNOTATION.decode(raw)


def annotations_by_image(index: CocoIndex) -> dict[int, list[int]]:
    """image id -> positions of its valid annotations, in file order."""
    order = np.argsort(index.ann_image_ids, kind="stable")
    ids = index.ann_image_ids[order]
    unique, starts = np.unique(ids, return_index=True)
    ends = np.append(starts[1:], len(ids))
    return {
        int(u): order[s:e].tolist() for u, s, e in zip(unique, starts, ends, strict=True) if u >= 0
    }
