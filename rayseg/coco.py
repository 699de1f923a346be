"""Stage 1: load and validate a COCO instances file (subsets are rayseg.subset's).

No pixels here. The file is parsed once with msgspec: image and annotation records are kept as
`msgspec.Raw` (zero-copy slices of the file's bytes) beside small typed heads, so a 448 MB
train2017 file parses in seconds at about its own size in memory, and later stages copy or hand
out the chosen records' original bytes. `load_coco_apart` (the masks driver's) reads the file in
blocks instead and keeps each record as a byte range of the file. Bad records become listed
`Problem`s.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Annotated, Any

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


@dataclass
class CocoIndex:
    """A parsed instances file: valid records, their raw bytes, and per-record problems."""

    path: str
    images: list[Image]
    image_raw: Sequence[msgspec.Raw | bytes]  # list of Raw views, or FileRecords
    ann_image_ids: np.ndarray  # (N,) int64
    ann_category_ids: np.ndarray  # (N,) int64
    ann_valid: np.ndarray  # (N,) bool, False where the annotation was rejected (listed)
    ann_raw: Sequence[msgspec.Raw | bytes]
    categories: list[Category]
    categories_raw: list[msgspec.Raw]
    info_raw: msgspec.Raw
    licenses_raw: msgspec.Raw
    problems: list[Problem] = field(default_factory=list)
    num_images_in_file: int = 0
    digest: str = ""  # sha1 of the file's bytes, from the one read that parsed it
    buffer: bytes = field(default=b"", repr=False)  # the bytes the Raws view; b"" with FileRecords

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
    try:
        return _load_coco(path)
    except RecursionError:
        # msgspec decodes nested values recursively: JSON nested thousands deep (no COCO record
        # is) ends in RecursionError, in bounded time and memory.
        raise RaysegError(
            f"{path}: not a COCO instances file (JSON nested too deeply to be one)"
        ) from None


def _load_coco(path: str) -> CocoIndex:
    data = _read_file(path)
    try:
        raw = msgspec.json.decode(data, type=_RawFile)
    except msgspec.ValidationError as e:
        raise RaysegError(f"{path}: not a COCO instances file ({_describe(e)})") from None
    except msgspec.DecodeError as e:
        raise RaysegError(f"{path}: invalid JSON{_position(data, str(e))}") from None
    categories = _categories(path, raw.categories)
    images, kept, problems = _images(raw.images, set())
    heads = _decode_heads(raw.annotations)
    ann_valid, ann_problems = _check_heads(heads, images, categories)
    return CocoIndex(
        path=path,
        images=images,
        image_raw=[raw.images[i] for i in kept],
        ann_image_ids=heads.image_ids,
        ann_category_ids=heads.category_ids,
        ann_valid=ann_valid,
        ann_raw=raw.annotations,
        categories=categories,
        categories_raw=raw.categories,
        info_raw=raw.info,
        licenses_raw=raw.licenses,
        problems=problems + heads.problems + ann_problems,
        num_images_in_file=len(raw.images),
        digest=hashlib.sha1(data).hexdigest(),
        buffer=data,
    )


def load_coco_apart(path: str) -> CocoIndex:
    """load_coco in a child process, for a local file: the child reads the file in blocks
    (_Scan: it holds a few blocks and the index it builds, not the file) and hands back the
    index with records as byte ranges (FileRecords), so neither process holds the file. Other
    locations load here, in memory."""
    if "://" in path or not os.path.isfile(path):
        return load_coco(path)
    # A fresh interpreter, not multiprocessing: no fork of a process that runs Ray's threads,
    # and no re-import of the caller's main module.
    code = "import sys; from rayseg.coco import _child; _child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True)
    if proc.returncode != 0:
        return load_coco(path)  # whatever went wrong there, the plain way says it properly
    result = pickle.loads(proc.stdout)
    if isinstance(result, BaseException):
        raise result
    return result


def _child(path: str) -> None:
    try:
        result: Any = _load_as_ranges(path)
    except RaysegError as e:
        result = e
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def _load_as_ranges(path: str) -> CocoIndex:
    """load_coco with records as byte ranges. A file of the usual shape is read in blocks
    (_Scan); any other is parsed whole."""
    with open(path, "rb") as f:
        try:
            return _Scan(path, f).index()
        except _Unusual:
            pass
    index = load_coco(path)
    data, stat = index.buffer, os.stat(path)
    index.ann_raw = FileRecords.locate(path, data, index.ann_raw, stat)
    index.image_raw = FileRecords.locate(path, data, index.image_raw, stat)
    index.categories_raw = [msgspec.Raw(bytes(r)) for r in index.categories_raw]
    index.info_raw = msgspec.Raw(bytes(index.info_raw))
    index.licenses_raw = msgspec.Raw(bytes(index.licenses_raw))
    index.buffer = b""
    return index


class _Digest:
    """sha1 of the bytes handed over, in order, taken in a thread beside the parse (hashlib
    lets go of the GIL); one block waits while the one before it is hashed."""

    def __init__(self) -> None:
        self.sha = hashlib.sha1()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rayseg-sha1")
        self.pending: Future[None] | None = None

    def update(self, data: memoryview) -> None:
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self.sha.update, data)

    def hexdigest(self) -> str:
        self.pool.shutdown()
        return self.sha.hexdigest()


class _Unusual(Exception):
    """A shape _Scan leaves to the whole-file parse (which also words every error)."""


_SPACE = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# After a record of an array of objects: the next record, or the array's end.
_NEXT_RECORD = re.compile(rb"[ \t\r\n]*(?:,[ \t\r\n]*\{|\])")
_ARRAY_END = re.compile(rb"\}[ \t\r\n]*\]")
_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
_RAW = msgspec.json.Decoder(msgspec.Raw)
_LISTS = ("images", "annotations", "categories")


class _Scan:
    """One forward read of a COCO file in blocks: the top-level object's keys are walked here,
    its arrays are cut into runs of whole records, each run checked and split by msgspec.

    A cut is only a guess (a "}" followed by ",{" or "]"); msgspec decoding "[" + run + "]" is
    the proof: that parses only where the lexer, after the run, stands between two records of
    the array (a cut inside a string or a nested value leaves it inside one). Anything else
    (duplicate keys, a record over ~256 MiB, an array that does not end in an object, bad JSON)
    raises _Unusual: the whole-file parse then gives the same index or the same error."""

    BLOCK = 8 << 20  # bytes read at a time, and a run's usual size
    RUN_MAX = 256 << 20  # a longer record is left to the whole parse

    def __init__(self, path: str, f: Any) -> None:
        self.path, self.f, self.stat = path, f, os.fstat(f.fileno())
        self.buf, self.at, self.base = b"", 0, 0  # buf: the file from offset base; at: cursor
        self.sha = _Digest()
        self.spans: dict[str, tuple[int, int]] = {}  # key -> its value's (start, end) offsets
        self.seen: set[int] = set()
        self.images: list[Image] = []
        self.image_problems: list[Problem] = []
        self.num_images = self.num_annotations = 0
        self.ranges: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {
            "images": ([], []),
            "annotations": ([], []),
        }
        self.heads: list[_Heads] = []
        self.categories_raw: list[msgspec.Raw] = []

    def index(self) -> CocoIndex:
        self.walk()
        self.sha.update(memoryview(self.buf)[: self.at])
        if self.base + self.at != self.stat.st_size:
            raise _Unusual  # changed under the read: the whole parse reads it again
        categories = _categories(self.path, self.categories_raw)
        heads = _Heads.join(self.heads)
        ann_valid, ann_problems = _check_heads(heads, self.images, categories)
        info, licenses = (self.raw_value(k, d) for k, d in (("info", b"{}"), ("licenses", b"[]")))
        return CocoIndex(
            path=self.path,
            images=self.images,
            image_raw=self.records("images"),
            ann_image_ids=heads.image_ids,
            ann_category_ids=heads.category_ids,
            ann_valid=ann_valid,
            ann_raw=self.records("annotations"),
            categories=categories,
            categories_raw=self.categories_raw,
            info_raw=info,
            licenses_raw=licenses,
            problems=self.image_problems + heads.problems + ann_problems,
            num_images_in_file=self.num_images,
            digest=self.sha.hexdigest(),
        )

    def walk(self) -> None:
        """The top-level object, key by key, to its end and the file's."""
        self.expect(b"{")
        keys = set()
        while True:
            match = self.match(_STRING)
            try:
                key = msgspec.json.decode(match)
            except msgspec.DecodeError:
                raise _Unusual from None
            if key in keys:
                raise _Unusual  # msgspec keeps the last: the whole parse does that
            keys.add(key)
            self.expect(b":")
            first = self.peek()
            start = self.base + self.at
            if first == b"[":
                self.array(key)
            elif key in _LISTS:
                raise _Unusual  # the whole parse says what is wrong with it
            else:
                self.value()
            self.spans[key] = (start, self.base + self.at)
            if self.peek() == b"}":
                self.at += 1
                break
            self.expect(b",")
        if self.peek() != b"" or not set(_LISTS) <= keys:
            raise _Unusual

    def array(self, key: str) -> None:
        """An array's records, run by run, handed to take(); the cursor ends after its "]"."""
        self.at += 1  # "["
        if self.peek() == b"]":
            self.at += 1
            return
        size = self.BLOCK
        while True:
            while len(self.buf) - self.at < size and self.more():
                pass
            run = self.run(size)
            if run is None:
                if len(self.buf) - self.at < size or size >= self.RUN_MAX:
                    raise _Unusual
                size *= 2  # a record longer than the run: look further
                continue
            piece, raws, end = run
            self.take(key, piece, raws, self.base + self.at - 1)
            self.at, size = end, self.BLOCK
            c = self.peek()
            self.at += 1
            if c == b"]":
                return
            if c != b",":
                raise _Unusual

    def run(self, size: int) -> tuple[bytes, list[msgspec.Raw], int] | None:
        """The longest run of whole records from the cursor within `size` bytes that a few
        guesses find: the bytes "[" + run + "]", its records, and where the run ends in buf."""
        buf, at = self.buf, self.at
        for j in _run_ends(buf, at, min(len(buf), at + size)):
            piece = b"".join((b"[", memoryview(buf)[at : j + 1], b"]"))
            try:
                return piece, _RAWS.decode(piece), j + 1
            except msgspec.DecodeError:
                continue
        return None

    def take(self, key: str, piece: bytes, raws: list[msgspec.Raw], offset: int) -> None:
        """A run of `key`'s records; `offset`: the file offset of piece[0]."""
        if key == "images":
            images, kept, problems = _images(raws, self.seen, first=self.num_images)
            self.num_images += len(raws)
            self.images += images
            self.image_problems += problems
            self.add_ranges(key, piece, raws, offset, np.asarray(kept, np.intp))
        elif key == "annotations":
            self.heads.append(_decode_heads(raws, first=self.num_annotations))
            self.num_annotations += len(raws)
            self.add_ranges(key, piece, raws, offset)
        elif key == "categories":
            self.categories_raw += [msgspec.Raw(bytes(r)) for r in raws]

    def add_ranges(
        self, key: str, piece: bytes, raws: list[msgspec.Raw], offset: int, keep: Any = slice(None)
    ) -> None:
        """The file ranges of `raws` (all of the run's records, in order), those at `keep`."""
        starts, lengths = _run_offsets(piece, raws)
        self.ranges[key][0].append(starts[keep] + offset)
        self.ranges[key][1].append(lengths[keep])

    def records(self, key: str) -> FileRecords:
        starts, lengths = self.ranges[key]
        joined = [np.concatenate(a) if a else np.empty(0, np.int64) for a in (starts, lengths)]
        return FileRecords(self.path, joined[0], joined[1], self.stat)

    def value(self) -> None:
        """A value other than an array (info is an object): the shortest prefix up to a ","
        or "}" that parses, tried at most 256 times."""
        j = self.at
        for _ in range(256):
            ends = [k for k in (self.buf.find(b",", j), self.buf.find(b"}", j)) if k >= 0]
            if not ends:
                if not self.more():
                    raise _Unusual
                j = self.at
                continue
            j = min(ends)
            try:
                _RAW.decode(memoryview(self.buf)[self.at : j])
            except msgspec.DecodeError:
                j += 1
                continue
            self.at = j
            return
        raise _Unusual

    def raw_value(self, key: str, default: bytes) -> msgspec.Raw:
        if key not in self.spans:
            return msgspec.Raw(default)
        start, end = self.spans[key]
        data = os.pread(self.f.fileno(), end - start, start).rstrip(b" \t\r\n")
        return msgspec.Raw(data)

    def more(self) -> bool:
        """Read the next block onto buf (the bytes before the cursor are hashed and let go);
        False at the file's end."""
        block = self.f.read(self.BLOCK)
        self.sha.update(memoryview(self.buf)[: self.at])
        self.buf, self.base, self.at = self.buf[self.at :] + block, self.base + self.at, 0
        return bool(block)

    def peek(self) -> bytes:
        """The next byte that is not white space (the cursor moves onto it); b"" at the end."""
        while True:
            self.at = _SPACE.match(self.buf, self.at).end()  # type: ignore[union-attr]
            if self.at < len(self.buf) or not self.more():
                return self.buf[self.at : self.at + 1]

    def expect(self, char: bytes) -> None:
        if self.peek() != char:
            raise _Unusual
        self.at += 1

    def match(self, pattern: re.Pattern[bytes]) -> bytes:
        """The pattern's match at the next non-space byte, reading on until it is whole."""
        self.peek()
        while True:
            m = pattern.match(self.buf, self.at)
            if m and m.end() < len(self.buf):
                self.at = m.end()
                return m.group()
            if not self.more():
                raise _Unusual


