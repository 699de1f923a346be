"""A tiny model and its class map, shared by the inference tests."""

import torch

from rayseg.checkpoint import save_model
from rayseg.models import ClassMap, build_model

# Model class 1 is mask value 1 (person), class 2 is mask value 3 (car).
PERSON_CAR = ClassMap(
    mask_values=(1, 3),
    category_ids=(1, 3),
    names=("background", "person", "car"),
    ignore_value=255,
    value_scheme="category_id",
)


def tiny_model(num_classes: int) -> torch.nn.Module:
    """LR-ASPP with its class layers re-drawn large, so a random model predicts every class."""
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", num_classes, aux_loss=False)
    with torch.no_grad():
        for conv in (model.classifier.low_classifier, model.classifier.high_classifier):
            conv.weight.normal_(0.0, 1.0)
            conv.bias.zero_()
    return model.eval()


def save_tiny_model(path: str, class_map: ClassMap = PERSON_CAR, *, num_classes: int | None = None):
    """tiny_model exported to `path` (rayseg.checkpoint's format) with `class_map`."""
    model = tiny_model(num_classes or class_map.num_classes)
    save_model(path, model, name="lraspp_mobilenet_v3_large", class_map=class_map, aux_loss=False)
    return path
