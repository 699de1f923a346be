"""Stage 1: select a deterministic subset of a COCO instances file and write it.

Input: a parsed instances file (rayseg.coco.load_coco) and the selection settings (num_images,
seed, images_dir, min_annotations, categories). Output: a COCO file holding the chosen images and
their annotations, written from the original record bytes (byte-identical across runs), and
OUT.config.yaml beside it. No pixels.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import msgspec
import numpy as np

from rayseg.coco import CocoIndex, load_coco
from rayseg.config import SubsetConfig, dump_yaml
from rayseg.errors import RaysegError
from rayseg.text import plural


def select_images(
    index: CocoIndex,
    *,
    num_images: int,
    seed: int,
    available_files: set[str] | None = None,
    min_annotations: int = 0,
    categories: list[int] | None = None,
) -> tuple[list[int], dict[str, int]]:
    """Deterministic choice of image ids; returns (ids in file order, eligibility counts)."""
    valid = index.ann_valid
    counted_ids, counted = np.unique(index.ann_image_ids[valid], return_counts=True)
    ann_count = dict(zip(counted_ids.tolist(), counted.tolist(), strict=True))
    wanted = None
    if categories:
        unknown = set(categories) - {c.id for c in index.categories}
        if unknown:
            raise RaysegError(f"--categories: ids {sorted(unknown)} are not in {index.path}")
        in_cats = valid & np.isin(index.ann_category_ids, categories)
        wanted = set(index.ann_image_ids[in_cats].tolist())
    counts = {
        "images": len(index.images),
        "missing_files": 0,
        "too_few_annotations": 0,
        "without_categories": 0,
    }
    eligible = []
    for im in index.images:
        if available_files is not None and im.file_name not in available_files:
            counts["missing_files"] += 1
        elif ann_count.get(im.id, 0) < min_annotations:
            counts["too_few_annotations"] += 1
        elif wanted is not None and im.id not in wanted:
            counts["without_categories"] += 1
        else:
            eligible.append(im.id)
    counts["eligible"] = len(eligible)
    rng = np.random.default_rng(seed)
    ids = np.array(sorted(eligible), dtype=np.int64)
    chosen = set(rng.permutation(ids)[: max(0, num_images)].tolist())
    return [im.id for im in index.images if im.id in chosen], counts


def subset_chunks(index: CocoIndex, image_ids: list[int]) -> list[bytes | msgspec.Raw]:
    """The subset file as pieces: the original bytes of info, licenses, chosen images, their
    annotations, categories. Raw records are views into the input, so nothing is copied."""
    chosen = set(image_ids)
    images = [raw for im, raw in zip(index.images, index.image_raw, strict=True) if im.id in chosen]
    keep = index.ann_valid & np.isin(index.ann_image_ids, np.array(image_ids, dtype=np.int64))
    anns = [index.ann_raw[i] for i in np.flatnonzero(keep)]
    return [
        b'{"info":',
        index.info_raw,
        b',"licenses":',
        index.licenses_raw,
        b',"images":[',
        *_separated(images),
        b'],"annotations":[',
        *_separated(anns),
        b'],"categories":[',
        *_separated(index.categories_raw),
        b"]}\n",
    ]


def subset_bytes(index: CocoIndex, image_ids: list[int]) -> bytes:
    return b"".join(subset_chunks(index, image_ids))


def _separated(raws: list[msgspec.Raw]) -> list[bytes | msgspec.Raw]:
    out: list[bytes | msgspec.Raw] = [b","] * (2 * len(raws) - 1) if raws else []
    out[::2] = raws
    return out


def _write_chunks(path: str, chunks: list[bytes | msgspec.Raw]) -> None:
    """Atomically, as rayseg.storage writes (without importing it: pyarrow and OpenCV are
    heavy): a fresh temporary (O_EXCL | O_NOFOLLOW) renamed over `path`, so a link at `path` is
    replaced, never written through, and the temporary is removed if anything fails."""
    if "://" in path:
        from rayseg import storage

        storage.write_bytes(storage.locate(path), b"".join(chunks))
        return
    head, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(head, f".{name}.tmp-{uuid.uuid4().hex}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as f:
            f.writelines(chunks)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def list_image_files(images_dir: str) -> set[str]:
    if "://" not in images_dir:
        if not os.path.isdir(images_dir):
            raise RaysegError(f"{images_dir}: images folder not found")
        return set(os.listdir(images_dir))
    from rayseg import storage

    return set(storage.list_files(storage.locate(images_dir)))


def files_line(counts: dict[str, int], images_dir: str) -> str:
    """`subset: 158 of 160 images have their file in DIR; the 2 without one are left out`."""
    total, missing = counts["images"], counts["missing_files"]
    line = f"subset: {total - missing} of {plural(total, 'image')} have their file in {images_dir}"
    if total == 1 and not missing:
        line = f"subset: the 1 image has its file in {images_dir}"
    if missing:
        line += f"; the {missing} without one {'is' if missing == 1 else 'are'} left out"
    return line


def run_subset(cfg: SubsetConfig) -> dict[str, Any]:
    _check_out(cfg.out, cfg.annotations)
    index = load_coco(cfg.annotations)
    available = list_image_files(cfg.images_dir) if cfg.images_dir else None
    ids, counts = select_images(
        index,
        num_images=cfg.num_images,
        seed=cfg.seed,
        available_files=available,
        min_annotations=cfg.min_annotations,
        categories=cfg.categories,
    )
    summary = {
        "out": cfg.out,
        "images": len(ids),
        "eligible": counts["eligible"],
        "images_in_file": index.num_images_in_file,
        "annotations": int((index.ann_valid & np.isin(index.ann_image_ids, ids)).sum()),
        "missing_files": counts["missing_files"],
        "problems": len(index.problems),
    }
    # Streamed from views into the input: no second copy of the output in memory.
    _write_chunks(cfg.out, subset_chunks(index, ids))
    _write_chunks(cfg.out + ".config.yaml", [dump_yaml(cfg).encode()])
    if available is not None:
        print(files_line(counts, cfg.images_dir))
    if len(ids) < cfg.num_images:
        print(
            f"subset: only {plural(len(ids), 'image')} eligible, fewer than --num-images "
            f"{cfg.num_images}"
        )
    print(
        f"subset: wrote {summary['images']} images, {summary['annotations']} annotations "
        f"to {cfg.out}"
    )
    return summary


def _check_out(out: str, annotations: str) -> None:
    """Fail before parsing a large file when --out is the input, a folder, or not writable."""
    if "://" in out:
        return
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(annotations):
        raise RaysegError(
            f"{out}: --out is the input --annotations; rayseg never replaces its input"
        )
    if os.path.isdir(out):
        raise RaysegError(f"{out}: --out is a folder; give the path of the subset file to write")
    _check_local_parent(out)


def _check_local_parent(path: str) -> None:
    """Fail before parsing a large file when the output folder cannot be written."""
    if "://" in path:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise RaysegError(f"{path}: output location is not writable (no writable folder {parent})")
