"""Storage for every stage: PNG encode/decode, Parquet parts, JSON manifests; local or s3://.

Paths are plain local paths or URIs that pyarrow.fs understands (`s3://bucket/prefix`, with
credentials and endpoint from the standard AWS_* variables). Every write is atomic: local files
go to a temporary name in the same folder and are renamed; object-store puts only become visible
when complete, so they are written in place.

Local writes never follow a link rayseg did not make. Temporaries are created with
O_CREAT | O_EXCL | O_NOFOLLOW, and the rename replaces whatever sits at the output's name, a
symbolic link included, as a directory entry: the link's target is never opened. A file written in
place (`atomic=False`) is opened with O_NOFOLLOW; a symbolic link, a hard-linked file or anything
but a regular file at its name is replaced the same way. Folders rayseg creates below an output
(make_dirs(..., below=OUT)) must not be symbolic links: one found there is refused.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import stat
import struct
import uuid
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from zlib_ng import zlib_ng

from rayseg import __version__, layout
from rayseg.errors import RaysegError
from rayseg.records import BACKGROUND

TMP_MARK = ".tmp-"
# Temporaries are `.<name>.tmp-<32 hex>`: no output name starts with "." (rayseg.naming), so no
# input can produce a name this matches.
_TEMPORARY = re.compile(r"^\..*\.tmp-[0-9a-f]{32}$")
META_KEY = b"rayseg"
# Hugging Face `datasets` reads its features from this key ({"info": {"features": {...}}}).
HF_META_KEY = b"huggingface"

# Label PNGs: unfiltered rows, deflated by zlib-ng with the RLE strategy. On 640x480 COCO masks
# that is ~0.23 ms against ~0.89 ms for OpenCV's encoder with the same settings (its bundled
# zlib), at the same size (bench/percore_bench.py); ~7 ms for level 1 with filters.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY, _INDEXED = 0, 3  # PNG colour types


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it; `uri` is what the user wrote (for messages)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri)


def is_uri(path: str) -> bool:
    return "://" in path


def locate(uri: str) -> Location:
    """Local path or object-store URI -> Location (S3 endpoint from AWS_ENDPOINT_URL)."""
    if uri.startswith("s3://"):
        bucket_path = uri[len("s3://") :].rstrip("/")
        return Location(_s3_filesystem(), bucket_path, uri)
    if is_uri(uri) and not uri.startswith("file://"):
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as e:
            raise RaysegError(f"{uri}: unsupported storage location ({e})") from None
        return Location(fs, path, uri)
    # Absolute, also in `uri`: Ray workers (Ray Train's above all) run in other directories.
    path = os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)
    return Location(pafs.LocalFileSystem(), path, path)


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def make_dirs(loc: Location, *, below: Location | None = None) -> None:
    """Create a folder and its parents. With `below` (the output folder the user named), a
    symbolic link found at any folder between it and `loc` is refused: rayseg writes nothing
    where a link it did not make points."""
    if below is not None and loc.is_local:
        top, path = below.path.rstrip("/"), loc.path
        while path.startswith(top + "/"):
            if os.path.islink(path):
                raise RaysegError(
                    f"{path}: is a symbolic link rayseg did not make; it does not write through "
                    "it (remove it or choose another --out)"
                )
            path = os.path.dirname(path)
    try:
        loc.fs.create_dir(loc.path, recursive=True)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
        raise RaysegError(f"{loc.uri}: output location is not writable ({reason})") from None


def check_writable(loc: Location) -> None:
    """Fail fast, before any work, when the output location cannot be written."""
    make_dirs(loc)
    probe = loc.join(temporary_name("write-probe"))
    try:
        with loc.fs.open_output_stream(probe.path) as f:
            f.write(b"ok")
        loc.fs.delete_file(probe.path)
    except OSError as e:
        raise RaysegError(f"{loc.uri}: output location is not writable ({e})") from None


def write_bytes(loc: Location, data: bytes, *, atomic: bool = True) -> None:
    """Write a file; `atomic=False` skips the local rename where a later commit point (a shard
    record) already makes half-written files harmless: they are rewritten by the rerun."""
    if loc.is_local and not atomic:
        _write_in_place(loc.path, data)
        return
    if loc.is_local:
        _write_renamed(loc.path, data)
        return
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(data)


# A new file of our own: never an existing name, never through a link.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# An existing name written in place: no link followed, no wait on a FIFO planted there.
_REUSE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _write_renamed(path: str, data: bytes) -> None:
    """A fresh temporary in the same folder, renamed over `path`: whatever was at `path` (a
    symbolic or hard link included) is replaced as a name, its target left untouched."""
    head, name = os.path.split(path)
    tmp = os.path.join(head, temporary_name(name))
    fd = os.open(tmp, _CREATE, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_in_place(path: str, data: bytes) -> None:
    """Overwrite a regular file of its own in place (no rename: cheaper for many small files);
    anything else at the name (a link, a FIFO, a file with other hard links) is replaced."""
    try:
        fd = os.open(path, _REUSE, 0o666)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EMLINK):
            raise
        _write_renamed(path, data)  # a symbolic link (ELOOP) or a FIFO with no reader (ENXIO)
        return
    with os.fdopen(fd, "wb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.set_blocking(f.fileno(), True)
            f.truncate(0)
            f.write(data)
            return
    _write_renamed(path, data)


OUTSIDE_IMAGES = "outside the images folder; not read"


def image_location(
    images_dir: str, file_name: str, *, follow_links: bool = False
) -> Location | None:
    """`images_dir`/`file_name`, or None when that leaves the images folder: an absolute name,
    a `..` that climbs out, or (local, unless `follow_links`) a symbolic link inside the folder
    whose target lies outside it. Decided from names and links alone: the file is not opened,
    so a refusal says nothing about what exists there. The folder itself may be a link."""
    if not file_name or file_name.startswith("/") or "\x00" in file_name:
        return None
    parts = [p for p in file_name.split("/") if p not in ("", ".")]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return None
    if not parts:
        return None
    if ".." in parts:  # inside after all: a/../b.jpg, read as b.jpg
        parts = os.path.normpath("/".join(parts)).split("/")
    root = locate(images_dir)
    loc = root.join(*parts)
    if root.is_local and not follow_links:
        top = os.path.realpath(root.path)
        real = os.path.realpath(loc.path)
        if os.path.commonpath([top, real]) != top or real == top:
            return None
    return loc


def read_bytes(loc: Location) -> bytes:
    if loc.is_local:
        with open(loc.path, "rb") as f:
            return f.read()
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def list_files(loc: Location) -> list[str]:
    """Base names of the files directly inside `loc` ([] if it does not exist)."""
    if loc.is_local:  # no stat per file: 0.1 s, not 0.5 s, for a folder of 118k masks
        try:
            with os.scandir(loc.path) as entries:
                return sorted(e.name for e in entries if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []
    info = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted(i.base_name for i in info if i.type == pafs.FileType.File)


def file_sizes(loc: Location) -> dict[str, int]:
    """Base name -> size of the files directly inside `loc`, from one listing."""
    info = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return {i.base_name: i.size for i in info if i.type == pafs.FileType.File}


def delete(loc: Location) -> None:
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass


def delete_dir(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_dir(loc.path)


def remove_stray_temporaries(loc: Location) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    stray = [name for name in list_files(loc) if is_temporary(name)]
    for name in stray:
        delete(loc.join(name))
    return len(stray)


def temporary_name(name: str) -> str:
    # A leading dot also hides it from dataset readers (pyarrow, Ray Data) until renamed.
    return f".{name}{TMP_MARK}{uuid.uuid4().hex}"


def is_temporary(name: str) -> bool:
    return _TEMPORARY.match(name) is not None


def write_json(loc: Location, obj: Any) -> None:
    write_bytes(loc, json.dumps(obj, indent=1, sort_keys=False).encode() + b"\n")


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


def encode_png(mask: np.ndarray, *, palette: np.ndarray | None = None) -> bytes:
    """(H, W) uint8/uint16 label image -> PNG bytes; with a palette an indexed-colour PNG."""
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"a label PNG needs an (H, W) uint8 or uint16 array, got {mask.dtype} {mask.shape}"
        )
    if palette is not None and mask.dtype != np.uint8:
        raise RaysegError("--palette needs 8-bit mask values; 16-bit masks cannot be indexed PNGs")
    height, width = mask.shape
    depth = 8 * mask.itemsize
    # Each row is preceded by its filter type, 0 (none); PNG samples are big-endian.
    rows = np.zeros((height, 1 + width * mask.itemsize), np.uint8)
    rows[:, 1:] = mask.astype(mask.dtype.newbyteorder(">"), copy=False).view(np.uint8)
    deflate = zlib_ng.compressobj(1, zlib_ng.DEFLATED, 15, 8, zlib_ng.Z_RLE)
    idat = deflate.compress(rows) + deflate.flush()
    colour = _GRAY if palette is None else _INDEXED
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(_png_chunk(b"PLTE", palette.astype(np.uint8).tobytes()))
    chunks += [_png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")]
    return _PNG_SIGNATURE + b"".join(chunks)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib_ng.crc32(data, zlib_ng.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) label array with the stored values (palette indices kept)."""
    # Byte 25 of a PNG is the IHDR colour type; 3 = indexed, which OpenCV would expand to BGR.
    if len(data) > 25 and data[25] == 3:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)))
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("not a decodable PNG")
    return arr


