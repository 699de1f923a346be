import dataclasses
import re

import pytest
import yaml

from rayseg.config import (
    EvaluateConfig,
    MasksConfig,
    PipelineConfig,
    PredictConfig,
    RayConfig,
    SubsetConfig,
    SynthConfig,
    TrainConfig,
    load_config,
)
from rayseg.errors import RaysegError


def test_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotations: a.json\nout: o\nnum_images: 5\nseed: 3\n")
    cfg = load_config(SubsetConfig, str(path), {"seed": 9, "num_images": None})
    assert (cfg.annotations, cfg.num_images, cfg.seed) == ("a.json", 5, 9)


def test_unknown_key_names_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotations: a.json\nout: o\nnum_imgs: 5\n")
    with pytest.raises(RaysegError, match="unknown key 'num_imgs'; did you mean 'num_images'"):
        load_config(SubsetConfig, str(path))


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotations: a.json\nout: o\nshard_size: many\n")
    with pytest.raises(RaysegError, match="'shard_size' must be an integer"):
        load_config(MasksConfig, str(path))


def test_bad_choice_lists_valid(tmp_path):
    with pytest.raises(RaysegError, match="expected one of max, smallest_on_top"):
        load_config(MasksConfig, None, {"annotations": "a", "out": "o", "overlap": "min"})


def test_missing_required():
    with pytest.raises(RaysegError, match="missing required setting 'out'"):
        load_config(SubsetConfig, None, {"annotations": "a.json"})


def test_category_list_from_string():
    cfg = load_config(SubsetConfig, None, {"annotations": "a", "out": "o", "categories": "1,18"})
    assert cfg.categories == [1, 18]


def test_nested_sections_checked(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("out: run\nmasks:\n  overlapp: max\n")
    with pytest.raises(RaysegError, match="did you mean 'overlap'"):
        load_config(PipelineConfig, str(path))


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(RaysegError, match="invalid YAML at line"):
        load_config(SubsetConfig, str(path))


@pytest.mark.parametrize(
    "cls, key, value, expected",
    [
        (TrainConfig, "epochs", 0, "'epochs' is 0, expected epochs >= 1"),
        (TrainConfig, "batch_size", -2, "'batch_size' is -2, expected batch_size >= 1"),
        (TrainConfig, "crop_size", 0, "'crop_size' is 0, expected crop_size >= 1"),
        (TrainConfig, "num_workers", 0, "'num_workers' is 0, expected num_workers >= 1"),
        (TrainConfig, "lr", 0, "'lr' is 0.0, expected lr > 0"),
        (TrainConfig, "val_fraction", 1, "'val_fraction' is 1.0, expected 0 <= val_fraction < 1"),
        (
            TrainConfig,
            "val_fraction",
            -0.1,
            "'val_fraction' is -0.1, expected 0 <= val_fraction < 1",
        ),
        (TrainConfig, "max_failures", -2, "'max_failures' is -2, expected max_failures >= -1"),
        (TrainConfig, "num_cpus", 0, "'num_cpus' is 0, expected 1 <= num_cpus <= 100000000000000"),
        (MasksConfig, "shard_size", -1, "'shard_size' is -1, expected shard_size >= 0"),
        (SubsetConfig, "num_images", 0, "'num_images' is 0, expected num_images >= 1"),
        (SynthConfig, "width", 0, "'width' is 0, expected width >= 1"),
        (EvaluateConfig, "num_actors", 0, "'num_actors' is 0, expected num_actors >= 1"),
        (PredictConfig, "batch_size", 0, "'batch_size' is 0, expected batch_size >= 1"),
    ],
)
def test_limits_name_key_value_and_limit(tmp_path, cls, key, value, expected):
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**required, key: value}))
    with pytest.raises(RaysegError, match=f"^{re.escape(f'{path}: {expected}')}$"):
        load_config(cls, str(path))


def test_values_on_the_limits_are_accepted():
    cfg = load_config(
        TrainConfig,
        None,
        {"data": "d", "out": "o", "epochs": 1, "val_fraction": 0, "max_failures": -1, "lr": 1e-9},
    )
    assert (cfg.epochs, cfg.val_fraction, cfg.max_failures, cfg.lr) == (1, 0.0, -1, 1e-9)


def test_limits_apply_inside_pipeline_sections(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("out: run\ntrain:\n  epochs: 0\n")
    with pytest.raises(RaysegError, match="'train': 'epochs' is 0, expected epochs >= 1"):
        load_config(PipelineConfig, str(path))


@pytest.mark.parametrize("cls", [MasksConfig, TrainConfig, EvaluateConfig, PredictConfig])
def test_every_ray_command_reads_address_and_num_cpus(cls):
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")}
    cfg = load_config(cls, None, {**required, "address": "auto", "num-cpus": "3"})
    assert (cfg.address, cfg.num_cpus) == ("auto", 3)


def test_pipeline_ray_section(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("out: run\nray:\n  address: ray://head:10001\n  num_cpus: 4\n")
    cfg = load_config(PipelineConfig, str(path))
    assert cfg.ray == RayConfig(address="ray://head:10001", num_cpus=4)
    path.write_text("out: run\nray:\n  adress: auto\n")
    with pytest.raises(RaysegError, match="'ray': unknown key 'adress'; did you mean 'address'"):
        load_config(PipelineConfig, str(path))


def test_preset_fills_unset_keys_and_file_or_flag_values_win(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("annotations: a\nout: o\npreset: torchvision-voc\ncrowd: skip\n")
    cfg = load_config(MasksConfig, str(path), {"naming": "cats"})
    assert (cfg.classes, cfg.values, cfg.overlap, cfg.rasterizer) == (
        "voc",
        "train_id",
        "ignore_any",
        "coco",
    )
    assert (cfg.crowd, cfg.naming) == ("skip", "cats")
    plain = load_config(MasksConfig, None, {"annotations": "a", "out": "o"})
    assert (plain.classes, plain.overlap, plain.preset) == ("all", "max", None)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(RaysegError, match="'preset' is 'voc', expected one of torchvision-voc"):
        load_config(MasksConfig, None, {"annotations": "a", "out": "o", "preset": "voc"})


def test_preset_help_shows_the_bundle():
    (f,) = [f for f in dataclasses.fields(MasksConfig) if f.name == "preset"]
    assert "torchvision-voc = classes voc, values train_id" in f.metadata["help"]


def test_split_defaults_are_shared_with_train():
    masks = {f.name: f.default for f in dataclasses.fields(MasksConfig)}
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert (masks["val_fraction"], masks["seed"]) == (train["val_fraction"], train["seed"])
