"""Typed run settings: one dataclass per command, filled from `--config FILE.yaml` then flags.

load_config(cls, path, overrides) -> cls is the only YAML parsing in rayseg. Unknown keys, wrong
types, values outside a field's choices or limits are RaysegErrors naming the key. Field metadata
drives the CLI and the checks: `help`, `choices`, limits (`min`/`max` inclusive, `above`/`below`
exclusive) and `flag=False` for keys only a file can set.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from rayseg.errors import RaysegError

# Allowed values of the choice settings: the CLI, validation and the stages read them from here.
RASTERIZERS = ("opencv", "coco")
OVERLAPS = ("max", "smallest_on_top", "last", "ignore", "ignore_any")
VALUE_SCHEMES = ("category_id", "train_id", "scaled")
CROWD_MODES = ("class", "ignore", "skip")
NAMINGS = ("cats", "stem")
LAYOUTS = ("rayseg", "voc")
# The validation split of `rayseg train`, also written by `rayseg masks --layout voc`.
VAL_FRACTION = 0.1
SPLIT_SEED = 0

# Named bundles of `rayseg masks` settings; settings given explicitly (file or flag) win.
MASK_PRESETS = {
    # torchvision references/segmentation's COCO target: the 20 VOC categories as 1..20 in
    # CAT_LIST order, 255 where two or more kept objects overlap, crowds painted as their class,
    # pycocotools rasterisation, <stem>.png.
    "torchvision-voc": {
        "classes": "voc",
        "values": "train_id",
        "overlap": "ignore_any",
        "crowd": "class",
        "rasterizer": "coco",
        "naming": "stem",
    },
}
OPTIMIZERS = ("sgd", "adamw")
# Default cap on vertices per polygon (rayseg.render): the largest in the real COCO sample has
# 315; fill time grows with vertices x crossings: at 5,000 the worst self-crossing polygon takes
# 0.9 s (opencv) / 0.4 s and 164 MB (coco) on 640x480, at 10,000 5 s (bench: issue 9 figures).
MAX_VERTICES = 5_000
# Default pixel cap of predict and evaluate: a model's activations grow with the image (LR-ASPP on
# CPU holds ~1 GB per 4 Mpixel), so 4000x4000 is the largest image taken at full size by default.
INFER_MAX_PIXELS = 16_000_000

# Ray refuses a resource quantity above this (ray 2.60: "Resource quantities must be at most
# 100000000000000.0"); checked here so the user reads rayseg's line, not Ray's ValueError.
RAY_MAX_RESOURCE = 100_000_000_000_000

# Limits a field's metadata may carry: key -> (test of value against the limit, how it reads).
# At most one lower (min / above) and one upper (max / below) limit per field.
LIMITS = {
    "min": (operator.ge, ">="),
    "above": (operator.gt, ">"),
    "max": (operator.le, "<="),
    "below": (operator.lt, "<"),
}


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with CLI help text (and optionally `choices` and limits)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def required(help: str) -> Any:
    return field(default=None, metadata={"help": help, "required": True})


@dataclass
class RayConfig:
    """Which Ray a distributed command runs on; also the pipeline's `ray:` section."""

    address: str | None = opt(None, "Ray cluster address (default: local, or the job's cluster)")
    num_cpus: int | None = opt(
        None, "CPUs for local Ray (default: all)", min=1, max=RAY_MAX_RESOURCE
    )


@dataclass
class SubsetConfig:
    annotations: str = required("COCO instances JSON to select from")
    out: str = required("where to write the subset annotation file")
    num_images: int = opt(8000, "how many images to keep", min=1)
    seed: int = opt(0, "selection seed: same input + seed gives a byte-identical file")
    images_dir: str | None = opt(None, "only images whose file exists here are eligible")
    min_annotations: int = opt(0, "only images with at least this many annotations", min=0)
    categories: list[int] | None = opt(None, "only images with one of these category ids")


def _preset_help(presets: dict[str, dict[str, Any]]) -> str:
    bundles = "; ".join(
        f"{name} = " + ", ".join(f"{k} {v}" for k, v in bundle.items())
        for name, bundle in presets.items()
    )
    return f"named bundle of settings, explicit ones override it ({bundles})"


