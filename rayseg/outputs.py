"""What in an output folder is rayseg's own: checked before a command writes, and all that
`--overwrite` removes.

An OUT is rayseg's when it is new or empty, or holds the owner marker `_rayseg.json` (written when
a run claims it) or, for `rayseg masks`, the `_shards/plan.json` of an earlier version (the names:
rayseg.layout). A non-empty OUT without either is refused unless the user says `--overwrite`; even
then a file rayseg would replace at the top of OUT (its manifest, card, config, summary) is
refused, and nothing already there is removed. `--overwrite` of a masks run deletes only the files
that run recorded: the masks and Parquet parts its shard records list, its plan, manifest, card and
config, the VOC files its lists name, and its own temporaries. Anything else is listed and kept.

An OUT that is the input file, or is or lies inside the images folder, is refused: outputs would
mix with, or replace, the inputs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rayseg import __version__, layout, storage
from rayseg.errors import RaysegError

SHOWN = 3  # names an error message lists


def check_apart(out: str, *, inputs: dict[str, str | None], images: dict[str, str | None]) -> None:
    """Refuse an OUT that is one of the `inputs` (flag -> path) or is or lies inside one of the
    `images` folders (flag -> path). Paths are compared resolved (links, `..`). An OUT that holds
    the images folder is a non-empty folder no rayseg run made: claim refuses it."""
    here = _resolved(out)
    for flag, path in inputs.items():
        if path and _resolved(path) == here:
            raise RaysegError(f"{out}: --out is the input {flag}; rayseg never replaces its input")
    for flag, path in images.items():
        if path and _within(here, _resolved(path)):
            where = "is" if here == _resolved(path) else "is inside"
            raise RaysegError(
                f"{out}: --out {where} the images folder {flag} {path}; outputs would mix with "
                "the inputs: choose a folder outside it"
            )


def _resolved(path: str) -> str:
    loc = storage.locate(path)
    return os.path.realpath(loc.path) if loc.is_local else loc.uri.rstrip("/")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def entries(loc: storage.Location) -> list[str]:
    """Names of the files and folders directly inside `loc` ([] if it does not exist)."""
    if loc.is_local:
        try:
            return sorted(os.listdir(loc.path))
        except (FileNotFoundError, NotADirectoryError):
            return []
    info = loc.fs.get_file_info(storage.pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted(i.base_name for i in info)


def claim(
    out: storage.Location,
    command: str,
    *,
    writes: tuple[str, ...],
    overwrite: bool | None,
    made_by_rayseg: bool = False,
) -> None:
    """Check that `command` may write into OUT, then mark it as rayseg's (layout.OWNER).

    `writes`: the names the command puts at the top of OUT; `overwrite`: the user's
    --overwrite (None: the command has no such flag); `made_by_rayseg`: the command's own sign
    of an earlier run (masks: a plan)."""
    present = [n for n in entries(out) if n != layout.LOCK and not storage.is_temporary(n)]
    owned = made_by_rayseg or layout.OWNER in present
    if present and not owned:
        held = listing(present)
        if not overwrite:
            beside = (
                ""
                if overwrite is None
                else ", or add --overwrite to write beside those files (rayseg removes none)"
            )
            raise RaysegError(
                f"{out.uri} is not empty and no rayseg run made it (it holds {held}); choose "
                f"a new or empty --out{beside}"
            )
        clash = [n for n in writes if n in present]
        if clash:
            raise RaysegError(
                f"{out.join(clash[0]).uri} was not written by rayseg and `rayseg {command}` "
                "would replace it; move it away or choose another --out"
            )
    if layout.OWNER not in present:
        storage.write_json(
            out.join(layout.OWNER),
            {"command": command, "rayseg_version": __version__, "writes": list(writes)},
        )


def listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def remove_masks_run(out: storage.Location) -> list[str]:
    """--overwrite of a masks OUT: delete what the earlier run recorded as its own; returns the
    paths (relative to OUT) it kept because no run recorded them."""
    own = _recorded_masks_files(out)
    kept = []
    for folder in (*layout.RENDER_FOLDERS, layout.CLASSES, layout.SPLIT, *layout.VOC_FOLDERS):
        loc = out.join(folder)
        for name in storage.list_files(loc):
            rel = f"{folder}/{name}"
            if rel in own or storage.is_temporary(name):
                storage.delete(loc.join(name))
            else:
                kept.append(rel)
    for name in layout.TOP_FILES:
        storage.delete(out.join(name))
    top = {*layout.TOP_FILES, *layout.TOP_FOLDERS, layout.OWNER, layout.LOCK}
    kept += [n for n in entries(out) if n not in top and not storage.is_temporary(n)]
    return kept


def _recorded_masks_files(out: storage.Location) -> set[str]:
    """Paths (relative to OUT) that the masks run in OUT wrote, from its plan, shard records
    and VOC lists; a part of a planned shard counts (it is written before the shard's record)."""
    own = {layout.PLAN_REL, layout.CLASSES_REL, layout.SPLIT_REL}
    plan = _read_json(layout.plan_path(out)) or {}
    num_shards = plan.get("num_shards") if isinstance(plan.get("num_shards"), int) else 0
    for name in storage.list_files(out.join(layout.PARQUET)):
        shard = layout.part_shard(name)
        if shard is not None and shard < num_shards:
            own.add(f"{layout.PARQUET}/{name}")
    for name in storage.list_files(out.join(layout.SHARDS)):
        shard = layout.record_shard(name)
        if shard is None:
            continue
        own.add(f"{layout.SHARDS}/{name}")
        record = _read_json(out.join(layout.SHARDS, name))
        if not isinstance(record, dict):
            continue
        own.add(layout.part_rel(shard))
        for entry in record.get("masks") or []:
            if isinstance(entry, list) and entry and isinstance(entry[0], str):
                own.add(layout.mask_rel(entry[0]))
    own.update({layout.VOC_CLASSES_REL, layout.VOC_MMSEG_REL})
    for split in layout.VOC_SPLITS:
        own.add(layout.voc_list_rel(split))
        for stem in _read_text(out.join(layout.voc_list_rel(split))).split():
            own.update({layout.voc_image_rel(stem), layout.voc_mask_rel(stem)})
    return own


def _read_json(loc: storage.Location) -> Any:
    try:
        return json.loads(storage.read_bytes(loc))
    except (OSError, ValueError):
        return None


def _read_text(loc: storage.Location) -> str:
    try:
        return storage.read_bytes(loc).decode(errors="replace")
    except OSError:
        return ""
