"""rayseg.models: builders, class mapping, export round trip, weight files (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mask_data import category_meta

from rayseg import checkpoint, models
from rayseg.errors import RaysegError

META = category_meta({1: "person", 3: "car", 18: "dog"})


@pytest.mark.parametrize("name", list(models.MODEL_BUILDERS))
def test_every_listed_model_builds_and_predicts_each_pixel(name):
    torch.manual_seed(0)
    model = models.build_model(name, 2, aux_loss=True).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 48))
    assert out["out"].shape == (1, 2, 32, 48)
    # The aux head exists exactly where has_aux says (LR-ASPP has none).
    assert ("aux" in out) == models.has_aux(name, True)
    if "aux" in out:
        assert out["aux"].shape == (1, 2, 32, 48)


def test_unknown_model_name_is_refused_with_the_choices():
    with pytest.raises(RaysegError, match="model 'unet' unknown; choose one of fcn_resnet50, "):
        models.build_model("unet", 2, aux_loss=False)
    with pytest.raises(RaysegError, match="lraspp_mobilenet_v3_large"):
        models.check_model_name("fcn_resnet18")
    models.check_model_name("fcn_resnet50")


def test_class_map_all_voc_and_ids():
    all_ = models.class_map_from_meta(META)
    assert all_.names == ("background", "person", "car", "dog") and all_.num_classes == 4
    voc = models.class_map_from_meta(META, "voc")
    # VOC order (torchvision's CAT_LIST): car (3), dog (18), person (1); absent VOC classes dropped
    assert voc.category_ids == (3, 18, 1)
    chosen = models.class_map_from_meta(META, "18, 1")
    assert chosen.category_ids == (18, 1) and chosen.names == ("background", "dog", "person")


@pytest.mark.parametrize(
    ("classes", "match"), [("2", "not in the masks' mapping"), ("cats", "not 'all', 'voc'")]
)
def test_class_map_rejects_bad_choice(classes, match):
    with pytest.raises(RaysegError, match=match):
        models.class_map_from_meta(META, classes)


def test_to_train_ids_and_back():
    cm = models.class_map_from_meta(META, "18,3")
    mask = np.array([[0, 1, 3, 18, 255, 7]], np.uint8)
    ids = cm.to_train_ids(mask)
    # person (1) and unknown 7 are not chosen: background; ignore stays 255
    assert ids.tolist() == [[0, 0, 2, 1, 255, 0]] and ids.dtype == np.uint8
    assert cm.to_mask_values(ids).tolist() == [[0, 0, 3, 18, 255, 0]]


def test_sixteen_bit_masks():
    meta = {
        **META,
        "dtype": "uint16",
        "ignore_value": 65535,
        "classes": [{"value": 300, "category_id": 300, "name": "x"}],
    }
    cm = models.class_map_from_meta(meta)
    mask = np.array([[0, 300, 65535]], np.uint16)
    assert cm.to_train_ids(mask).tolist() == [[0, 1, 255]]
    back = cm.to_mask_values(cm.to_train_ids(mask))
    assert back.dtype == np.uint16 and back.tolist() == [[0, 300, 65535]]


def test_class_map_dict_round_trip():
    cm = models.class_map_from_meta(META, "voc")
    assert models.ClassMap.from_dict(cm.to_dict()) == cm


def test_normalize_matches_imagenet_stats():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255
    x = models.normalize(image)
    assert x.shape == (3, 2, 3)
    assert x[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)
    assert x[1, 0, 0].item() == pytest.approx(-0.456 / 0.224)
    assert models.normalize(np.stack([image, image])).shape == (2, 3, 2, 3)


def test_export_round_trip(tmp_path):
    cm = models.class_map_from_meta(META)
    model = models.build_model("lraspp_mobilenet_v3_large", cm.num_classes, aux_loss=True).eval()
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    checkpoint.save_model(
        str(path), model, name="lraspp_mobilenet_v3_large", class_map=cm, aux_loss=True
    )
    x = torch.randn(1, 3, 48, 64)
    for uri in (str(path), str(path.parent)):
        loaded, info = checkpoint.load_model(uri)
        assert info["model"] == "lraspp_mobilenet_v3_large" and info["class_map"] == cm
        assert not loaded.training
        with torch.no_grad():
            out = models.forward_logits(loaded, x)
            assert out.shape == (1, 4, 48, 64)
            assert torch.allclose(out, models.forward_logits(model, x))


def test_load_model_errors(tmp_path):
    with pytest.raises(RaysegError, match="no such model"):
        checkpoint.load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaysegError, match="no checkpoints"):
        checkpoint.load_model(str(tmp_path / "empty"))
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    with pytest.raises(RaysegError, match="not a rayseg model"):
        checkpoint.load_model(str(junk))


def test_aux_head_where_the_model_has_one():
    with_aux = models.build_model("deeplabv3_mobilenet_v3_large", 3, aux_loss=True)
    assert with_aux.aux_classifier is not None
    lraspp = models.build_model("lraspp_mobilenet_v3_large", 3, aux_loss=True)
    assert not hasattr(lraspp, "aux_classifier")


def test_pretrained_file_loads_except_class_heads(tmp_path):
    source = models.build_model("lraspp_mobilenet_v3_large", 21, aux_loss=False)
    path = tmp_path / "pretrained.pth"
    torch.save({"model": source.state_dict()}, path)  # torchvision reference checkpoint shape
    model = models.build_model("lraspp_mobilenet_v3_large", 4, aux_loss=False, weights=str(path))
    key = "backbone.0.0.weight"
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])
    assert model.classifier.low_classifier.out_channels == 4


def test_backbone_file_from_a_classification_checkpoint(tmp_path):
    from torchvision.models import mobilenet_v3_large

    classifier = mobilenet_v3_large(weights=None, dilated=True)
    path = tmp_path / "backbone.pth"
    torch.save(classifier.state_dict(), path)  # keys "features.N...", plus "classifier..."
    model = models.build_model(
        "lraspp_mobilenet_v3_large", 4, aux_loss=False, weights_backbone=str(path)
    )
    assert torch.equal(model.backbone["0"][0].weight, classifier.features[0][0].weight)


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(
        models.build_model("lraspp_mobilenet_v3_large", 4, aux_loss=False).state_dict(), path
    )
    with pytest.raises(RaysegError, match="no weights match|lack"):
        models.build_model("fcn_resnet50", 4, aux_loss=False, weights=str(path))


# ---- weights by torchvision name, from a pre-seeded torch hub cache (no network) -------------

FULL = "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"
BACKBONE = "MobileNet_V3_Large_Weights.IMAGENET1K_V1"


def seed_cache(torch_home, name: str, module: torch.nn.Module):
    """Save `module`'s weights where torchvision keeps `name`'s file; returns the path."""
    import os

    import torchvision

    url = torchvision.models.get_weight(name).url
    path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path


def test_full_weights_by_name_load_from_the_hub_cache(torch_home):
    from torchvision.models import segmentation as tvseg

    torch.manual_seed(1)
    source = tvseg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    seed_cache(torch_home, FULL, source)
    # 3 classes, not VOC's 21: the class layers stay fresh, everything else is loaded.
    model = models.build_model("lraspp_mobilenet_v3_large", 3, aux_loss=False, weights=FULL)
    got, want = model.state_dict(), source.state_dict()
    assert torch.equal(got["backbone.0.0.weight"], want["backbone.0.0.weight"])
    assert got["classifier.low_classifier.weight"].shape[0] == 3


def test_backbone_weights_by_name(torch_home):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(2)
    source = mobilenet_v3_large(weights=None)
    seed_cache(torch_home, BACKBONE, source)
    model = models.build_model(
        "lraspp_mobilenet_v3_large", 3, aux_loss=False, weights_backbone=BACKBONE
    )
    assert torch.equal(model.backbone["0"][0].weight, source.features[0][0].weight)


def test_missing_weights_offline_name_the_file_to_place(torch_home):
    with pytest.raises(RaysegError) as e:
        models.weight_file(BACKBONE)
    expected = torch_home / "hub" / "checkpoints" / "mobilenet_v3_large-8738ca79.pth"
    assert str(expected) in str(e.value) and "cannot be downloaded" in str(e.value)


def test_unknown_weight_name_is_one_clear_error(torch_home):
    with pytest.raises(RaysegError, match="not a torchvision weight name"):
        models.weight_file("ResNet50_Weights.NOPE")
