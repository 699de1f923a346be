"""rayseg.pipeline: stage paths derived from `out` (pure) and a reduced demo end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mask_data import write_masks

from rayseg import pipeline
from rayseg.config import (
    EvaluateConfig,
    MasksConfig,
    PipelineConfig,
    SynthConfig,
    TrainConfig,
    load_config,
)
from rayseg.errors import RaysegError


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


def test_demo_keeps_given_sections(tmp_path):
    mine = TrainConfig(data=None, out=None, epochs=1)
    cfg = pipeline.demo_config(PipelineConfig(out=str(tmp_path), train=mine))
    assert cfg.train is mine and cfg.synth == pipeline.DEMO_SECTIONS["synth"]


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
