"""Checks that a finished shard's outputs are still whole, before a rerun trusts them.

Input: an output folder of `rayseg masks` and the shards whose records exist. The cheap check
(every rerun) uses one listing per folder: the record reads, its Parquet part and every mask it
lists exist with the sizes it recorded. The deep check (`--verify`) also reads each part and
mask: the rows are the record's images, each mask decodes to its recorded size and equals the
file. A shard that fails either is rendered again; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow.parquet as pq

from rayseg import layout, storage

_RECORD_KEYS = ("written", "failed", "problems", "class_pixels")


def check_shards(
    out: storage.Location, shards: Iterable[int], *, deep: bool
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """(records of the shards that hold up, shard -> why each other one must be redone)."""
    mask_sizes = storage.file_sizes(out.join(layout.MASKS))
    part_sizes = storage.file_sizes(out.join(layout.PARQUET))
    good, damaged = {}, {}
    for k in sorted(shards):
        name = layout.record_rel(k)
        try:
            record = storage.read_json(out.join(name))
            reason = _record_problem(record, k)
        except (OSError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
        if reason:
            damaged[k] = f"its record {name} is unreadable ({reason})"
            continue
        reason = _files_problem(record, k, mask_sizes, part_sizes)
        if reason is None and deep:
            reason = _content_problem(out, record, k)
        if reason:
            damaged[k] = reason
        else:
            good[k] = record
    return good, damaged


def _record_problem(record: Any, shard: int) -> str | None:
    if not isinstance(record, dict) or record.get("shard") != shard:
        return f"not the record of shard {shard}"
    missing = [key for key in _RECORD_KEYS if key not in record]
    return f"no {', '.join(missing)}" if missing else None


def _files_problem(
    record: dict[str, Any], shard: int, mask_sizes: dict[str, int], part_sizes: dict[str, int]
) -> str | None:
    part = layout.part_rel(shard)
    size = part_sizes.get(layout.part_name(shard))
    if size is None:
        return f"{part} is missing"
    if "part_bytes" in record and size != record["part_bytes"]:
        return f"{part} is {size} bytes, {record['part_bytes']} were written"
    # Records of older rayseg versions list no mask files; their parts are still checked.
    for name, wanted in record.get("masks", []):
        have = mask_sizes.get(name)
        if have is None:
            return f"{layout.mask_rel(name)} is missing"
        if have != wanted:
            return f"{layout.mask_rel(name)} is {have} bytes, {wanted} were written"
    return None


def _content_problem(out: storage.Location, record: dict[str, Any], shard: int) -> str | None:
    part = layout.part_rel(shard)
    loc = out.join(part)
    try:
        table = pq.read_table(loc.path, filesystem=loc.fs)
    except Exception as e:  # noqa: BLE001 - any unreadable part means: render it again
        return f"{part} does not read ({type(e).__name__}: {e})"
    rows = table.select(["image_id", "height", "width", "mask_path", "mask"]).to_pylist()
    if [r["image_id"] for r in rows] != record["written"]:
        return f"{part} does not hold the shard's {len(record['written'])} images"
    for r in rows:
        try:
            shape = storage.decode_png(r["mask"]).shape[:2]
            same = storage.read_bytes(out.join(r["mask_path"])) == r["mask"]
        except (OSError, ValueError) as e:
            return f"{r['mask_path']} does not read ({e})"
        if shape != (r["height"], r["width"]):
            return (
                f"image {r['image_id']}'s mask is {shape[1]}x{shape[0]}, "
                f"not {r['width']}x{r['height']}"
            )
        if not same:
            return f"{r['mask_path']} differs from the mask in {part}"
    return None
