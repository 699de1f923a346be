"""The whole chain: [synth ->] [subset ->] masks -> train -> evaluate -> predict.

plan_stages(cfg) is pure: it fills every stage's paths from `out` (and from the stage before),
so a pipeline file only says what differs. run_pipeline runs the stages in order on one Ray
cluster and writes OUT/metrics.json (the evaluation of the held-out split, mIoU first) and
OUT/pipeline.json (every stage's summary). run_demo is run_pipeline with the sections of
jobs/configs/demo.yaml for those the config leaves out: synthetic shapes, learnable by design in a
few minutes on CPU. Each stage starts with a line `[k/N] stage: ...`; the demo's also says about
how long the whole run has left (measured stage times, scaled: seconds_left).

One Ray serves every stage: the `ray:` section's address and num_cpus. A stage section may set
them too (older files set `masks.address`): a value set in several places must be the same
everywhere, and one that differs is an error rather than silently ignored, since the stages
after the first would run on the first stage's Ray anyway.

Layout under OUT: synth/ (images/, annotations.json), subset.json, masks/, train/ (the run dir),
masks-val/ (the validation images' rows, the split train chose), evaluate/, predict/.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayseg import layout, storage
from rayseg.config import (
    EvaluateConfig,
    MasksConfig,
    PipelineConfig,
    PredictConfig,
    RayConfig,
    SubsetConfig,
    SynthConfig,
    TrainConfig,
    dump_yaml,
    load_config,
)
from rayseg.errors import RaysegError
from rayseg.rayconnect import connect_ray
from rayseg.text import plural

# `rayseg demo`'s settings: the one file, also runnable as `rayseg pipeline --config` or a job.
DEMO_FILE = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"


@dataclass(frozen=True)
class Stages:
    """Resolved configs, one per stage (None: stage skipped); ray: the one Ray they all use."""

    out: str
    ray: RayConfig
    synth: SynthConfig | None
    subset: SubsetConfig | None
    masks: MasksConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    predict: PredictConfig
    val_masks: str | None  # written from the train run's split, unless val data was given


def _fill(section: Any, **paths: Any) -> Any:
    """The section with each given path set where the section left it unset (None)."""
    unset = {k: v for k, v in paths.items() if getattr(section, k) is None}
    return dataclasses.replace(section, **unset)


def ray_settings(cfg: PipelineConfig) -> RayConfig:
    """The Ray every stage runs on: each key from `ray:` or the stage sections that set it."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    chosen = {}
    for key in (f.name for f in dataclasses.fields(RayConfig)):
        given = {
            f"{name}.{key}": getattr(section, key)
            for name, section in sections.items()
            if isinstance(section, RayConfig) and getattr(section, key) is not None
        }
        if len(set(given.values())) > 1:
            listed = ", ".join(f"'{where}' is {value!r}" for where, value in given.items())
            raise RaysegError(
                f"pipeline: every stage runs on one Ray, but {listed}; "
                f"set '{key}' once, under 'ray'"
            )
        chosen[key] = next(iter(given.values()), None)
    return RayConfig(**chosen)


def plan_stages(cfg: PipelineConfig) -> Stages:
    """Every stage's config with its paths derived from `out` and the stage before."""
    out = storage.locate(cfg.out)
    root = out.uri.rstrip("/")
    if cfg.masks is None or cfg.train is None:
        raise RaysegError("pipeline: the config needs at least 'masks' and 'train' sections")
    ray = ray_settings(cfg)
    synth, subset, masks = _plan_data(cfg, root)
    for name, section in (("synth", synth), ("subset", subset)):
        if section and not storage.locate(section.out).is_local:
            raise RaysegError(
                f"pipeline: {name} writes local files, but its output would be {section.out}; "
                f"set '{name}.out' to a local path (on a cluster: the head's disk, where the "
                "driver reads it)"
            )
    train = _fill(cfg.train, data=masks.out, out=f"{root}/train")
    val_masks = None
    if cfg.evaluate is None or cfg.evaluate.data is None:
        val_masks = train.val_data or f"{root}/masks-val"
    evaluate = _fill(
        cfg.evaluate or EvaluateConfig(checkpoint=None, data=None, out=None),
        checkpoint=train.out,
        data=val_masks,
        out=f"{root}/evaluate",
    )
    predict = _fill(
        cfg.predict or PredictConfig(checkpoint=None, images=None, out=None),
        checkpoint=train.out,
        images=evaluate.data,
        out=f"{root}/predict",
    )
    masks, train, evaluate, predict = (
        dataclasses.replace(s, **dataclasses.asdict(ray)) for s in (masks, train, evaluate, predict)
    )
    own_val = val_masks if (val_masks and not train.val_data) else None
    return Stages(root, ray, synth, subset, masks, train, evaluate, predict, own_val)


