"""The masks driver's parse: a COCO instances file loaded in a child process, records kept as
byte ranges of the file; and the annotation index the driver cuts shards by.

Input: a path. Output: a rayseg.coco.CocoIndex whose image and annotation records are
FileRecords (each read from the file when asked for), so neither the driver nor the child
holds the file: the child reads it in blocks (BlockScanner) and keeps the index it builds.

The contract: `load_coco_apart(path)` equals `rayseg.coco.load_coco(path)` (the reference) on
every file: the same images, ids, problems, digest and record bytes, or the same RaysegError.
Where it cannot keep that by its own means it falls back and says so in one line on stderr:
- a file of a shape the scanner does not prove (duplicate keys, a record over 256 MiB, an array
  that does not end in an object, bad JSON, a file that changed under the read) is parsed whole
  in the child, with load_coco's own code;
- a child that fails for any other reason (it could not start, it crashed) is replaced by
  load_coco in the driver;
- except a child killed for memory, the one case it exists to prevent: loading the file whole
  in the driver would need more still, so that is a RaysegError naming the file's size and the
  memory the child held.
A URI or anything that is not a local file is load_coco's, in this process.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

import msgspec
import numpy as np

from rayseg.coco import (
    CocoIndex,
    Heads,
    Image,
    Records,
    check_categories,
    check_heads,
    check_images,
    decode_heads,
    load_coco,
    parse_coco,
    read_coco_file,
)
from rayseg.errors import RaysegError
from rayseg.records import Problem

# A fresh interpreter, not multiprocessing: no fork of a process that runs Ray's threads, and
# no re-import of the caller's main module.
CHILD_CODE = "import sys; from rayseg.coco_apart import parse_in_child; parse_in_child(sys.argv[1])"


def load_coco_apart(path: str) -> CocoIndex:
    """load_coco in a child process, records as byte ranges of the file (see the module)."""
    if "://" in path or not os.path.isfile(path):
        return load_coco(path)
    outcome = _run_child(path)
    if outcome.killed_for_memory:
        size = os.path.getsize(path)
        raise RaysegError(
            f"{path}: the parse child ran out of memory ({outcome.failure}) holding "
            f"{outcome.peak_bytes / 2**20:.0f} MiB, on a file of {size / 2**20:.0f} MiB; "
            "parsing it whole here would need more (free memory, or use a larger machine)"
        )
    if outcome.result is None:
        print(
            f"rayseg: {path}: the parse child failed ({outcome.failure}); parsing it here",
            file=sys.stderr,
            flush=True,
        )
        return load_coco(path)
    if isinstance(outcome.result, BaseException):
        raise outcome.result
    index, whole_reason = outcome.result
    if whole_reason:
        print(f"rayseg: {path}: parsed whole ({whole_reason})", file=sys.stderr, flush=True)
    return index


@dataclass(frozen=True)
class _ChildOutcome:
    result: Any  # (index, reason it was parsed whole or ""), a RaysegError, or None (failed)
    failure: str  # why there is no result
    killed_for_memory: bool
    peak_bytes: int  # the child's peak resident memory


def _run_child(path: str) -> _ChildOutcome:
    """Run the parse child and wait for it with os.wait4, which gives its own peak memory."""
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_CODE, path], stdout=subprocess.PIPE, stderr=errors
            )
        except OSError as e:
            return _ChildOutcome(None, f"it could not start: {e}", False, 0)
        assert proc.stdout is not None
        with proc.stdout:
            data = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines()
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    if code == -signal.SIGKILL:
        return _ChildOutcome(None, "killed by SIGKILL, as the kernel's OOM killer does", True, peak)
    if code != 0:
        return _ChildOutcome(None, lines[-1] if lines else f"exit status {code}", False, peak)
    result = pickle.loads(data)
    if isinstance(result, MemoryError):
        return _ChildOutcome(None, "MemoryError", True, peak)
    return _ChildOutcome(result, "", False, peak)


def parse_in_child(path: str) -> None:
    """The child's side: the index (or the RaysegError) pickled to stdout."""
    try:
        result: Any = load_as_ranges(path)
    except (RaysegError, MemoryError) as e:
        result = e
    sys.stdout.buffer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def load_as_ranges(path: str) -> tuple[CocoIndex, str]:
    """load_coco with records as byte ranges, and why it was parsed whole ("" if it was not).
    A file of the usual shape is read in blocks (BlockScanner); any other is parsed whole."""
    with open(path, "rb") as f:
        try:
            return BlockScanner(path, f).build_index(), ""
        except NotScanned as e:
            reason = str(e)
    data = read_coco_file(path)
    index, stat = parse_coco(path, data), os.stat(path)
    index = replace(
        index,
        ann_raw=FileRecords.locate(path, data, index.ann_raw, stat),
        image_raw=FileRecords.locate(path, data, index.image_raw, stat),
        categories_raw=[msgspec.Raw(bytes(r)) for r in index.categories_raw],
        info_raw=msgspec.Raw(bytes(index.info_raw)),
        licenses_raw=msgspec.Raw(bytes(index.licenses_raw)),
    )
    return index, reason