@dataclass
class MasksConfig(RayConfig):
    annotations: str = required("COCO instances JSON (e.g. the subset file)")
    out: str = required("output directory or s3://bucket/prefix")
    preset: str | None = opt(
        None, _preset_help(MASK_PRESETS), choices=tuple(MASK_PRESETS), presets=MASK_PRESETS
    )
    classes: str = opt("all", "all | voc | comma-separated category ids (others are not drawn)")
    rasterizer: str = opt("opencv", "polygon fill", choices=RASTERIZERS)
    overlap: str = opt(
        "max",
        "how overlapping objects resolve (ignore: different classes -> ignore; ignore_any: "
        "two or more objects -> ignore)",
        choices=OVERLAPS,
    )
    values: str = opt("category_id", "pixel value scheme", choices=VALUE_SCHEMES)
    crowd: str = opt("class", "how iscrowd=1 objects are painted", choices=CROWD_MODES)
    naming: str = opt("cats", "mask file names", choices=NAMINGS)
    palette: bool = opt(False, "write indexed-colour PNGs (pixel values unchanged)")
    images_dir: str | None = opt(None, "check images and embed their bytes in the Parquet rows")
    follow_image_links: bool = opt(
        False,
        "read images through symbolic links inside --images-dir that point outside it (default: "
        "such an image is a listed problem, 'outside the images folder'; a linked --images-dir "
        "itself is always followed)",
    )
    shard_size: int = opt(
        0,
        "images per Ray task / Parquet file; 0 = auto: about 4 shards per CPU, 8 to 200 images "
        "each (a resumed run keeps the size it started with)",
        min=0,
    )
    max_pixels: int = opt(
        100_000_000,
        "an image over this many pixels is a listed problem, not rendered (bounds a task's memory)",
        min=1,
    )
    max_vertices: int = opt(
        MAX_VERTICES,
        "a polygon with more vertices is a listed problem, not drawn (bounds a task's time)",
        min=3,
    )
    verify: bool = opt(
        False,
        "check every finished shard deeply (masks and Parquet rows decode, sizes match) and "
        "render the damaged ones again (a plain rerun checks that files exist with their sizes)",
    )
    render_while_ray_starts: bool = opt(
        True,
        "with a Ray of its own (no --address), render shards in this process until Ray is up "
        "(on a small machine Ray's start-up takes as long as thousands of masks)",
    )
    layout: str = opt(
        "rayseg",
        "voc: also a VOCdevkit/VOC2012 folder (JPEGImages, SegmentationClass, ImageSets, "
        "classes.json) for torchvision / mmseg; needs --images-dir",
        choices=LAYOUTS,
    )
    val_fraction: float = opt(
        VAL_FRACTION,
        "--layout voc: fraction of image ids in val.txt (as rayseg train)",
        min=0,
        below=1,
    )
    seed: int = opt(SPLIT_SEED, "--layout voc: split seed (as rayseg train --seed)")
    overwrite: bool = opt(False, "redo everything instead of resuming")


@dataclass
class SynthConfig:
    out: str = required("directory for images/ and annotations.json")
    num_images: int = opt(64, "how many images", min=1)
    seed: int = opt(0, "random seed")
    width: int = opt(160, "image width", min=1)
    height: int = opt(120, "image height", min=1)