def _plan_data(
    cfg: PipelineConfig, root: str
) -> tuple[SynthConfig | None, SubsetConfig | None, MasksConfig]:
    """synth, subset and masks, each reading what the one before wrote."""
    synth = _fill(cfg.synth, out=f"{root}/synth") if cfg.synth else None
    annotations = f"{synth.out}/annotations.json" if synth else None
    images_dir = f"{synth.out}/images" if synth else None
    subset = None
    if cfg.subset:
        subset = _fill(
            cfg.subset, annotations=annotations, out=f"{root}/subset.json", images_dir=images_dir
        )
        annotations, images_dir = subset.out, subset.images_dir or images_dir
    masks = _fill(cfg.masks, annotations=annotations, out=f"{root}/masks", images_dir=images_dir)
    if masks.annotations is None:
        raise RaysegError("pipeline: set 'masks.annotations' (or add a 'synth' or 'subset' stage)")
    if masks.images_dir is None:
        raise RaysegError("pipeline: training needs images: set 'masks.images_dir'")
    return synth, subset, masks


def write_rows(data: str, image_ids: list[int], dest: str) -> int:
    """Copy the rows of `image_ids` from a masks Parquet folder to dest/parquet (same schema)."""
    src = storage.parquet_location(data)
    wanted = np.asarray(image_ids, np.int64)
    tables = []
    for part in storage.parquet_files(src):
        table = pq.read_table(part.path, filesystem=part.fs)
        tables.append(table.filter(pc.is_in(table["image_id"], value_set=pa.array(wanted))))
    rows = pa.concat_tables(tables)
    folder = storage.locate(dest).join(layout.PARQUET)
    storage.make_dirs(folder)
    for stale in storage.list_files(folder):
        storage.delete(folder.join(stale))
    storage.write_parquet(folder.join(layout.part_name(0)), rows)
    return rows.num_rows


# ---- the whole run's ETA ----------------------------------------------------------------------

# Seconds per stage of `rayseg demo` as shipped (jobs/configs/demo.yaml) on the 2-core machine,
# measured by bench/demo_bench.py (bench/results/demo_bench.txt, 2 Dec 2026, load average ~7:
# 228 s in all). Re-measure when demo.yaml changes.
DEMO_STAGE_SECONDS: dict[str, float] = {
    "synth": 8.7,
    "subset": 0.0,
    "masks": 5.5,
    "train": 175.2,
    "evaluate": 13.0,
    "predict": 10.5,
}

PRIOR_SECONDS = 30.0  # seconds_left's pull toward the reference speed


@dataclass(frozen=True)
class Reference:
    """Stage seconds measured on one run, and that run's plan (for its work sizes)."""

    seconds: dict[str, float]
    stages: Stages


def planned_stages(stages: Stages) -> list[str]:
    optional = [name for name in ("synth", "subset") if getattr(stages, name)]
    return [*optional, "masks", "train", "evaluate", "predict"]


def stage_work(stages: Stages) -> dict[str, float] | None:
    """Images each stage handles (train: image-epochs); None when the plan does not say.

    Image size, crop, model and batch size are taken as the reference's, and fixed start-up
    costs as proportional: close for the demo's own sizes, rough for others.
    """
    if stages.synth is None or stages.train.val_data:
        return None
    images = stages.synth.num_images
    if stages.subset:
        images = min(images, stages.subset.num_images)
    val = images * stages.train.val_fraction
    per_image = {"synth": images, "subset": images, "masks": images, "evaluate": val}
    return {**per_image, "train": stages.train.epochs * (images - val), "predict": val}


def expected_seconds(stages: Stages, reference: Reference) -> dict[str, float] | None:
    """Each planned stage's seconds: the reference's, scaled by this plan's work over its."""
    work, ref_work = stage_work(stages), stage_work(reference.stages)
    if work is None or ref_work is None:
        return None
    return {
        name: reference.seconds[name] * work[name] / max(ref_work[name], 1e-9)
        for name in planned_stages(stages)
    }