class NotScanned(Exception):
    """A shape BlockScanner leaves to the whole-file parse (which also words every error); the
    message says which."""


_SPACE = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# After a record of an array of objects: the next record, or the array's end.
_NEXT_RECORD = re.compile(rb"[ \t\r\n]*(?:,[ \t\r\n]*\{|\])")
_ARRAY_END = re.compile(rb"\}[ \t\r\n]*\]")
_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
_RAW = msgspec.json.Decoder(msgspec.Raw)
_LISTS = ("images", "annotations", "categories")


class BlockScanner:
    """One forward read of a COCO file in blocks: the top-level object's keys are walked here,
    its arrays are cut into runs of whole records, each run checked and split by msgspec.

    A cut is only a guess (a "}" followed by ",{" or "]"); msgspec decoding "[" + run + "]" is
    the proof: that parses only where the lexer, after the run, stands between two records of
    the array (a cut inside a string or a nested value leaves it inside one). Anything else
    (duplicate keys, a record over ~256 MiB, an array that does not end in an object, bad JSON)
    raises NotScanned: the whole-file parse then gives the same index or the same error."""

    BLOCK = 8 << 20  # bytes read at a time, and a run's usual size
    RUN_MAX = 256 << 20  # a longer record is left to the whole parse
    # The digest: the file's sha1, as load_coco's. Taken inline: a thread beside the scan saves
    # at most the hash (0.25 CPU s of a 431 MiB file's ~3 s parse) and measured no gain end to
    # end (bench/parse_bench.py, issue 25).
    HASH = hashlib.sha1

    def __init__(self, path: str, f: IO[bytes]) -> None:
        self.path, self.file, self.stat = path, f, os.fstat(f.fileno())
        # The bytes held: the file from offset window_start on; cursor: the next unread byte's
        # position in window. Bytes before the cursor are let go at the next block read.
        self.window, self.window_start, self.cursor = b"", 0, 0
        self.sha1 = self.HASH()
        self.value_spans: dict[str, tuple[int, int]] = {}  # top-level key -> its value's range
        self.image_ids_seen: set[int] = set()
        self.images: list[Image] = []
        self.image_problems: list[Problem] = []
        self.num_images = self.num_annotations = 0
        # key -> (starts, lengths) of its kept records, one pair of arrays per run
        self.record_ranges: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {
            "images": ([], []),
            "annotations": ([], []),
        }
        self.annotation_heads: list[Heads] = []
        self.categories_raw: list[msgspec.Raw] = []

    def build_index(self) -> CocoIndex:
        self.walk_top_level()
        self.sha1.update(memoryview(self.window)[: self.cursor])
        if self.window_start + self.cursor != self.stat.st_size:
            raise NotScanned("the file changed while it was read")
        categories = check_categories(self.path, self.categories_raw)
        heads = Heads.join(self.annotation_heads)
        ann_valid, ann_problems = check_heads(heads, self.images, categories)
        info, licenses = (self.value_bytes(k, d) for k, d in (("info", b"{}"), ("licenses", b"[]")))
        return CocoIndex(
            path=self.path,
            images=self.images,
            image_raw=self.file_records("images"),
            ann_image_ids=heads.image_ids,
            ann_category_ids=heads.category_ids,
            ann_valid=ann_valid,
            ann_raw=self.file_records("annotations"),
            categories=categories,
            categories_raw=self.categories_raw,
            info_raw=info,
            licenses_raw=licenses,
            problems=self.image_problems + heads.problems + ann_problems,
            num_images_in_file=self.num_images,
            digest=self.sha1.hexdigest(),
        )

    def walk_top_level(self) -> None:
        """The top-level object, key by key, to its end and the file's."""
        self.consume(b"{")
        keys = set()
        while True:
            token = self.read_token(_STRING)
            try:
                key = msgspec.json.decode(token)
            except msgspec.DecodeError:
                raise NotScanned("a top-level key is not valid JSON") from None
            if key in keys:
                # msgspec keeps the last: the whole parse does that
                raise NotScanned(f"the top-level key {key!r} appears more than once")
            keys.add(key)
            self.consume(b":")
            first = self.next_byte()
            start = self.window_start + self.cursor
            if first == b"[":
                self.read_array(key)
            elif key in _LISTS:
                raise NotScanned(f"{key!r} is not a list")  # the whole parse words it
            else:
                self.skip_value()
            self.value_spans[key] = (start, self.window_start + self.cursor)
            if self.next_byte() == b"}":
                self.cursor += 1
                break
            self.consume(b",")
        if self.next_byte() != b"":
            raise NotScanned("bytes follow the top-level object")
        if not set(_LISTS) <= keys:
            raise NotScanned(f"a list of {', '.join(_LISTS)} is missing")

    def read_array(self, key: str) -> None:
        """An array's records, run by run, handed to keep_run(); the cursor ends after its "]"."""
        self.cursor += 1  # "["
        if self.next_byte() == b"]":
            self.cursor += 1
            return
        size = self.BLOCK
        while True:
            while len(self.window) - self.cursor < size and self.read_block():
                pass
            run = self.cut_run(size)
            if run is None:
                if len(self.window) - self.cursor < size or size >= self.RUN_MAX:
                    raise NotScanned(f"no run of whole records found in {key!r}")
                size *= 2  # a record longer than the run: look further
                continue
            piece, raws, end = run
            self.keep_run(key, piece, raws, self.window_start + self.cursor - 1)
            self.cursor, size = end, self.BLOCK
            c = self.next_byte()
            self.cursor += 1
            if c == b"]":
                return
            if c != b",":
                raise NotScanned(f"{key!r} is not a list of objects")

    def cut_run(self, size: int) -> tuple[bytes, list[msgspec.Raw], int] | None:
        """The longest run of whole records from the cursor within `size` bytes that a few
        guesses find: the bytes "[" + run + "]", its records, and where the run ends in the
        window."""
        window, cursor = self.window, self.cursor
        for j in _run_ends(window, cursor, min(len(window), cursor + size)):
            piece = b"".join((b"[", memoryview(window)[cursor : j + 1], b"]"))
            try:
                return piece, _RAWS.decode(piece), j + 1
            except msgspec.DecodeError:
                continue
        return None

    def keep_run(self, key: str, piece: bytes, raws: list[msgspec.Raw], offset: int) -> None:
        """A run of `key`'s records; `offset`: the file offset of piece[0]."""
        if key == "images":
            images, kept, problems = check_images(raws, self.image_ids_seen, first=self.num_images)
            self.num_images += len(raws)
            self.images += images
            self.image_problems += problems
            self.add_ranges(key, piece, raws, offset, np.asarray(kept, np.intp))
        elif key == "annotations":
            self.annotation_heads.append(decode_heads(raws, first=self.num_annotations))
            self.num_annotations += len(raws)
            self.add_ranges(key, piece, raws, offset)
        elif key == "categories":
            self.categories_raw += [msgspec.Raw(bytes(r)) for r in raws]

    def add_ranges(
        self, key: str, piece: bytes, raws: list[msgspec.Raw], offset: int, keep: Any = slice(None)
    ) -> None:
        """The file ranges of `raws` (all of the run's records, in order), those at `keep`."""
        starts, lengths = run_offsets(piece, raws)
        self.record_ranges[key][0].append(starts[keep] + offset)
        self.record_ranges[key][1].append(lengths[keep])

    def file_records(self, key: str) -> FileRecords:
        starts, lengths = self.record_ranges[key]
        joined = [np.concatenate(a) if a else np.empty(0, np.int64) for a in (starts, lengths)]
        return FileRecords(self.path, joined[0], joined[1], self.stat)

    def skip_value(self) -> None:
        """A value other than an array (info is an object): the shortest prefix up to a ","
        or "}" that parses, tried at most 256 times."""
        j = self.cursor
        for _ in range(256):
            ends = [k for k in (self.window.find(b",", j), self.window.find(b"}", j)) if k >= 0]
            if not ends:
                if not self.read_block():
                    raise NotScanned("a top-level value does not end")
                j = self.cursor
                continue
            j = min(ends)
            try:
                _RAW.decode(memoryview(self.window)[self.cursor : j])
            except msgspec.DecodeError:
                j += 1
                continue
            self.cursor = j
            return
        raise NotScanned("a top-level value is too intricate to skip")

    def value_bytes(self, key: str, default: bytes) -> msgspec.Raw:
        """A top-level key's value, read again from the file by its range."""
        if key not in self.value_spans:
            return msgspec.Raw(default)
        start, end = self.value_spans[key]
        data = os.pread(self.file.fileno(), end - start, start).rstrip(b" \t\r\n")
        return msgspec.Raw(data)

    def read_block(self) -> bool:
        """Read the next block onto the window (the bytes before the cursor are hashed and let
        go); False at the file's end."""
        block = self.file.read(self.BLOCK)
        self.sha1.update(memoryview(self.window)[: self.cursor])
        self.window = self.window[self.cursor :] + block
        self.window_start, self.cursor = self.window_start + self.cursor, 0
        return bool(block)

    def next_byte(self) -> bytes:
        """The next byte that is not white space (the cursor moves onto it); b"" at the end."""
        while True:
            self.cursor = _SPACE.match(self.window, self.cursor).end()  # type: ignore[union-attr]
            if self.cursor < len(self.window) or not self.read_block():
                return self.window[self.cursor : self.cursor + 1]

    def consume(self, char: bytes) -> None:
        found = self.next_byte()
        if found != char:
            raise NotScanned(f"{found!r} where {char!r} was expected")
        self.cursor += 1

    def read_token(self, pattern: re.Pattern[bytes]) -> bytes:
        """The pattern's match at the next non-space byte, reading on until it is whole."""
        self.next_byte()
        while True:
            m = pattern.match(self.window, self.cursor)
            if m and m.end() < len(self.window):
                self.cursor = m.end()
                return m.group()
            if not self.read_block():
                raise NotScanned("a top-level key does not end")


