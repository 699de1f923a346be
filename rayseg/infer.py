"""Inference core shared by evaluate and predict: load a model, read inputs, predict labels.

Input: a model export or run directory (rayseg.checkpoint), encoded images (JPEG/PNG bytes,
decoded by rayseg.storage.decode_image) or masks Parquet parts. Output: (H, W) uint8 class-index
maps at each image's full resolution. Pure torch + numpy; no Ray (evaluate and predict wrap it).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from rayseg import storage
from rayseg.checkpoint import load_model
from rayseg.errors import RaysegError
from rayseg.models import forward_logits, normalize


def load_checkpoint(uri: str, *, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """load_model, with anything unexpected (a foreign pickle, a truncated file) one clear line."""
    try:
        return load_model(uri, device=device)
    except (RaysegError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a user-fixable input
        # torch.load's own messages (e.g. advice to set weights_only=False) mislead users.
        raise RaysegError(
            f"{uri}: not a rayseg model export or checkpoint ({type(e).__name__} reading it)"
        ) from None


@torch.inference_mode()
def predict_labels(
    model: nn.Module, images: list[np.ndarray], *, device: str | torch.device = "cpu"
) -> list[np.ndarray]:
    """RGB images of any sizes -> one (H, W) uint8 class-index map each, at full resolution.

    No crop or resize: the torchvision heads upsample their logits to the input size. Images
    of equal size share a forward pass and no image is padded for another, so an image's labels
    do not depend on the batch it came in (evaluate and predict agree).
    """
    labels: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape[:2], []).append(i)
    for indices in by_size.values():
        # (B, H, W, 3) uint8 travels to the device before conversion: 4x less to copy.
        x = normalize(torch.from_numpy(np.stack([images[i] for i in indices])).to(device))
        logits = forward_logits(model, x)  # (B, K, H, W)
        pred = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()  # (B, H, W)
        for j, i in enumerate(indices):
            labels[i] = pred[j]
    return labels


def image_stem(file_name: str) -> str:
    return PurePosixPath(file_name).stem


def objects(items: list[bytes]) -> np.ndarray:
    """A 1-D object array of bytes (np.array would make a fixed-width bytes array)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def check_parquet_images(parts: list[storage.Location], data: str) -> int:
    """Fail fast, from the footers alone, when no row carries image bytes; -> the row count."""
    rows = with_image = 0
    for part in parts:
        with part.fs.open_input_file(part.path) as f:
            meta = pq.ParquetFile(f).metadata
        names = meta.schema.names  # leaf columns, in the order of group.column(i)
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            rows += group.num_rows
            if "image" in names:
                stats = group.column(names.index("image")).statistics
                nulls = stats.null_count if stats is not None and stats.has_null_count else 0
                with_image += group.num_rows - nulls
    if rows == 0:
        raise RaysegError(f"{data}: the Parquet parts hold no rows")
    if with_image == 0:
        raise RaysegError(
            f"{data}: no row carries image bytes; rerun `rayseg masks` with --images-dir "
            "to embed the images"
        )
    return rows
