"""The train / val split rule, shared by `rayseg train` (rayseg.ingest's data) and the VOC lists
of `rayseg masks --layout voc` (rayseg.export), so both split the same images the same way.

Input: image ids, the validation fraction and a seed. Output: sorted (train ids, val ids). Pure
numpy: no Ray, no I/O.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rayseg.errors import RaysegError


def split_ids(ids: np.ndarray, val_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train ids, val ids): the ceil(N * fraction) ids with the smallest hash.

    Depends only on the set of ids and the seed, not on row order or the number of Parquet parts.
    """
    ids = np.unique(np.asarray(ids, np.int64))
    if not 0.0 <= val_fraction < 1.0:
        raise RaysegError(f"val_fraction is {val_fraction}, expected 0 <= val_fraction < 1")
    n_val = int(np.ceil(len(ids) * val_fraction))
    if val_fraction > 0 and n_val >= len(ids):
        raise RaysegError(
            f"val_fraction {val_fraction} leaves no training images out of {len(ids)}; "
            "add images, lower --val-fraction or pass --val-data"
        )
    order = np.argsort([_id_hash(int(i), seed) for i in ids], kind="stable")
    val = np.sort(ids[order[:n_val]])
    train = np.setdiff1d(ids, val)
    return train, val


def _id_hash(image_id: int, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
