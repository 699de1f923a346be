"""Models: torchvision segmentation builders, the class mapping, and input normalisation.

MODEL_BUILDERS maps a name to a torchvision builder. ClassMap says which mask value becomes which
model class (0 = background, 255 = ignore) and back; it travels with every checkpoint and export.
Inputs: a model name and class count (plus optional local weight files), the masks' value scheme
(rayseg.storage.read_mask_meta) and a class choice, uint8 RGB images. Outputs: fresh torchvision
models, a ClassMap, normalised (B, 3, H, W) float tensors. The export and checkpoint files that
carry them are rayseg.checkpoint's. No Ray.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.models
from torch import nn
from torchvision.models import segmentation as tvseg

from rayseg import storage
from rayseg.classes import chosen_category_ids
from rayseg.errors import RaysegError
from rayseg.records import TRAIN_IGNORE

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "fcn_resnet50": tvseg.fcn_resnet50,
    "fcn_resnet101": tvseg.fcn_resnet101,
    "deeplabv3_resnet50": tvseg.deeplabv3_resnet50,
    "deeplabv3_resnet101": tvseg.deeplabv3_resnet101,
    "deeplabv3_mobilenet_v3_large": tvseg.deeplabv3_mobilenet_v3_large,
    "lraspp_mobilenet_v3_large": tvseg.lraspp_mobilenet_v3_large,
}
# LR-ASPP has no auxiliary head; its builder rejects `aux_loss`.
NO_AUX = frozenset({"lraspp_mobilenet_v3_large"})

# ImageNet statistics for RGB in [0, 1]; every torchvision backbone was trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassMap:
    """Model class i+1 <-> mask value `mask_values[i]`; class 0 is background."""

    mask_values: tuple[int, ...]
    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    ignore_value: int
    value_scheme: str

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def mask_dtype(self) -> type:
        return np.uint16 if self.ignore_value > 255 else np.uint8

    def train_lut(self) -> np.ndarray:
        """(65536,) uint8 lookup: mask value -> train id (unmapped -> 0, ignore -> 255)."""
        lut = np.zeros(65536, np.uint8)
        lut[np.asarray(self.mask_values, np.int64)] = np.arange(1, len(self.mask_values) + 1)
        lut[self.ignore_value] = TRAIN_IGNORE
        return lut

    def to_train_ids(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) mask values -> (H, W) uint8 in 0..K-1, 255 where the mask says ignore."""
        return self.train_lut()[mask.astype(np.int64, copy=False)]

    def to_mask_values(self, pred: np.ndarray) -> np.ndarray:
        """(H, W) class indices (255 = ignore) -> (H, W) values of the masks' scheme and dtype."""
        lut = np.zeros(256, np.int64)
        lut[1 : len(self.mask_values) + 1] = self.mask_values
        lut[TRAIN_IGNORE] = self.ignore_value
        return lut[pred.astype(np.int64, copy=False)].astype(self.mask_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mask_values": list(self.mask_values),
            "category_ids": list(self.category_ids),
            "names": list(self.names),
            "ignore_value": self.ignore_value,
            "value_scheme": self.value_scheme,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ClassMap:
        return ClassMap(
            mask_values=tuple(int(v) for v in d["mask_values"]),
            category_ids=tuple(int(v) for v in d["category_ids"]),
            names=tuple(str(n) for n in d["names"]),
            ignore_value=int(d["ignore_value"]),
            value_scheme=str(d["value_scheme"]),
        )


def class_map_from_meta(meta: dict[str, Any], classes: str = "all") -> ClassMap:
    """The masks' value scheme (rayseg.storage.read_mask_meta) + a class choice -> ClassMap.

    `classes`: "all" (every category of the mapping), "voc" (the 20 VOC categories present),
    or comma-separated COCO category ids, kept in the order given.
    """
    by_cat = {int(c["category_id"]): c for c in meta["classes"]}
    wanted = chosen_category_ids(classes, list(by_cat))
    missing = [c for c in wanted if c not in by_cat]
    if missing and classes.strip().lower() != "voc":
        raise RaysegError(
            f"classes: category ids {missing} are not in the masks' mapping "
            f"(known: {sorted(by_cat)})"
        )
    chosen = [by_cat[c] for c in wanted if c in by_cat]
    if not chosen:
        raise RaysegError(
            f"classes={classes!r}: none of these categories are in the masks' mapping"
        )
    if meta["values"] == "scaled" and len(chosen) != len(by_cat):
        raise RaysegError(
            "classes: masks with values=scaled can only train on all classes "
            "(rerun `rayseg masks --values category_id` to choose a subset)"
        )
    return ClassMap(
        mask_values=tuple(int(c["value"]) for c in chosen),
        category_ids=tuple(int(c["category_id"]) for c in chosen),
        names=("background", *(str(c["name"]) for c in chosen)),
        ignore_value=int(meta["ignore_value"]),
        value_scheme=str(meta["values"]),
    )


def check_model_name(name: str) -> None:
    """RaysegError unless `name` is one of MODEL_BUILDERS."""
    if name not in MODEL_BUILDERS:
        raise RaysegError(f"model {name!r} unknown; choose one of {', '.join(MODEL_BUILDERS)}")


def build_model(
    name: str,
    num_classes: int,
    *,
    aux_loss: bool,
    weights: str | None = None,
    weights_backbone: str | None = None,
) -> nn.Module:
    """A torchvision model, freshly initialised unless weights are given.

    `weights` / `weights_backbone` are files (a state dict, or a dict holding one under "model" /
    "state_dict") or torchvision weight names (weight_file), loaded where names and shapes match.
    """
    check_model_name(name)
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if name not in NO_AUX:
        kwargs["aux_loss"] = aux_loss
    model = MODEL_BUILDERS[name](**kwargs)
    if weights_backbone:
        _load_backbone(model, weight_file(weights_backbone))
    if weights:
        _load_pretrained(model, weight_file(weights))
    return model


def is_weight_name(spec: str) -> bool:
    """`ResNet50_Weights.IMAGENET1K_V1` style (torchvision's enum.member), not a path."""
    return "_Weights." in spec and "/" not in spec and not os.path.exists(spec)


def weight_file(spec: str) -> str:
    """A weights file for `spec`: a path as given, or a torchvision weight name's file.

    A name is looked up in the torch hub cache (torch.hub.get_dir()/checkpoints, as torchvision
    does) and downloaded there when missing; offline, a RaysegError names the file to place.
    """
    if not is_weight_name(spec):
        return spec
    try:
        weight = torchvision.models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise RaysegError(
            f"weights {spec!r}: not a file and not a torchvision weight name "
            "(e.g. ResNet50_Weights.IMAGENET1K_V1)"
        ) from None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weight.url))
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(weight.url, path, progress=False)
    except (OSError, urllib.error.URLError) as e:
        raise RaysegError(
            f"weights {spec}: {path} is missing and {weight.url} cannot be downloaded ({e}); "
            "download it elsewhere and place it at that path"
        ) from None
    return path


