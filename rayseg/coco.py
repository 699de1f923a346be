"""Stage 1: load and validate a COCO instances file (subsets are rayseg.subset's).

No pixels here. `load_coco` is the reference parse: the file is parsed once with msgspec, image
and annotation records are kept as `msgspec.Raw` (zero-copy slices of the file's bytes) beside
small typed heads, so a 448 MB train2017 file parses in seconds at about its own size in memory,
and later stages copy or hand out the chosen records' original bytes. Bad records become listed
`Problem`s; bad files a RaysegError naming what is wrong. The record types, the `Records` store
protocol and the checks live here too: rayseg.coco_apart (the masks driver's parse, in a child
process, records as byte ranges of the file) builds the same CocoIndex with them.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Protocol

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


# Ids are stored as int64 (numpy, Parquet): a larger one is a listed problem, not an overflow.
INT64_MAX = 2**63 - 1
_Id = Annotated[int, msgspec.Meta(ge=-INT64_MAX, le=INT64_MAX)]
# Category ids are Parquet int32 (`category_ids`) and 0 is background.
CATEGORY_ID_MAX = 2**31 - 1
# Image sides are Parquet int32.
SIDE_MAX = 2**31 - 1


class _AnnHead(msgspec.Struct):
    id: _Id
    image_id: _Id
    category_id: _Id


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


class Records(Protocol):
    """The records of one array of the file, in file order, wherever they are held."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> bytes | msgspec.Raw: ...

    def __iter__(self) -> Iterator[bytes | msgspec.Raw]: ...

    def read(self, positions: np.ndarray) -> list[bytes]:
        """The bytes of the records at `positions` (any order)."""
        ...


@dataclass(frozen=True)
class MemoryRecords:
    """Records as msgspec.Raw views of the file's bytes, which they keep alive."""

    raws: list[msgspec.Raw]

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> msgspec.Raw:
        return self.raws[i]

    def __iter__(self) -> Iterator[msgspec.Raw]:
        return iter(self.raws)

    def read(self, positions: np.ndarray) -> list[bytes]:
        raws = self.raws
        return [bytes(raws[i]) for i in positions.tolist()]


