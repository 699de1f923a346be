"""Which COCO categories a run keeps: `all`, `voc` or comma-separated category ids.

The one parser of a `--classes` choice (rayseg masks; rayseg.models can share it) and the PASCAL
VOC subset of COCO. Pure Python: no numpy, torch or Ray.
"""

from __future__ import annotations

from rayseg.errors import RaysegError

# COCO category ids of the 20 PASCAL VOC classes, in VOC order (torchvision's CAT_LIST without
# its leading 0): VOC index k (1..20) is VOC_CATEGORY_IDS[k - 1].
VOC_CATEGORY_IDS = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
# COCO's names for them, for files whose 'categories' lack some of the 20.
VOC_COCO_NAMES = {
    5: "airplane", 2: "bicycle", 16: "bird", 9: "boat", 44: "bottle", 6: "bus", 3: "car",
    17: "cat", 62: "chair", 21: "cow", 67: "dining table", 18: "dog", 19: "horse",
    4: "motorcycle", 1: "person", 64: "potted plant", 20: "sheep", 63: "couch", 7: "train",
    72: "tv",
}  # fmt: skip


def chosen_category_ids(classes: str, known: list[int]) -> list[int]:
    """`classes` -> category ids: all known (sorted), the 20 VOC ids (VOC order), or the ids given
    (order kept, duplicates dropped). Unknown ids are the caller's to judge."""
    text = classes.strip().lower()
    if text == "all":
        return sorted(known)
    if text == "voc":
        return list(VOC_CATEGORY_IDS)
    try:
        ids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise RaysegError(
            f"classes: {classes!r} is not 'all', 'voc' or comma-separated category ids"
        ) from None
    if not ids:
        raise RaysegError(f"classes: {classes!r} names no category ids")
    return list(dict.fromkeys(ids))


def mask_classes(classes: str, names: dict[int, str]) -> dict[int, str]:
    """The categories `rayseg masks` draws, in pixel-value order: category id -> name.

    `names` is the instances file's categories. `voc` keeps all 20 VOC ids even where the file
    lacks some, so VOC index k is always the same class (torchvision's target does the same).
    """
    wanted = chosen_category_ids(classes, list(names))
    if classes.strip().lower() == "voc":
        return {c: names.get(c, VOC_COCO_NAMES[c]) for c in wanted}
    missing = [c for c in wanted if c not in names]
    if missing:
        raise RaysegError(
            f"classes: category ids {missing} are not in the instances file's 'categories' "
            f"(known: {sorted(names)})"
        )
    return {c: names[c] for c in wanted}
