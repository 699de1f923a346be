"""Output file names: one unique, safe name stem per image, whatever its `file_name`.

Used for `masks/*.png`, the Parquet `mask_path` and `--layout voc`'s files and lists. The rule
(documented in docs/commands.md, "Mask file names"):
- the stem is the file name's base name without its extension (`a/b/x.jpg` -> `x`);
- characters a file name cannot safely hold (control characters, `\\ : * ? " < > |`) become `_`,
  a leading `.` becomes `_` (no mask is ever hidden, and no mask name can look like one of
  storage's temporaries, which all start with `.`), and the stem is cut to 160 bytes of UTF-8;
- a stem that is unique in the file, compared case-insensitively (macOS and Windows folders fold
  case), is used as it is: `x.png`;
- stems shared by several images (`a/x.jpg` and `b/x.jpg`, `x.jpg` and `x.png`) get the image id:
  `x-17.png`, `x-42.png`; in the rare case that name is some other image's own stem, `-2`, `-3`, ...
  follow until it is free.
The result depends only on the file's images in file order, so every run and every shard agrees.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable

# 160 bytes of stem leave room within NAME_MAX (255) for `-<id>` (<= 20) and a suffix.
STEM_BYTES = 160
NAME_MAX = 255
_UNSAFE = re.compile(r'[\x00-\x1f\x7f\\:*?"<>|]')


def base_stem(file_name: str) -> str:
    """`a/b/x.jpg` -> `x`, made safe and short (not yet unique)."""
    stem = os.path.splitext(os.path.basename(file_name.replace("\\", "/")))[0]
    stem = _UNSAFE.sub("_", stem)
    if stem.startswith(".") or not stem:
        stem = "_" + stem[1:] if stem else "_"
    return _cut_utf8(stem, STEM_BYTES)


def unique_stems(images: Iterable[tuple[int, str]]) -> list[str]:
    """One stem per (image id, file_name), in order; no two equal, even case-insensitively."""
    pairs = list(images)
    bases = [base_stem(name) for _, name in pairs]
    shared = Counter(b.casefold() for b in bases)
    stems: list[str | None] = [b if shared[b.casefold()] == 1 else None for b in bases]
    taken = {s.casefold() for s in stems if s is not None}
    for k, (image_id, _) in enumerate(pairs):
        if stems[k] is not None:
            continue
        candidate, n = f"{bases[k]}-{image_id}", 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{bases[k]}-{image_id}-{n}"
        taken.add(candidate.casefold())
        stems[k] = candidate
    return stems  # type: ignore[return-value]


def mask_name(stem: str, categories: list[int], naming: str) -> str:
    """`<stem>.png`, or with `--naming cats` `<stem>_mask_cats_<ids>.png`; the id list is cut
    (ending `_more`) where the name would pass NAME_MAX. Names stay unique: the stem is, and the
    suffix after the last `_mask_cats_` holds only digits and `_`."""
    if naming == "stem":
        return f"{stem}.png"
    head = f"{stem}_mask_cats_"
    ids = "_".join(str(c) for c in categories)
    if len((head + ids + ".png").encode()) <= NAME_MAX:
        return f"{head}{ids}.png"
    room = NAME_MAX - len(head.encode()) - len("_more.png")
    return f"{head}{ids[:room].rsplit('_', 1)[0]}_more.png"


def _cut_utf8(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore")
