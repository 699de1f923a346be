"""The masks output's layout: every name under `rayseg masks --out OUT`, built and parsed only here.

What rayseg.checkpoint is for a run directory, this module is for a masks OUT (local or s3://):
  OUT/masks/<name>.png                 one per written image (the name: rayseg.naming)
  OUT/parquet/part-NNNNN.parquet       one per shard
  OUT/_shards/plan.json                the input's digest and the settings that change the output
  OUT/_shards/shard-NNNNN.json         one per finished shard: its commit point
  OUT/manifest.json, OUT/config.yaml   counts and problems; the resolved settings
  OUT/README.md                        the Hugging Face dataset card (rayseg.export)
  OUT/classes/classes.parquet          every mask value's name, the card's `classes` config
  OUT/split/split.parquet              image id -> train/val where rayseg knows the split
  OUT/VOCdevkit/VOC2012/               with --layout voc (rayseg.export)
  OUT/_lock.json                       the lease of the run writing OUT (rayseg.lease)
  OUT/_rayseg.json                     the owner marker every command leaves (rayseg.outputs)
Relative paths (`*_rel`) are what the Parquet rows and the ownership checks hold; the others are
storage locations. Pure names and joins: no I/O, no Ray.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rayseg.storage imports this module
    from rayseg.storage import Location

MASKS = "masks"
PARQUET = "parquet"
SHARDS = "_shards"
PLAN = "plan.json"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
CARD = "README.md"
LOCK = "_lock.json"
OWNER = "_rayseg.json"
VOC = "VOCdevkit"
CLASSES = "classes"
SPLIT = "split"

PLAN_REL = f"{SHARDS}/{PLAN}"
PART_GLOB = "part-*.parquet"
CARD_DATA_FILES = f"{PARQUET}/*.parquet"  # the card's `data_files` pattern
# The folders a masks run renders into, then what it writes at the top of OUT.
RENDER_FOLDERS = (MASKS, PARQUET, SHARDS)
TOP_FILES = (MANIFEST, CARD, CONFIG)
# Parquet in folders of their own: OUT/*.parquet would make OUT look like a Parquet folder
CLASSES_REL = f"{CLASSES}/classes.parquet"
SPLIT_REL = f"{SPLIT}/split.parquet"
TOP_FOLDERS = (*RENDER_FOLDERS, CLASSES, SPLIT, VOC)

VOC_YEAR = "2012"  # torchvision's VOCSegmentation(year=...)
VOC_ROOT = f"{VOC}/VOC{VOC_YEAR}"
_VOC_IMAGES = f"{VOC_ROOT}/JPEGImages"
_VOC_MASKS = f"{VOC_ROOT}/SegmentationClass"
_VOC_LISTS = f"{VOC_ROOT}/ImageSets/Segmentation"
VOC_FOLDERS = (VOC_ROOT, _VOC_IMAGES, _VOC_MASKS, _VOC_LISTS)
VOC_CLASSES_REL = f"{VOC_ROOT}/classes.json"
VOC_MMSEG_REL = f"{VOC_ROOT}/mmseg_metainfo.py"  # mmsegmentation's metainfo as literals
VOC_SPLITS = ("train", "val", "trainval")

_PART = re.compile(r"part-([0-9]+)\.parquet")
_RECORD = re.compile(r"shard-([0-9]+)\.json")


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def record_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def part_shard(name: str) -> int | None:
    """The shard a Parquet part's file name belongs to, None for any other name."""
    found = _PART.fullmatch(name)
    return int(found.group(1)) if found else None


def record_shard(name: str) -> int | None:
    """The shard a record's file name in _shards/ belongs to, None for any other name."""
    found = _RECORD.fullmatch(name)
    return int(found.group(1)) if found else None


def mask_rel(name: str) -> str:
    """masks/<name>: a Parquet row's `mask_path`."""
    return f"{MASKS}/{name}"


def mask_file(rel: str) -> str:
    """A row's `mask_path` -> the file name in masks/ (mask_rel's inverse)."""
    return rel.removeprefix(f"{MASKS}/")


def part_rel(shard: int) -> str:
    return f"{PARQUET}/{part_name(shard)}"


def record_rel(shard: int) -> str:
    return f"{SHARDS}/{record_name(shard)}"


def voc_image_rel(stem: str) -> str:
    return f"{_VOC_IMAGES}/{stem}.jpg"


def voc_mask_rel(stem: str) -> str:
    return f"{_VOC_MASKS}/{stem}.png"


def voc_list_rel(split: str) -> str:
    return f"{_VOC_LISTS}/{split}.txt"


def plan_path(out: Location) -> Location:
    return out.join(PLAN_REL)


def record_path(out: Location, shard: int) -> Location:
    return out.join(record_rel(shard))


def part_path(out: Location, shard: int) -> Location:
    return out.join(part_rel(shard))


def mask_path(out: Location, name: str) -> Location:
    return out.join(mask_rel(name))