def decode_image(data: bytes | None) -> np.ndarray | None:
    """Encoded JPEG/PNG bytes -> (H, W, 3) uint8 RGB, or None when they do not decode."""
    if not data:
        return None
    # COCO coordinates refer to the stored pixel grid, so EXIF rotation is not applied
    # (it would swap height and width against the masks of rotated photos).
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def label_palette(num_values: int = 256, *, seed: int = 7) -> np.ndarray:
    """(256, 3) uint8 colours: 0 black, 255 white (ignore), the rest distinct random hues."""
    rng = np.random.default_rng(seed)
    pal = rng.integers(40, 256, size=(256, 3), dtype=np.uint8)
    pal[0] = 0
    pal[255] = 255
    return pal[:num_values]


# One id system per column: `category_ids` are COCO category ids, `value_pixels.value` mask values.
MASK_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("category_ids", pa.list_(pa.int32())),
        # int64 values: the storage type of a `datasets` ClassLabel, so its names apply as they are.
        ("value_pixels", pa.list_(pa.struct([("value", pa.int64()), ("pixels", pa.int64())]))),
        ("mask_path", pa.string()),
        ("mask", pa.binary()),
        ("image", pa.binary()),
    ]
)


def mask_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> pa.Table:
    """Rows of MASK_SCHEMA -> a table carrying the value scheme in its schema metadata."""
    metadata = {
        META_KEY: json.dumps({**meta, "rayseg_version": __version__}).encode(),
        HF_META_KEY: json.dumps({"info": {"features": hf_features(meta)}}).encode(),
    }
    return pa.Table.from_pylist(rows, schema=MASK_SCHEMA.with_metadata(metadata))


