"""Inference core shared by evaluate and predict: load a model, read inputs, predict labels.

Input: a model export or run directory (rayseg.checkpoint), encoded images (JPEG/PNG bytes,
decoded by rayseg.storage.decode_image) or masks Parquet parts. Output: (H, W) uint8 class-index
maps at each image's full resolution. Pure torch + numpy; the one Ray line is map_with_model,
the model-actor stage that evaluate (Scorer) and predict (Predictor) both run.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import nn

from rayseg import naming, storage
from rayseg.checkpoint import load_model
from rayseg.config import EvaluateConfig, PredictConfig
from rayseg.errors import RaysegError
from rayseg.ingest import image_counts
from rayseg.models import forward_logits, normalize
from rayseg.raydata import map_with_actors


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


def map_with_model(
    ds: Any,
    actor: type,
    *,
    checkpoint: str,
    cfg: EvaluateConfig | PredictConfig,
) -> Any:
    """ds (a ray.data.Dataset) through cfg.num_actors `actor(checkpoint, use_gpu)` replicas.

    `checkpoint` must be valid on every worker (cluster.worker_uri).
    """
    return map_with_actors(
        ds,
        actor,
        constructor_kwargs={
            "checkpoint": checkpoint,
            "use_gpu": cfg.use_gpu,
            "max_pixels": cfg.max_pixels,
        },
        batch_size=cfg.batch_size,
        num_actors=cfg.num_actors,
        use_gpu=cfg.use_gpu,
    )


def image_stem(file_name: str) -> str:
    """A file name's output stem: rayseg.naming's rule (safe characters, no leading dot, cut)."""
    return naming.base_stem(file_name)


def over_pixel_cap(width: int, height: int, cap: int | None, verb: str) -> str | None:
    """The listed problem of an image over --max-pixels (the text `rayseg masks` uses), or None."""
    if cap is None or width * height <= cap:
        return None
    return (
        f"image is {width}x{height} = {width * height} pixels, over --max-pixels {cap}; not {verb}"
    )


def encoded_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, without decoding its pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - anything unreadable is decode's to report
        return None


def objects(items: list[bytes]) -> np.ndarray:
    """A 1-D object array of bytes (np.array would make a fixed-width bytes array)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def check_parquet_images(parts: list[storage.Location], data: str) -> int:
    """Fail fast, from the footers alone, when no row carries image bytes; -> the row count."""
    counts = [image_counts(part) for part in parts]
    rows = sum(n for n, _ in counts)
    if rows == 0:
        raise RaysegError(f"{data}: the Parquet parts hold no rows")
    if sum(with_image for _, with_image in counts) == 0:
        raise RaysegError(
            f"{data}: no row carries image bytes; rerun `rayseg masks` with --images-dir "
            "to embed the images"
        )
    return rows