@dataclass(frozen=True)
class CocoIndex:
    """A parsed instances file: valid records, their raw bytes, and per-record problems."""

    path: str
    images: list[Image]
    image_raw: Records  # the valid images' records, in the order of `images`
    ann_image_ids: np.ndarray  # (N,) int64
    ann_category_ids: np.ndarray  # (N,) int64
    ann_valid: np.ndarray  # (N,) bool, False where the annotation was rejected (listed)
    ann_raw: Records  # every annotation record of the file
    categories: list[Category]
    categories_raw: list[msgspec.Raw]
    info_raw: msgspec.Raw
    licenses_raw: msgspec.Raw
    problems: list[Problem] = field(default_factory=list)
    num_images_in_file: int = 0
    digest: str = ""  # sha1 of the file's bytes, from the one read that parsed it

    def __getstate__(self) -> dict[str, Any]:
        # The images as columns: pickling 118k Image objects one by one takes ~0.7 s both ways.
        state = dict(self.__dict__)
        images = state.pop("images")
        state["image_columns"] = tuple(
            [getattr(im, f.name) for im in images] for f in fields(Image)
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        columns = state.pop("image_columns")
        self.__dict__.update(state, images=list(map(Image, *columns)))


def load_coco(path: str) -> CocoIndex:
    """Parse and validate; fatal problems raise RaysegError, per-record ones are listed."""
    return parse_coco(path, read_coco_file(path))


def parse_coco(path: str, data: bytes) -> CocoIndex:
    """load_coco of a file's bytes `data` (read from `path`); its records are views of `data`."""
    try:
        return _parse_coco(path, data)
    except RecursionError:
        # msgspec decodes nested values recursively: JSON nested thousands deep (no COCO record
        # is) ends in RecursionError, in bounded time and memory.
        raise RaysegError(
            f"{path}: not a COCO instances file (JSON nested too deeply to be one)"
        ) from None


def _parse_coco(path: str, data: bytes) -> CocoIndex:
    try:
        raw = msgspec.json.decode(data, type=_RawFile)
    except msgspec.ValidationError as e:
        raise RaysegError(f"{path}: not a COCO instances file ({_describe(e)})") from None
    except msgspec.DecodeError as e:
        raise RaysegError(f"{path}: invalid JSON{_position(data, str(e))}") from None
    categories = check_categories(path, raw.categories)
    images, kept, problems = check_images(raw.images, set())
    heads = decode_heads(raw.annotations)
    ann_valid, ann_problems = check_heads(heads, images, categories)
    return CocoIndex(
        path=path,
        images=images,
        image_raw=MemoryRecords([raw.images[i] for i in kept]),
        ann_image_ids=heads.image_ids,
        ann_category_ids=heads.category_ids,
        ann_valid=ann_valid,
        ann_raw=MemoryRecords(raw.annotations),
        categories=categories,
        categories_raw=raw.categories,
        info_raw=raw.info,
        licenses_raw=raw.licenses,
        problems=problems + heads.problems + ann_problems,
        num_images_in_file=len(raw.images),
        digest=hashlib.sha1(data).hexdigest(),
    )


def read_coco_file(path: str) -> bytes:
    """The file's bytes (local or a URI); a missing, unreadable or empty file is a RaysegError."""
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        raise RaysegError(f"{path}: file not found") from None
    except (OSError, IsADirectoryError) as e:
        raise RaysegError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not data or data.isspace():  # not data.strip(): that would copy the whole file
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


def check_categories(path: str, raws: list[msgspec.Raw]) -> list[Category]:
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
    big = [c.id for c in cats if c.id > CATEGORY_ID_MAX]
    if big:
        raise RaysegError(f"{path}: category id {big[0]} is over {CATEGORY_ID_MAX} (int32)")
    return sorted(cats, key=lambda c: c.id)


def check_images(
    raws: Sequence[msgspec.Raw], seen: set[int], *, first: int = 0
) -> tuple[list[Image], list[int], list[Problem]]:
    """The valid images of `raws` (records first, first + 1, ... of the file), the positions of
    their records in `raws`, and the problems; `seen` (ids so far) is updated."""
    decoder = msgspec.json.Decoder(_ImageHead)
    images, kept, problems = [], [], []
    for i, raw in enumerate(raws):
        try:
            h = decoder.decode(raw)
        except msgspec.MsgspecError as e:
            problems.append(Problem(_unreadable("image", first + i, e)))
            continue
        reason = _image_problem(h, seen)
        if reason:
            image_id = h.id if _is_int(h.id) else None
            problems.append(Problem(reason, image_id=image_id))
            continue
        seen.add(h.id)
        images.append(Image(h.id, h.file_name, h.height, h.width))
        kept.append(i)
    return images, kept, problems


def _image_problem(h: _ImageHead, seen: set[int]) -> str | None:
    if isinstance(h.id, int) and not isinstance(h.id, bool) and not _is_int(h.id):
        return f"image id {h.id} does not fit int64 (-{INT64_MAX} to {INT64_MAX})"
    if not _is_int(h.id):
        return f"image id {h.id!r} is not an integer"
    if h.id in seen:
        return f"image id {h.id} appears more than once; later record skipped"
    if not isinstance(h.file_name, str) or not h.file_name:
        return "image has no file_name"
    if "\0" in h.file_name:
        return f"image file_name {h.file_name!r} contains a NUL character"
    if h.file_name.endswith(("/", "\\")):
        return f"image file_name {h.file_name!r} names a folder"
    for key in ("width", "height"):
        v = getattr(h, key)
        if v is None:
            return f"image has no {key}"
        if not _is_int(v) or not 0 < v <= SIDE_MAX:
            return f"image {key} is {v!r}, expected an integer from 1 to {SIDE_MAX}"
    return None


def _is_int(v: Any) -> bool:
    """An int that fits the int64 the ids are stored as."""
    return isinstance(v, int) and not isinstance(v, bool) and -INT64_MAX <= v <= INT64_MAX


@dataclass(frozen=True)
class Heads:
    """Ids of annotation records, 0 where a record did not decode (listed in problems)."""

    ids: np.ndarray  # (N,) int64
    image_ids: np.ndarray  # (N,) int64
    category_ids: np.ndarray  # (N,) int64
    decoded: np.ndarray  # (N,) bool
    problems: list[Problem]

    @classmethod
    def join(cls, parts: list[Heads]) -> Heads:
        """The heads of consecutive runs of records as one."""
        if not parts:
            return decode_heads([])
        keys = ("ids", "image_ids", "category_ids", "decoded")
        arrays = [np.concatenate([getattr(p, k) for p in parts]) for k in keys]
        return cls(*arrays, [q for p in parts for q in p.problems])


def decode_heads(raws: Sequence[msgspec.Raw], *, first: int = 0) -> Heads:
    """The ids of annotation records first, first + 1, ... of the file."""
    n = len(raws)
    ann_ids = np.zeros(n, dtype=np.int64)
    img = np.zeros(n, dtype=np.int64)
    cat = np.zeros(n, dtype=np.int64)
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
    decoded = np.ones(n, dtype=bool)
    decoded[malformed] = False
    problems = [_malformed_problem(first + i, raws[i]) for i in malformed]
    return Heads(ann_ids, img, cat, decoded, problems)


def check_heads(
    heads: Heads, images: list[Image], categories: list[Category]
) -> tuple[np.ndarray, list[Problem]]:
    """Which annotations are valid (decoded, of a valid image, of a listed category), and a
    problem for each decoded one that is not."""
    img, cat = heads.image_ids, heads.category_ids
    image_ids = np.fromiter((im.id for im in images), np.int64, len(images))
    bad_image = heads.decoded & ~np.isin(img, image_ids)
    category_ids = np.fromiter((c.id for c in categories), np.int64, len(categories))
    bad_cat = heads.decoded & ~bad_image & ~np.isin(cat, category_ids)
    problems = []
    for i in np.flatnonzero(bad_image | bad_cat):
        what = (
            f"image_id {img[i]} is not a valid image of the file"
            if bad_image[i]
            else f"category_id {cat[i]} is not in 'categories'"
        )
        problems.append(Problem(what, image_id=int(img[i]), annotation_id=int(heads.ids[i])))
    return heads.decoded & ~bad_image & ~bad_cat, problems


def _unreadable(kind: str, i: int, error: msgspec.MsgspecError) -> str:
    """Why record #i could not be read: not an object, or bytes that are not JSON (a string of
    invalid UTF-8, say); the rest of the file was read."""
    if isinstance(error, msgspec.ValidationError):
        return f"{kind} record #{i} is not an object"
    return f"{kind} record #{i} is not valid JSON: {error}"


def _malformed_problem(i: int, raw: msgspec.Raw) -> Problem:
    try:
        h = msgspec.json.decode(raw, type=_LenientAnnHead)
    except msgspec.MsgspecError as e:
        return Problem(_unreadable("annotation", i, e))
    for key in ("id", "image_id", "category_id"):
        value = getattr(h, key)
        if not _is_int(value):
            return Problem(
                f"annotation #{i}: {key} is {value!r}, expected an integer "
                f"from {-INT64_MAX} to {INT64_MAX}",
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