def _run_ends(buf: bytes, at: int, stop: int) -> Iterator[int]:
    """Guesses where a run of records from `at` may end: the last few "}" before `stop` that
    a record or the array's end follows, then the first few "}" followed by "]" (one is the
    array's own end, when it lies before `stop`)."""
    j, found = stop, 0
    for _ in range(64):
        j = buf.rfind(b"}", at, j)
        if j < 0 or found == 4:
            break
        if _NEXT_RECORD.match(buf, j + 1):
            found += 1
            yield j
    for end in itertools.islice(_ARRAY_END.finditer(buf, at, stop), 4):
        yield end.start()


def _offsets(data: bytes, raws: Sequence[msgspec.Raw]) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `raws` (in order, views of `data`) starts in `data`, and its length."""
    starts = np.empty(len(raws), np.int64)
    lengths = np.empty(len(raws), np.int64)
    find, pos = data.find, 0
    for i, raw in enumerate(raws):
        # Only "," and white space lie between records, so the first match is the record.
        pos = find(raw, pos)
        starts[i], lengths[i] = pos, len(raw)
        pos += len(raw)
    return starts, lengths


_SEPARATOR = np.zeros(256, bool)  # the bytes between two records of an array
_SEPARATOR[list(b" \t\r\n,")] = True
_GAP_MAX = 64


def _run_offsets(piece: bytes, raws: Sequence[msgspec.Raw]) -> tuple[np.ndarray, np.ndarray]:
    """_offsets for `raws` that are all the records of the array `piece`, in order: when the
    first gap's width fits every record, the offsets follow by arithmetic.

    The proof, record by record: a record starts with neither white space nor ",", so the
    separator run after one ends where the next starts; if the bytes in each predicted gap are
    all separators and the byte after it is not, every gap is as predicted."""
    n = len(raws)
    lengths = np.fromiter(map(len, raws), np.int64, n)
    if n < 2:
        return _offsets(piece, raws)
    first = piece.find(raws[0])
    gap = piece.find(raws[1], first + len(raws[0])) - first - len(raws[0])
    starts = np.empty(n, np.int64)
    starts[0] = first
    np.cumsum(lengths[:-1] + gap, out=starts[1:])
    starts[1:] += first
    data = np.frombuffer(piece, np.uint8)
    if not 0 < gap <= _GAP_MAX or starts[-1] + lengths[-1] > len(data):
        return _offsets(piece, raws)
    ends = starts[:-1] + lengths[:-1]
    fits = ~_SEPARATOR[data[starts[1:]]]
    for k in range(gap):
        fits &= _SEPARATOR[data[ends + k]]
    if not fits.all():
        return _offsets(piece, raws)
    return starts, lengths


class FileRecords(Sequence[bytes]):
    """Records of a local file as byte ranges, each read (pread) when asked for: the holder
    keeps ~16 bytes per record instead of the file. Refuses to read a file that changed."""

    GAP = 4096  # reading this much more beats another system call

    def __init__(self, path: str, starts: np.ndarray, lengths: np.ndarray, stat: Any) -> None:
        self.path, self.starts, self.lengths = path, starts, lengths
        self.stamp = (stat.st_size, stat.st_mtime_ns)
        self._fd: int | None = None

    @classmethod
    def locate(cls, path: str, data: bytes, raws: Sequence[msgspec.Raw], stat: Any) -> FileRecords:
        """Where each Raw (in file order, a view of `data`) lies in the file."""
        return cls(path, *_offsets(data, raws), stat)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        return os.pread(self._open(), int(self.lengths[i]), int(self.starts[i]))

    def read_many(self, positions: np.ndarray) -> list[bytes]:
        """The records at `positions` (ascending), one pread per stretch of records less than
        GAP bytes apart: files that keep an image's annotations together take few calls.
        read_records takes any order."""
        fd, pread, out = self._open(), os.pread, []
        if len(positions) == 0:
            return out
        starts = self.starts[positions]
        ends = starts + self.lengths[positions]
        # Stretches: a new one where the next record starts GAP or more after this one ends.
        breaks = np.flatnonzero(starts[1:] - ends[:-1] >= self.GAP) + 1
        firsts = np.concatenate(([0], breaks)).tolist()
        lasts = np.concatenate((breaks, [len(starts)])).tolist()
        starts_list, ends_list = starts.tolist(), ends.tolist()
        for i, stop in zip(firsts, lasts, strict=True):
            base = starts_list[i]
            span = pread(fd, ends_list[stop - 1] - base, base)
            if stop - i == 1:
                out.append(span)
            else:
                out.extend(
                    span[a - base : b - base]
                    for a, b in zip(starts_list[i:stop], ends_list[i:stop], strict=True)
                )
        return out

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            st = os.fstat(self._fd)
            if (st.st_size, st.st_mtime_ns) != self.stamp:
                raise RaysegError(f"{self.path}: the file changed while rayseg was using it")
        return self._fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _read_file(path: str) -> bytes:
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
    big = [c.id for c in cats if c.id > CATEGORY_ID_MAX]
    if big:
        raise RaysegError(f"{path}: category id {big[0]} is over {CATEGORY_ID_MAX} (int32)")
    return sorted(cats, key=lambda c: c.id)


def _images(
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


@dataclass
class _Heads:
    """Ids of annotation records, -1 where a record did not decode (listed in problems)."""

    ids: np.ndarray  # (N,) int64
    image_ids: np.ndarray  # (N,) int64
    category_ids: np.ndarray  # (N,) int64
    decoded: np.ndarray  # (N,) bool
    problems: list[Problem]

    @classmethod
    def join(cls, parts: list[_Heads]) -> _Heads:
        """The heads of consecutive runs of records as one."""
        if not parts:
            return _decode_heads([])
        keys = ("ids", "image_ids", "category_ids", "decoded")
        arrays = [np.concatenate([getattr(p, k) for p in parts]) for k in keys]
        return cls(*arrays, [q for p in parts for q in p.problems])


def _decode_heads(raws: Sequence[msgspec.Raw], *, first: int = 0) -> _Heads:
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
    return _Heads(ann_ids, img, cat, decoded, problems)


def _check_heads(
    heads: _Heads, images: list[Image], categories: list[Category]
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


def read_records(records: Sequence[msgspec.Raw | bytes], positions: np.ndarray) -> list[bytes]:
    """The bytes of the records at `positions` (any order), from memory or from the file."""
    if not isinstance(records, FileRecords):
        return [bytes(records[i]) for i in positions.tolist()]
    order = np.argsort(positions, kind="stable")
    result: list[bytes] = [b""] * len(positions)
    for slot, blob in zip(order.tolist(), records.read_many(positions[order]), strict=True):
        result[slot] = blob
    return result


def annotations_by_image(index: CocoIndex) -> dict[int, list[int]]:
    """image id -> positions of its valid annotations, in file order."""
    groups = AnnotationGroups.of(index)
    return {
        im.id: groups.positions(k).tolist()
        for k, im in enumerate(index.images)
        if groups.ends[k] > groups.starts[k]
    }


@dataclass(frozen=True)
class AnnotationGroups:
    """Positions of each image's valid annotations, in file order, as two flat arrays (CSR):
    image k's are order[starts[k]:ends[k]]. ~16 bytes per annotation, no per-image lists."""

    order: np.ndarray  # (A,) int64 annotation positions, grouped by image, file order within
    starts: np.ndarray  # (I,) int64, per image of index.images
    ends: np.ndarray  # (I,) int64

    @classmethod
    def of(cls, index: CocoIndex) -> AnnotationGroups:
        valid = np.flatnonzero(index.ann_valid)
        ids = index.ann_image_ids[valid]
        by_id = np.argsort(ids, kind="stable")
        order, ids = valid[by_id], ids[by_id]
        image_ids = np.fromiter((im.id for im in index.images), np.int64, len(index.images))
        starts = np.searchsorted(ids, image_ids, side="left")
        ends = np.searchsorted(ids, image_ids, side="right")
        return cls(order, starts, ends)

    def positions(self, k: int) -> np.ndarray:
        return self.order[self.starts[k] : self.ends[k]]