def has_aux(name: str, aux_loss: bool) -> bool:
    return aux_loss and name not in NO_AUX


_GLOBAL = re.compile(r"GLOBAL (\S+)")


def load_weights_only(data: bytes, where: str) -> Any:
    """torch.load of tensors and plain containers only: `weights_only=True` is passed explicitly,
    so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot switch it off (torch lets that variable decide only
    where a call leaves the argument out) and no object in the file is ever constructed or run.
    A file that needs more is refused in one line naming it; torch's own message (advice to
    disable the protection) is not shown."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        what = f" ({found.group(1)})" if found else ""
        raise RaysegError(
            f"{where}: refused: it holds Python objects{what} beyond tensors and plain data, "
            "and rayseg never runs code from a file it loads"
        ) from None


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = load_weights_only(storage.read_bytes(storage.locate(path)), path)
    except (OSError, RuntimeError) as e:
        raise RaysegError(f"{path}: cannot read weights ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise RaysegError(f"{path}: not a state dict of weights")
    return obj


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> list[str]:
    """Copy tensors whose names and shapes match; returns the module's keys left untouched."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise RaysegError(f"{path}: no weights match this model (names or shapes differ)")
    module.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


def _load_backbone(model: nn.Module, path: str) -> None:
    state = _read_state_dict(path)
    # A classification checkpoint names MobileNet layers "features.N..." where the
    # segmentation backbone (IntermediateLayerGetter over .features) names them "N...".
    state = {k.removeprefix("backbone.").removeprefix("features."): v for k, v in state.items()}
    left = _load_matching(model.backbone, state, path)
    if left:
        raise RaysegError(f"{path}: backbone weights lack {len(left)} tensors, e.g. {left[0]!r}")


def _load_pretrained(model: nn.Module, path: str) -> None:
    state = _read_state_dict(path)
    left = _load_matching(model, state, path)
    # The last classifier layers depend on the number of classes and may be retrained.
    outside_heads = [k for k in left if not k.startswith(("classifier.", "aux_classifier."))]
    if outside_heads:
        raise RaysegError(
            f"{path}: weights lack {len(outside_heads)} tensors, e.g. {outside_heads[0]!r} "
            "(weights of another model?)"
        )


def normalize(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) uint8 RGB -> (B, 3, H, W) or (3, H, W) float32.

    Scaled to [0, 1], then IMAGENET_MEAN / IMAGENET_STD. Runs on the tensor's device, so uint8
    batches can travel to the GPU before conversion.
    """
    x = torch.as_tensor(images)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    x = x.movedim(-1, -3).float().div_(255.0)
    return (x - mean) / std


def forward_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, K, H, W) logits (torchvision's "out")."""
    return model(images)["out"]