def hf_features(meta: dict[str, Any]) -> dict[str, Any]:
    """MASK_SCHEMA as `datasets.Features.to_dict()` writes it; `value_pixels.value` plain int64.

    The mask values are no ClassLabel: a ClassLabel names 0..N-1 without gaps, and the values
    have gaps (the ignore value 255 above 0..20, COCO category ids), so it took 256 names, 234
    of them `unused_N`, and `num_classes` said 256. The names are the dataset card's `classes`
    config instead (rayseg.export.hf_classes: OUT/classes/classes.parquet, one row per value).

    `image` and `mask` are Image features. `datasets` takes a schema-metadata feature only where
    its Arrow type matches the column's, and an Image is struct<bytes, path> where rayseg stores
    plain binary (what ingest / evaluate / predict read); so the Image features reach `datasets`
    through the dataset card (rayseg.export.dataset_card) or `features=`, which cast binary."""

    def value(dtype: str) -> dict[str, str]:
        return {"dtype": dtype, "_type": "Value"}

    return {
        "image_id": value("int64"),
        "file_name": value("string"),
        "height": value("int32"),
        "width": value("int32"),
        "category_ids": {"feature": value("int32"), "_type": "List"},
        "value_pixels": {
            "feature": {"value": value("int64"), "pixels": value("int64")},
            "_type": "List",
        },
        "mask_path": value("string"),
        "mask": {"_type": "Image"},
        "image": {"_type": "Image"},
    }