@dataclass
class TrainConfig(RayConfig):
    data: str = required("`rayseg masks` output dir (or its parquet/ folder), local or s3://")
    out: str = required("run directory, local or s3://")
    model: str = opt("lraspp_mobilenet_v3_large", "torchvision segmentation model")
    epochs: int = opt(10, "total epochs (rerun with more to resume and continue)", min=1)
    batch_size: int = opt(8, "images per worker per step", min=1)
    crop_size: int = opt(480, "square training crop", min=1)
    num_workers: int = opt(1, "Ray Train workers (data-parallel)", min=1)
    use_gpu: bool = opt(False, "one GPU per worker")
    val_data: str | None = opt(None, "separate validation Parquet (default: split by image id)")
    # 0 is allowed: with val_data the fraction is unused (train refuses 0 without it).
    val_fraction: float = opt(
        VAL_FRACTION, "fraction of image ids held out for validation", min=0, below=1
    )
    lr: float = opt(0.02, "base learning rate", above=0)
    optimizer: str = opt("sgd", "optimizer", choices=OPTIMIZERS)
    momentum: float = opt(0.9, "SGD momentum", min=0)
    weight_decay: float = opt(1e-4, "weight decay", min=0)
    warmup_epochs: float = opt(0.0, "linear LR warmup length in epochs", min=0)
    classes: str = opt("all", "all | voc | comma-separated category ids")
    aux_loss: bool = opt(True, "auxiliary loss where the model has an aux head")
    weights: str | None = opt(
        None,
        "full-model weights: a local file, s3:// URI or torchvision weight name "
        "(e.g. DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1)",
    )
    weights_backbone: str | None = opt(
        None,
        "backbone weights: a local file, s3:// URI or torchvision weight name "
        "(e.g. ResNet50_Weights.IMAGENET1K_V1)",
    )
    amp: bool = opt(True, "bf16 autocast + channels_last on GPU")
    compile: bool = opt(False, "torch.compile the model")
    sync_bn: bool = opt(True, "SyncBatchNorm across GPU workers (PyTorch has none on CPU)")
    max_failures: int = opt(2, "worker failures tolerated before the run fails (-1: any)", min=-1)
    num_to_keep: int = opt(2, "checkpoints kept (best by validation mIoU, plus the latest)", min=1)
    cpus_per_worker: float | None = opt(
        None,
        "CPUs reserved per worker (default: 1 with GPUs; on CPU all but one, shared)",
        above=0,
        max=RAY_MAX_RESOURCE,
    )
    gpus_per_worker: float = opt(
        1.0,
        "with --use-gpu: GPUs per worker (0.5: two workers share one GPU, over gloo)",
        above=0,
        max=1,
    )
    seed: int = opt(SPLIT_SEED, "random seed (model init; the validation split)")


@dataclass
class EvaluateConfig(RayConfig):
    checkpoint: str = required("run directory or exported model file")
    data: str = required("masks output dir or Parquet folder to score")
    out: str = required("directory for metrics.json and the confusion matrix")
    batch_size: int = opt(4, "images per inference batch", min=1)
    use_gpu: bool = opt(False, "one GPU per scoring actor")
    num_actors: int = opt(1, "scoring actors (model replicas)", min=1)
    max_pixels: int = opt(
        INFER_MAX_PIXELS,
        "an image over this many pixels is a listed problem, not scored (bounds an actor's memory)",
        min=1,
    )
    overwrite: bool = opt(
        False, "write into a non-empty --out no rayseg run made (nothing there is removed)"
    )


@dataclass
class PredictConfig(RayConfig):
    checkpoint: str = required("run directory or exported model file")
    images: str = required("directory of images, or a masks Parquet folder")
    follow_image_links: bool = opt(
        False,
        "read images through symbolic links in the --images folder that point outside it "
        "(default: such a file is a listed problem, 'outside the images folder')",
    )
    out: str = required("directory for label PNGs and overlays")
    batch_size: int = opt(4, "images per inference batch", min=1)
    use_gpu: bool = opt(False, "one GPU per inference actor")
    num_actors: int = opt(1, "inference actors (model replicas)", min=1)
    max_pixels: int = opt(
        INFER_MAX_PIXELS,
        "an image over this many pixels is a listed problem, not predicted (bounds an actor's "
        "memory)",
        min=1,
    )
    overwrite: bool = opt(
        False, "write into a non-empty --out no rayseg run made (nothing there is removed)"
    )


@dataclass
class PipelineConfig:
    """The whole chain; each stage's paths are derived from `out` unless set in its section.

    `ray` is the one Ray every stage runs on (rayseg/pipeline.py: a stage section may repeat a
    value, but one that differs is an error).
    """

    out: str = opt("rayseg_demo", "output root")
    ray: RayConfig | None = opt(None, "the Ray cluster every stage runs on", flag=False)
    synth: SynthConfig | None = opt(None, "make a synthetic dataset first", flag=False)
    subset: SubsetConfig | None = opt(None, "subset settings", flag=False)
    masks: MasksConfig | None = opt(None, "mask settings", flag=False)
    train: TrainConfig | None = opt(None, "training settings", flag=False)
    evaluate: EvaluateConfig | None = opt(None, "evaluation settings", flag=False)
    predict: PredictConfig | None = opt(None, "prediction settings", flag=False)


