"""rayseg.pipeline: stage paths derived from `out` (pure) and a reduced demo end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from mask_data import write_masks

from rayseg import pipeline
from rayseg.config import (
    EvaluateConfig,
    MasksConfig,
    PipelineConfig,
    RayConfig,
    SynthConfig,
    TrainConfig,
    load_config,
)
from rayseg.errors import RaysegError

DEMO_YAML = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"


def test_stage_paths_follow_out(tmp_path):
    cfg = pipeline.demo_config(PipelineConfig(out=str(tmp_path / "o")))
    st = pipeline.plan_stages(cfg)
    root = str(tmp_path / "o")
    assert st.synth.out == f"{root}/synth"
    assert st.subset.annotations == f"{root}/synth/annotations.json"
    assert st.subset.images_dir == f"{root}/synth/images"
    assert (st.masks.annotations, st.masks.out) == (f"{root}/subset.json", f"{root}/masks")
    assert st.masks.images_dir == f"{root}/synth/images"
    assert (st.train.data, st.train.out) == (f"{root}/masks", f"{root}/train")
    assert st.evaluate.checkpoint == st.predict.checkpoint == f"{root}/train"
    assert st.evaluate.data == st.predict.images == st.val_masks == f"{root}/masks-val"


def test_given_paths_win_and_val_data_is_evaluated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "out: o\n"
        "masks: {annotations: a.json, images_dir: imgs, out: m}\n"
        "train: {val_data: v, epochs: 2}\n"
    )
    st = pipeline.plan_stages(load_config(PipelineConfig, str(path)))
    assert st.synth is None and st.subset is None
    assert st.masks.out == "m" and st.train.data == "m" and st.train.epochs == 2
    assert st.evaluate.data == "v" and st.val_masks is None  # nothing to write: v is given


def test_plan_refuses_missing_sections_and_images(tmp_path):
    with pytest.raises(RaysegError, match="'masks' and 'train'"):
        pipeline.plan_stages(PipelineConfig(out=str(tmp_path)))
    cfg = PipelineConfig(
        out=str(tmp_path),
        masks=MasksConfig(annotations="a.json", out=None),
        train=TrainConfig(data=None, out=None),
    )
    with pytest.raises(RaysegError, match="images_dir"):
        pipeline.plan_stages(cfg)


def test_demo_reads_its_settings_file(tmp_path):
    demo_file = tmp_path / "demo.yaml"
    out = tmp_path / "from-file"
    demo_file.write_text(
        f"out: {out}\nsynth: {{num_images: 7}}\nmasks: {{shard_size: 3}}\ntrain: {{epochs: 5}}\n"
    )
    st = pipeline.plan_stages(pipeline.demo_config(PipelineConfig(), demo_file))
    assert st.out == str(out) and st.synth.num_images == 7 and st.subset is None
    assert (st.masks.shard_size, st.train.epochs) == (3, 5)
    assert st.masks.images_dir == f"{out}/synth/images"


def test_demo_is_the_demo_yaml_pipeline():
    # `rayseg demo` and `rayseg pipeline --config jobs/configs/demo.yaml` plan the same run.
    demo = pipeline.plan_stages(pipeline.demo_config(PipelineConfig()))
    assert demo == pipeline.plan_stages(load_config(PipelineConfig, str(DEMO_YAML)))
    assert demo.synth.num_images == yaml.safe_load(DEMO_YAML.read_text())["synth"]["num_images"]


def test_demo_flags_and_given_sections_win(tmp_path):
    mine = TrainConfig(data=None, out=None, epochs=1)
    cfg = pipeline.demo_config(PipelineConfig(out=str(tmp_path), train=mine))
    assert cfg.out == str(tmp_path) and cfg.train is mine
    assert cfg.synth == load_config(PipelineConfig, str(DEMO_YAML)).synth


def test_demo_without_its_file_is_a_clear_error(tmp_path):
    with pytest.raises(RaysegError, match="demo.yaml: the demo's settings file is missing"):
        pipeline.demo_config(PipelineConfig(), tmp_path / "demo.yaml")


def ray_plan(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text("out: o\nmasks: {annotations: a.json, images_dir: imgs}\n" + text)
    return pipeline.plan_stages(load_config(PipelineConfig, str(path)))


def test_ray_section_reaches_every_stage(tmp_path):
    st = ray_plan(tmp_path, "ray: {address: auto, num_cpus: 3}\ntrain: {}\n")
    assert st.ray == RayConfig(address="auto", num_cpus=3)
    for stage in (st.masks, st.train, st.evaluate, st.predict):
        assert (stage.address, stage.num_cpus) == ("auto", 3), stage


def test_a_stage_setting_applies_to_all_and_must_agree(tmp_path):
    # Before the `ray` section, files set it on the masks stage: it still holds for every stage.
    st = ray_plan(tmp_path, "train: {num_cpus: 2}\n")
    assert st.ray == RayConfig(address=None, num_cpus=2) and st.predict.num_cpus == 2
    st = ray_plan(tmp_path, "ray: {num_cpus: 2}\ntrain: {num_cpus: 2}\n")
    assert st.evaluate.num_cpus == 2
    with pytest.raises(
        RaysegError, match="'ray.address' is 'auto', 'train.address' is 'ray://h:1'; set 'address'"
    ):
        ray_plan(tmp_path, "ray: {address: auto}\ntrain: {address: 'ray://h:1'}\n")


def test_write_rows_copies_the_chosen_images(tmp_path):
    masks = write_masks(tmp_path / "m", 6)
    n = pipeline.write_rows(str(masks), [101, 104], str(tmp_path / "val"))
    table = pq.read_table(tmp_path / "val" / "parquet" / "part-00000.parquet")
    assert n == 2 and sorted(table["image_id"].to_pylist()) == [101, 104]
    assert (
        table.schema.metadata == pq.read_schema(masks / "parquet" / "part-00000.parquet").metadata
    )


def test_reduced_demo_end_to_end(ray_local, tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = PipelineConfig(
        out=str(out),
        synth=SynthConfig(out=None, num_images=20, width=80, height=60),
        train=TrainConfig(
            data=None,
            out=None,
            epochs=1,
            batch_size=4,
            crop_size=48,
            val_fraction=0.2,
            max_failures=0,
        ),
        evaluate=EvaluateConfig(checkpoint=None, data=None, out=None, batch_size=4),
    )
    metrics = pipeline.run_demo(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= saved["miou"] <= 1.0 and saved["miou"] == metrics["miou"]
    assert saved["evaluated_on"] == str(out / "masks-val")
    assert (out / "train" / "model.pt").exists() and (out / "train" / "curves.png").exists()
    val = json.loads((out / "train" / "split.json").read_text())["val_image_ids"]
    assert len(list(Path(out / "predict" / "overlays").iterdir())) == len(val) == 4
    printed = capsys.readouterr().out
    assert f"metrics:         {out}/metrics.json" in printed