def seconds_left(
    expected: dict[str, float], done: dict[str, float], *, prior: float = PRIOR_SECONDS
) -> float:
    """Expected seconds of the stages not done, times how much slower than expected this run
    goes (the load on the machine slows every stage alike): measured over the stages done, and
    pulled toward 1 by `prior` expected seconds so that the first short stages (a few seconds,
    Ray's first tasks) do not swing the whole estimate."""
    spent = sum(done.values())
    spent_expected = sum(expected[name] for name in done)
    speed = (spent + prior) / (spent_expected + prior) if spent_expected + prior > 0 else 1.0
    return speed * sum(seconds for name, seconds in expected.items() if name not in done)


def duration(seconds: float) -> str:
    """'45 s', '2 min 10 s' (to 10 s from a minute on), '3 min'."""
    if seconds < 60:
        return f"{round(seconds)} s"
    minutes, rest = divmod(round(seconds / 10) * 10, 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def stage_line(index: int, total: int, name: str, what: str, left: float | None) -> str:
    """'[4/6] train: lraspp_mobilenet_v3_large, 2 epochs (about 2 min 10 s left in all)'."""
    eta = f" (about {duration(left)} left in all)" if left is not None else ""
    return f"[{index}/{total}] {name}: {what}{eta}"


def stage_what(stages: Stages, name: str) -> str:
    if name == "synth":
        s = stages.synth
        return f"{s.num_images} synthetic {s.width}x{s.height} images -> {s.out}"
    if name == "train":
        return f"{stages.train.model}, {plural(stages.train.epochs, 'epoch')} -> {stages.train.out}"
    if name == "subset":
        return f"{stages.subset.num_images} images -> {stages.subset.out}"
    if name == "evaluate":
        return f"the held-out images {stages.evaluate.data} -> {stages.evaluate.out}"
    if name == "predict":
        return f"overlays of {stages.predict.images} -> {stages.predict.out}"
    return f"-> {stages.masks.out}"


def run_pipeline(cfg: PipelineConfig, *, reference: Reference | None = None) -> dict[str, Any]:
    """Run every stage; OUT/metrics.json holds the held-out evaluation, mIoU first.

    With a reference (measured stage times, see expected_seconds) each stage's first line says
    about how long the whole run has left.
    """
    from rayseg.checkpoint import SPLIT_NAME
    from rayseg.evaluate import run_evaluate
    from rayseg.masks import run_masks
    from rayseg.predict import run_predict
    from rayseg.subset import run_subset
    from rayseg.synth import run_synth
    from rayseg.train import run_train

    start = time.monotonic()
    stages = plan_stages(cfg)
    out = storage.locate(stages.out)
    storage.make_dirs(out)
    storage.write_bytes(out.join("pipeline.yaml"), dump_yaml(cfg).encode())
    summaries: dict[str, Any] = {}
    times: dict[str, float] = {}

    expected = expected_seconds(stages, reference) if reference else None
    order = planned_stages(stages)

    def stage(name: str, fn, stage_cfg) -> None:
        left = seconds_left(expected, times) if expected else None
        what = stage_what(stages, name)
        print(stage_line(order.index(name) + 1, len(order), name, what, left), flush=True)
        began = time.monotonic()
        summaries[name] = fn(stage_cfg)
        times[name] = round(time.monotonic() - began, 1)

    # One Ray for every stage; with the dashboard, which Ray Train's state queries need.
    connect_ray(stages.ray.address, stages.ray.num_cpus, dashboard=True)
    if stages.synth:
        stage("synth", run_synth, stages.synth)
    if stages.subset:
        stage("subset", run_subset, stages.subset)
    stage("masks", run_masks, stages.masks)
    stage("train", run_train, stages.train)
    if stages.val_masks:
        split = storage.read_json(storage.locate(stages.train.out).join(SPLIT_NAME))
        n = write_rows(stages.masks.out, split["val_image_ids"], stages.val_masks)
        print(f"validation split: {n} images -> {stages.val_masks}")
        where = storage.locate(stages.train.out).join(SPLIT_NAME).uri
        record_split(stages.masks.out, split["val_image_ids"], where=where)
    stage("evaluate", run_evaluate, stages.evaluate)
    stage("predict", run_predict, stages.predict)

    metrics = summarise(stages, summaries, times, seconds=time.monotonic() - start)
    storage.write_json(out.join("metrics.json"), metrics)
    storage.write_json(out.join("pipeline.json"), {"stages": summaries, "metrics": metrics})
    print_locations(stages, metrics)
    return metrics


def record_split(masks: str, val_ids: list[int], *, where: str) -> None:
    """The split `rayseg train` chose, in the masks output's dataset card (its `split` config):
    rayseg.export.write_hf_split and the card rewritten to describe it."""
    from rayseg import export

    parts = storage.parquet_files(storage.parquet_location(masks))
    ids = np.concatenate(
        [
            pq.read_table(p.path, columns=["image_id"], filesystem=p.fs)["image_id"].to_numpy()
            for p in parts
        ]
    )
    val = np.intersect1d(ids, np.asarray(val_ids, np.int64))
    train = np.setdiff1d(ids, val)
    out = storage.locate(masks)
    export.write_hf_split(out, {"train": train, "val": val})
    split = {"train": len(train), "val": len(val), "where": where}
    card = export.dataset_card(storage.read_mask_meta(masks), split=split)
    storage.write_bytes(out.join("README.md"), card.encode())


def summarise(
    stages: Stages, summaries: dict[str, Any], times: dict[str, float], *, seconds: float
) -> dict[str, Any]:
    """OUT/metrics.json: the held-out evaluation first, then training's own score and timings."""
    scores = summaries["evaluate"]
    return {
        "miou": scores.get("miou"),
        "pixel_accuracy": scores.get("pixel_accuracy"),
        "per_class_iou": scores.get("per_class_iou"),
        "evaluated_on": stages.evaluate.data,
        "train_val_miou": summaries["train"].get("val_miou"),
        "seconds": round(seconds, 1),
        "stage_seconds": times,
    }


def print_locations(stages: Stages, metrics: dict[str, Any]) -> None:
    miou = metrics["miou"]
    print(
        f"== done in {metrics['seconds']:.0f} s: mIoU {miou:.4f} on {stages.evaluate.data}"
        if miou is not None
        else f"== done in {metrics['seconds']:.0f} s"
    )
    rows = [
        ("metrics", f"{stages.out}/metrics.json"),
        ("masks", stages.masks.out),
        ("model", f"{stages.train.out}/model.pt"),
        ("training curves", f"{stages.train.out}/curves.png"),
        ("evaluation", f"{stages.evaluate.out}/metrics.json"),
        ("overlays", f"{stages.predict.out}/overlays/"),
    ]
    if stages.synth:
        rows.insert(0, ("synthetic data", stages.synth.out))
    for label, where in rows:
        print(f"{label + ':':<17}{where}")


def demo_config(cfg: PipelineConfig, demo_file: Path = DEMO_FILE) -> PipelineConfig:
    """cfg with demo_file's section for every section it leaves out (a given section wins whole).

    `out` is cfg's unless cfg has the default, where the file's applies (`rayseg demo --out X`).
    """
    if not demo_file.is_file():
        raise RaysegError(
            f"{demo_file}: the demo's settings file is missing; `rayseg demo` needs the rayseg "
            "source tree (pip install -e .), or run `rayseg pipeline --config FILE`"
        )
    demo = load_config(PipelineConfig, str(demo_file))
    filled = {
        f.name: getattr(cfg, f.name) or getattr(demo, f.name)
        for f in dataclasses.fields(cfg)
        if f.name != "out"
    }
    default_out = PipelineConfig.__dataclass_fields__["out"].default
    out = demo.out if cfg.out == default_out else cfg.out
    return dataclasses.replace(cfg, out=out, **filled)


def run_demo(cfg: PipelineConfig) -> dict[str, Any]:
    """`rayseg demo`: synthetic data -> subset -> masks -> train -> evaluate -> overlays."""
    return run_pipeline(demo_config(cfg), reference=demo_reference())


def demo_reference(demo_file: Path = DEMO_FILE) -> Reference:
    """DEMO_STAGE_SECONDS and the plan they were measured on: demo_file as shipped."""
    return Reference(DEMO_STAGE_SECONDS, plan_stages(load_config(PipelineConfig, str(demo_file))))