def load_config(cls: type, path: str | None = None, overrides: dict[str, Any] | None = None):
    """File values, then non-None overrides; unknown keys and bad values are RaysegErrors."""
    values: dict[str, Any] = {}
    where = "config"
    if path:
        where = path
        values = _read_yaml(path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(cls, values, where=where)


def build(cls: type, values: dict[str, Any], *, where: str, partial: bool = False):
    """A `cls` from a plain dict, checking keys, types, choices and limits (sections recurse)."""
    if not isinstance(values, dict):
        raise RaysegError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise RaysegError(f"{where}: unknown key '{key}'{_suggest(name, fields)}")
        kwargs[name] = _coerce(value, hints[name], f"{where}: '{key}'")
    _expand_presets(kwargs, fields, hints, where)
    for name, f in fields.items():
        if kwargs.get(name) is not None:
            _check_allowed(name, kwargs[name], f.metadata, where)
        elif not partial and f.metadata.get("required"):
            raise RaysegError(f"{where}: missing required setting '{name}' (--{_flag(name)})")
    return cls(**kwargs)


def _expand_presets(kwargs: dict[str, Any], fields: dict, hints: dict, where: str) -> None:
    """Fill settings not given explicitly from the chosen preset of any `presets` field."""
    for name, f in fields.items():
        bundles = f.metadata.get("presets")
        if not bundles or kwargs.get(name) is None or kwargs[name] not in bundles:
            continue
        for key, value in bundles[kwargs[name]].items():
            if kwargs.get(key) is None:
                kwargs[key] = _coerce(value, hints[key], f"{where}: preset {kwargs[name]!r}")


def _check_allowed(name: str, value: Any, meta: Any, where: str) -> None:
    """RaysegError unless `value` is one of the field's choices and within its limits."""
    choices = meta.get("choices")
    if choices and value not in choices:
        raise RaysegError(
            f"{where}: '{name}' is {show(value)}, expected one of {', '.join(choices)}"
        )
    limits = [(test, op, meta[key]) for key, (test, op) in LIMITS.items() if key in meta]
    if all(test(value, limit) for test, _, limit in limits):
        return
    if len(limits) == 2:
        (_, low_op, low), (_, high_op, high) = limits
        expected = f"{low} {low_op.replace('>', '<')} {name} {high_op} {high}"
    else:
        ((_, op, limit),) = limits
        expected = f"{name} {op} {limit}"
    raise RaysegError(f"{where}: '{name}' is {show(value)}, expected {expected}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RaysegError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RaysegError(f"{path}: invalid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RaysegError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


# What an error message echoes of a value: a few items, levels and characters. A YAML alias
# bomb is a small graph of shared lists that repr() would expand to gigabytes.
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict = 2, 4, 4, 4
_SHOW.maxstring = _SHOW.maxother = 80


def show(value: Any) -> str:
    """repr(value), bounded in time and length (see _SHOW)."""
    return _SHOW.repr(value)


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(valid))}"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where=where, partial=True)
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise RaysegError(f"{where} must be a list, got {show(value)}")
        return [_coerce(v, item, where) for v in value]
    if origin is Literal:
        if value not in get_args(tp):
            raise RaysegError(f"{where} is {show(value)}, expected one of {get_args(tp)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise RaysegError(f"{where} must be true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise RaysegError(f"{where} must be an integer, got {show(value)}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise RaysegError(f"{where} must be an integer, got {show(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise RaysegError(f"{where} must be a number, got {show(value)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RaysegError(f"{where} must be a number, got {show(value)}") from None
    if tp is str:
        if isinstance(value, dict | list):
            raise RaysegError(f"{where} must be a string, got {show(value)}")
        return str(value)
    return value