def write_parquet(loc: Location, table: pa.Table) -> int:
    """Write one Parquet file atomically; returns its size in bytes."""
    sink = pa.BufferOutputStream()
    # PNG / JPEG bytes are compressed already: zstd on them costs time and saves nothing.
    codecs = {
        name: "none" if table.schema.field(name).type == pa.binary() else "zstd"
        for name in table.column_names
    }
    pq.write_table(table, sink, compression=codecs, row_group_size=64)
    data = sink.getvalue().to_pybytes()
    write_bytes(loc, data)
    return len(data)


def parquet_location(data: str) -> Location:
    """A masks output dir or its parquet/ folder -> the folder holding part-*.parquet."""
    loc = locate(data)
    if any(n.endswith(".parquet") for n in list_files(loc)):
        return loc
    sub = loc.join(layout.PARQUET)
    if any(n.endswith(".parquet") for n in list_files(sub)):
        return sub
    raise RaysegError(
        f"{data}: no Parquet parts found (expected {layout.PART_GLOB} or {layout.PARQUET}/)"
    )


def parquet_files(loc: Location) -> list[Location]:
    return [loc.join(n) for n in list_files(loc) if n.endswith(".parquet") and not is_temporary(n)]


def read_mask_meta(data: str) -> dict[str, Any]:
    """The value scheme (`values`, `ignore_value`, `classes`, ...) stored with the Parquet parts."""
    parts = parquet_files(parquet_location(data))
    schema = pq.read_schema(parts[0].path, filesystem=parts[0].fs)
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise RaysegError(f"{parts[0].uri}: not written by `rayseg masks` (no rayseg metadata)")
    return json.loads(raw)


def unmapped_values(
    parts: list[Location], meta: dict[str, Any]
) -> list[tuple[int, dict[int, int]]]:
    """(image id, {value: pixels}) of each row whose mask holds values outside the masks' own
    scheme (background, ignore and its classes), from the `value_pixels` column alone."""
    known = {meta.get("background_value", BACKGROUND), meta.get("ignore_value")}
    known |= {int(c["value"]) for c in meta.get("classes", [])}
    found = []
    for part in parts:
        table = pq.read_table(part.path, columns=["image_id", "value_pixels"], filesystem=part.fs)
        for image_id, pairs in zip(
            table["image_id"].to_pylist(), table["value_pixels"].to_pylist(), strict=True
        ):
            odd = {p["value"]: p["pixels"] for p in pairs or () if p["value"] not in known}
            if odd:
                found.append((int(image_id), odd))
    return found


def check_mask_values(parts: list[Location], meta: dict[str, Any], data: str) -> None:
    """RaysegError, one line, when any row's mask holds a value outside its class map: such
    pixels would otherwise train or score as background without a word."""
    found = unmapped_values(parts, meta)
    if not found:
        return
    shown = "; ".join(
        f"image {i}: " + ", ".join(f"value {v} x {n} pixels" for v, n in sorted(odd.items())[:3])
        for i, odd in found[:3]
    )
    raise RaysegError(
        f"{data}: {len(found)} rows hold mask values outside the masks' class map ({shown}"
        f"{'; ...' if len(found) > 3 else ''}); rerun `rayseg masks` or fix those masks"
    )
