"""rayseg.pipeline: stage paths derived from `out` (pure) and a reduced demo end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

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


def test_subset_stays_local_while_shared_outputs_go_to_s3(tmp_path):
    # A cluster run: the subset file is the driver's (head's) own; everything else is shared.
    path = tmp_path / "p.yaml"
    path.write_text(
        "out: s3://b/run\n"
        "subset: {annotations: /head/a.json, out: /head/subset.json, num_images: 5}\n"
        "masks: {images_dir: s3://b/images}\n"
        "train: {epochs: 1}\n"
    )
    st = pipeline.plan_stages(load_config(PipelineConfig, str(path)))
    assert st.masks.annotations == "/head/subset.json"
    for shared in (st.masks.out, st.train.out, st.val_masks, st.evaluate.out, st.predict.out):
        assert shared.startswith("s3://b/run/"), shared
    path.write_text(path.read_text().replace("out: /head/subset.json, ", ""))
    with pytest.raises(RaysegError, match="set 'subset.out' to a local path"):
        pipeline.plan_stages(load_config(PipelineConfig, str(path)))


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
    # The masks' dataset card now states the split training made (before: one `train` split).
    card = (out / "masks" / "README.md").read_text()
    assert "Split: 16 train and 4 val images" in card and "train/split.json" in card
    split = pq.read_table(out / "masks" / "split" / "split.parquet").to_pylist()
    assert sorted(r["image_id"] for r in split if r["split"] == "val") == sorted(val)
    printed = capsys.readouterr().out
    assert f"metrics:         {out}/metrics.json" in printed


def test_stage_line_says_how_long_the_whole_run_has_left():
    assert pipeline.stage_line(4, 6, "train", "m, 2 epochs", 130.0) == (
        "[4/6] train: m, 2 epochs (about 2 min 10 s left in all)"
    )
    assert pipeline.stage_line(1, 6, "synth", "x", None) == "[1/6] synth: x"
    assert [pipeline.duration(s) for s in (44.6, 60, 184, 3599)] == [
        "45 s",
        "1 min",
        "3 min",
        "60 min",
    ]


def test_seconds_left_scales_the_rest_by_the_measured_speed():
    expected = {"synth": 10.0, "masks": 5.0, "train": 100.0, "evaluate": 20.0}
    assert pipeline.seconds_left(expected, {}) == 135.0
    # synth and masks took twice their expected 15 s: the remaining 120 s will take 240 s...
    assert pipeline.seconds_left(expected, {"synth": 22.0, "masks": 8.0}, prior=0) == 240.0
    # ... or, pulled toward the reference by 30 s at its speed, (30 + 30) / (15 + 30) x 120 s.
    assert pipeline.seconds_left(expected, {"synth": 22.0, "masks": 8.0}) == pytest.approx(160)
    assert pipeline.seconds_left(expected, {**expected}) == 0.0


def test_expected_seconds_scale_with_images_and_epochs(tmp_path):
    reference = pipeline.demo_reference()
    shipped = pipeline.expected_seconds(reference.stages, reference)
    assert shipped == pytest.approx(pipeline.DEMO_STAGE_SECONDS)
    demo = load_config(PipelineConfig, str(DEMO_YAML))
    bigger = dataclasses.replace(
        demo,
        synth=dataclasses.replace(demo.synth, num_images=2 * demo.synth.num_images),
        subset=dataclasses.replace(demo.subset, num_images=2 * demo.subset.num_images),
        train=dataclasses.replace(demo.train, epochs=3 * demo.train.epochs),
    )
    scaled = pipeline.expected_seconds(pipeline.plan_stages(bigger), reference)
    assert scaled["masks"] == pytest.approx(2 * shipped["masks"])
    assert scaled["train"] == pytest.approx(6 * shipped["train"])
    # Without synthetic data the plan does not say how many images: no ETA rather than a guess.
    real = ray_plan(tmp_path, "train: {}\n")
    assert pipeline.expected_seconds(real, reference) is None


def test_demo_prints_each_stage_with_the_time_left(monkeypatch, tmp_path, capsys):
    # The stages replaced by stubs taking 1 s each (by a fake clock): the lines and their ETA.
    clock = iter(range(1000))
    monkeypatch.setattr(pipeline, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    monkeypatch.setattr(pipeline, "connect_ray", lambda *a, **k: None)
    demo = load_config(PipelineConfig, str(DEMO_YAML))
    seconds = {name: 20.0 for name in pipeline.DEMO_STAGE_SECONDS}
    reference = pipeline.Reference(seconds, pipeline.plan_stages(demo))
    stubs = {
        "rayseg.synth.run_synth": {},
        "rayseg.subset.run_subset": {},
        "rayseg.masks.run_masks": {},
        "rayseg.train.run_train": {"val_miou": 0.5},
        "rayseg.evaluate.run_evaluate": {"miou": 0.5},
        "rayseg.predict.run_predict": {},
    }
    for target, summary in stubs.items():
        monkeypatch.setattr(target, lambda cfg, summary=summary: summary)
    monkeypatch.setattr(pipeline, "write_rows", lambda *a: 0)
    monkeypatch.setattr(pipeline, "record_split", lambda *a, **k: None)
    monkeypatch.setattr(pipeline.storage, "read_json", lambda loc: {"val_image_ids": []})
    cfg = dataclasses.replace(demo, out=str(tmp_path))
    pipeline.run_pipeline(cfg, reference=reference)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == [
        "[1/6] synth",
        "[2/6] subset",
        "[3/6] masks",
        "[4/6] train",
        "[5/6] evaluate",
        "[6/6] predict",
    ]
    # Each stage took 1 s of its expected 20 s: after k stages, (6 - k) x 20 s are left, at the
    # speed (k + 30) / (20 k + 30).
    assert lines[0].endswith("(about 2 min left in all)")
    assert lines[3].endswith("(about 22 s left in all)")
    assert lines[5].endswith("(about 5 s left in all)")
