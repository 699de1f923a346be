"""A tiny model fixture shared by the evaluate and predict tests."""

import torch

from rayseg.models import build_model


def tiny_model(num_classes: int) -> torch.nn.Module:
    """LR-ASPP with its class layers re-drawn large, so a random model predicts every class."""
    torch.manual_seed(0)
    model = build_model("lraspp_mobilenet_v3_large", num_classes, aux_loss=False)
    with torch.no_grad():
        for conv in (model.classifier.low_classifier, model.classifier.high_classifier):
            conv.weight.normal_(0.0, 1.0)
            conv.bias.zero_()
    return model.eval()
