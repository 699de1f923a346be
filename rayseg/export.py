"""Outputs other tools load as they are: a PASCAL VOC folder, a Hugging Face dataset card.

`rayseg masks --layout voc` writes a folder torchvision and mmseg load without conversion; every
run writes OUT/README.md, the dataset card `datasets.load_dataset(OUT)` reads.

Input: each rendered image's bytes and mask (from rayseg.shard), then the finished image ids and
the value scheme (from rayseg.masks). Output under OUT/VOCdevkit/VOC2012/:
  JPEGImages/<stem>.jpg          the image (non-JPEG sources are re-encoded: VOC readers want .jpg)
  SegmentationClass/<stem>.png   the mask as an indexed PNG with the VOC colour map
  ImageSets/Segmentation/{train,val,trainval}.txt   stems, split as `rayseg train` splits
  classes.json                   [{value, name, category_id, color}], background and ignore too
  mmseg_metainfo.py              the same classes as mmsegmentation's `metainfo` and
                                 `num_classes`, literals only: a `_base_` file mmengine reads
                                 under its default (lazy-import) parsing
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import yaml

from rayseg import layout, storage
from rayseg.split import split_ids

# VOC's colour for the ignore value 255 (object borders in the original masks).
IGNORE_COLOR = (224, 224, 192)


def voc_palette() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC colour map (bits of the index spread over R, G, B)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        pal[i] = (r, g, b)
    pal[255] = IGNORE_COLOR
    return pal


def prepare_voc(out: storage.Location) -> None:
    for folder in layout.VOC_FOLDERS[1:]:  # below VOC_ROOT, which make_dirs makes
        storage.make_dirs(out.join(folder), below=out)
        storage.remove_stray_temporaries(out.join(folder))


def write_voc_pair(out: storage.Location, stem: str, image: bytes, mask: np.ndarray) -> None:
    """One image and its (H, W) uint8 mask under their shared stem."""
    if image[:3] != b"\xff\xd8\xff":  # not a JPEG
        rgb = storage.decode_image(image)
        _, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
        )
        image = buf.tobytes()
    storage.write_bytes(out.join(layout.voc_image_rel(stem)), image)
    png = storage.encode_png(mask, palette=voc_palette())
    storage.write_bytes(out.join(layout.voc_mask_rel(stem)), png)


def write_voc_lists(
    out: storage.Location,
    stems: dict[int, str],
    meta: dict[str, Any],
    *,
    val_fraction: float,
    seed: int,
) -> dict[str, int]:
    """The split files (rayseg.split.split_ids over `stems`' image ids) and classes.json."""
    train, val = split_ids(np.asarray(sorted(stems), np.int64), val_fraction, seed=seed)
    lists = {"train": train, "val": val, "trainval": np.union1d(train, val)}
    for name, ids in lists.items():
        text = "".join(f"{stems[int(i)]}\n" for i in ids)
        storage.write_bytes(out.join(layout.voc_list_rel(name)), text.encode())
    write_hf_split(out, {"train": train, "val": val})
    classes = voc_classes(meta)
    storage.write_json(out.join(layout.VOC_CLASSES_REL), classes)
    storage.write_bytes(out.join(layout.VOC_MMSEG_REL), mmseg_metainfo(classes).encode())
    return {name: len(ids) for name, ids in lists.items()}


def mmseg_metainfo(classes: list[dict[str, Any]]) -> str:
    """mmseg_metainfo.py: `metainfo` and `num_classes` as Python literals.

    A config that reads classes.json needs `import json`, and mmengine's default parsing turns
    any import into a lazy one, under which `json.load(...)` fails with a bare RuntimeError. A
    `_base_` file of literals needs no import: `metainfo={{_base_.metainfo}}`.
    """
    kept = [c for c in classes if c["name"] != "ignore"]  # 255 is mmseg's ignore_index too
    names = tuple(str(c["name"]) for c in kept)
    palette = [list(c["color"]) for c in kept]
    return (
        "# mmsegmentation metainfo of this folder, written by `rayseg masks --layout voc`.\n"
        "# Literals only: use it as a _base_ file (README: mmsegmentation). Mask values are\n"
        "# class indices; 255 is ignored (mmseg's default ignore_index), not a class.\n"
        f"metainfo = {{'classes': {names!r}, 'palette': {palette!r}}}\n"
        f"num_classes = {len(names)}\n"
    )


def voc_classes(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mask value with its name and palette colour (rayseg.shard.scheme_meta's classes)."""
    pal = voc_palette()
    entries = [{"value": meta["background_value"], "name": "background", "category_id": None}]
    entries += sorted((dict(c) for c in meta["classes"]), key=lambda c: c["value"])
    entries.append({"value": meta["ignore_value"], "name": "ignore", "category_id": None})
    for e in entries:
        e["color"] = [int(x) for x in pal[e["value"]]]
    return entries


# Parquet: `datasets` picks one builder for all configs (the files: rayseg.layout).
CLASS_FEATURES = {"value": "int64", "name": "string", "category_id": "int64"}


def hf_classes(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """OUT/classes/classes.parquet's rows, one per mask value: {value, name, category_id} (None for
    background and ignore), ignore last. `load_dataset(OUT, "classes")` reads them."""
    rows = [{"value": meta["background_value"], "name": "background", "category_id": None}]
    rows += [
        {"value": int(c["value"]), "name": str(c["name"]), "category_id": int(c["category_id"])}
        for c in sorted(meta["classes"], key=lambda c: c["value"])
    ]
    rows.append({"value": meta["ignore_value"], "name": "ignore", "category_id": None})
    return rows


def write_hf_classes(out: storage.Location, meta: dict[str, Any]) -> None:
    """OUT/classes/classes.parquet: hf_classes' rows, for the card's `classes` config."""
    types = {"int64": pa.int64(), "string": pa.string()}
    schema = pa.schema([(k, types[v]) for k, v in CLASS_FEATURES.items()])
    storage.make_dirs(out.join(layout.CLASSES), below=out)
    table = pa.Table.from_pylist(hf_classes(meta), schema=schema)
    storage.write_parquet(out.join(layout.CLASSES_REL), table)


def write_hf_split(out: storage.Location, splits: dict[str, np.ndarray]) -> None:
    """OUT/split/split.parquet: {image_id, split} per image, for the card's `split` config."""
    ids = [int(i) for name in splits for i in splits[name]]
    names = [name for name in splits for _ in splits[name]]
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "split": pa.array(names, pa.string())})
    storage.make_dirs(out.join(layout.SPLIT), below=out)
    storage.write_parquet(out.join(layout.SPLIT_REL), table)


def dataset_card(meta: dict[str, Any], *, split: dict[str, Any] | None = None) -> str:
    """OUT/README.md for Hugging Face `datasets`: two configs.

    `default`: the Parquet parts and their features (storage.hf_features in the card's YAML
    form), so `load_dataset(OUT)` decodes `image` and `mask` as Image features; every image is
    in its one split, `train`. `classes`: classes/classes.parquet, the name of every mask value.
    `split` ({"train", "val", "where"}: counts and the files listing them), when rayseg made
    one (--layout voc, or `rayseg pipeline`'s training), adds a `split` config
    (OUT/split/split.parquet: image_id, split) and a line of text: `datasets` splits only by
    file, so the default config keeps every image in `train`.
    """
    features = storage.hf_features(meta)
    card = {
        "configs": [
            {
                "config_name": "default",
                "default": True,
                "data_files": [{"split": "train", "path": layout.CARD_DATA_FILES}],
            },
            {
                "config_name": "classes",
                "data_files": [{"split": "train", "path": layout.CLASSES_REL}],
            },
        ],
        "dataset_info": [
            {
                "config_name": "default",
                "features": [_card_feature(k, v) for k, v in features.items()],
            },
            {
                "config_name": "classes",
                "features": [{"name": k, "dtype": v} for k, v in CLASS_FEATURES.items()],
            },
        ],
    }
    num_classes = len(meta["classes"]) + 1
    body = [
        "Semantic masks written by `rayseg masks`: one row per image (`image`, `mask` PNG, "
        "`category_ids` as COCO category ids, `value_pixels` as mask values).",
        "",
        f"Classes: {num_classes} (background and {len(meta['classes'])} categories); mask value "
        f"{meta['ignore_value']} is ignore, not a class. The name of each mask value: "
        f'`load_dataset(OUT, "classes", split="train")` (value, name, category_id).',
        "",
    ]
    if split:
        files = [{"split": "train", "path": layout.SPLIT_REL}]
        card["configs"].append({"config_name": "split", "data_files": files})
        card["dataset_info"].append(
            {
                "config_name": "split",
                "features": [
                    {"name": "image_id", "dtype": "int64"},
                    {"name": "split", "dtype": "string"},
                ],
            }
        )
        body += [
            f"Split: {split['train']} train and {split['val']} val images (the split `rayseg "
            "train` makes with the same --val-fraction and --seed), listed in "
            f"{split['where']} and by image id in the `split` config: "
            '`load_dataset(OUT, "split", split="train")` (image_id, split). The `train` split '
            "of `load_dataset(OUT)` holds every image (`datasets` splits only by file).",
            "",
        ]
    else:
        body += ["Split: none; the `train` split holds every image.", ""]
    return f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n" + "\n".join(body)


def _card_feature(name: str, feature: dict[str, Any]) -> dict[str, Any]:
    """One `Features.to_dict()` entry in the YAML form dataset cards use."""
    kind = feature["_type"]
    if kind == "Value":
        return {"name": name, "dtype": feature["dtype"]}
    if kind == "Image":
        return {"name": name, "dtype": "image"}
    if kind == "ClassLabel":
        names = {str(i): n for i, n in enumerate(feature["names"])}
        return {"name": name, "dtype": {"class_label": {"names": names}}}
    if kind == "List":
        inner = feature["feature"]
        if "_type" in inner:  # a list of plain values
            return {"name": name, "list": inner["dtype"]}
        return {"name": name, "list": [_card_feature(k, v) for k, v in inner.items()]}
    raise ValueError(f"no dataset-card form for feature type {kind!r}")