def _run_ends(window: bytes, cursor: int, stop: int) -> Iterator[int]:
    """Guesses where a run of records from `cursor` may end: the last few "}" before `stop` that
    a record or the array's end follows, then the first few "}" followed by "]" (one is the
    array's own end, when it lies before `stop`)."""
    j, found = stop, 0
    for _ in range(64):
        j = window.rfind(b"}", cursor, j)
        if j < 0 or found == 4:
            break
        if _NEXT_RECORD.match(window, j + 1):
            found += 1
            yield j
    for end in itertools.islice(_ARRAY_END.finditer(window, cursor, stop), 4):
        yield end.start()


def search_offsets(data: bytes, raws: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `raws` (in order, views of `data`) starts in `data`, and its length."""
    starts, lengths = [], []
    find, pos = data.find, 0
    for raw in raws:
        # Only "," and white space lie between records, so the first match is the record.
        pos = find(raw, pos)
        starts.append(pos)
        lengths.append(len(raw))
        pos += len(raw)
    return np.array(starts, np.int64), np.array(lengths, np.int64)


_SEPARATOR = np.zeros(256, bool)  # the bytes between two records of an array
_SEPARATOR[list(b" \t\r\n,")] = True
_GAP_MAX = 64


def run_offsets(piece: bytes, raws: Sequence[msgspec.Raw]) -> tuple[np.ndarray, np.ndarray]:
    """search_offsets for `raws` that are all the records of the array `piece`, in order: when
    the first gap's width fits every record, the offsets follow by arithmetic.

    The proof, record by record: a record starts with neither white space nor ",", so the
    separator run after one ends where the next starts; if the bytes in each predicted gap are
    all separators and the byte after it is not, every gap is as predicted."""
    n = len(raws)
    lengths = np.fromiter(map(len, raws), np.int64, n)
    if n < 2:
        return search_offsets(piece, raws)
    first = piece.find(raws[0])
    gap = piece.find(raws[1], first + len(raws[0])) - first - len(raws[0])
    starts = np.empty(n, np.int64)
    starts[0] = first
    np.cumsum(lengths[:-1] + gap, out=starts[1:])
    starts[1:] += first
    data = np.frombuffer(piece, np.uint8)
    if not 0 < gap <= _GAP_MAX or starts[-1] + lengths[-1] > len(data):
        return search_offsets(piece, raws)
    ends = starts[:-1] + lengths[:-1]
    fits = ~_SEPARATOR[data[starts[1:]]]
    for k in range(gap):
        fits &= _SEPARATOR[data[ends + k]]
    if not fits.all():
        return search_offsets(piece, raws)
    return starts, lengths


class FileRecords:
    """Records of a local file as byte ranges, each read (pread) when asked for: the holder
    keeps ~16 bytes per record instead of the file. Refuses to read a file that changed.
    A rayseg.coco.Records."""

    GAP = 4096  # reading this much more beats another system call

    def __init__(self, path: str, starts: np.ndarray, lengths: np.ndarray, stat: Any) -> None:
        self.path, self.starts, self.lengths = path, starts, lengths
        self.stamp = (stat.st_size, stat.st_mtime_ns)
        self._fd: int | None = None

    @classmethod
    def locate(cls, path: str, data: bytes, records: Records, stat: Any) -> FileRecords:
        """Where each of `records` (in file order, views of the file's bytes `data`) lies."""
        return cls(path, *search_offsets(data, records), stat)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> bytes:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return os.pread(self._open(), int(self.lengths[i]), int(self.starts[i]))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.read(np.arange(len(self))))

    def read(self, positions: np.ndarray) -> list[bytes]:
        """The records at `positions` (any order), read in file order."""
        order = np.argsort(positions, kind="stable")
        result: list[bytes] = [b""] * len(positions)
        for slot, blob in zip(order.tolist(), self.read_many(positions[order]), strict=True):
            result[slot] = blob
        return result

    def read_many(self, positions: np.ndarray) -> list[bytes]:
        """The records at `positions` (ascending), one pread per stretch of records less than
        GAP bytes apart: files that keep an image's annotations together take few calls."""
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
