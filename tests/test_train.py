"""rayseg.train: driver planning, bad input refused before training, and real runs on local Ray.

The Ray runs use tiny 64x48 images: 2 workers (gloo) train LR-ASPP for 2 epochs, then the same
command with 3 epochs resumes. Where ../shared/data/coco_sample exists, real COCO images go
through subset -> masks -> train.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mask_data import META, write_masks

from rayseg import cluster, ingest, train
from rayseg.checkpoint import load_model
from rayseg.config import TrainConfig, load_config
from rayseg.errors import RaysegError
from rayseg.models import class_map_from_meta

COCO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_sample"
BAD_ROWS = {104: "image", 109: "mask"}


def config(data: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(
        data=str(data),
        out=str(out),
        model="lraspp_mobilenet_v3_large",
        epochs=2,
        batch_size=4,
        crop_size=48,
        num_workers=2,
        val_fraction=0.2,
        lr=0.05,
        max_failures=0,
    )
    return TrainConfig(**{**settings, **changes})


# ---- driver planning ---------------------------------------------------------------------


def test_steps_per_epoch_and_too_few_images():
    cfg = TrainConfig(data="d", out="o", batch_size=4, num_workers=2)
    assert train.steps_per_epoch(17, cfg) == 2
    with pytest.raises(RaysegError, match="too few"):
        train.steps_per_epoch(7, cfg)


def test_worker_resources_leave_a_cpu_for_data():
    cfg = TrainConfig(data="d", out="o", num_workers=2)
    assert train.worker_resources(cfg, [2.0]) == (0.5, 1)
    assert train.worker_resources(TrainConfig(data="d", out="o"), [2.0]) == (1.0, 1)
    # Several nodes: planned as if the largest were lost, so a restart leaves CPUs for data.
    assert train.worker_resources(TrainConfig(data="d", out="o"), [8.0, 8.0]) == (7.0, 7)
    assert train.worker_resources(cfg, [1.0, 1.0, 1.0]) == (0.5, 1)
    no_restarts = TrainConfig(data="d", out="o", max_failures=0)
    assert train.worker_resources(no_restarts, [8.0, 8.0]) == (8.0, 8)
    assert train.worker_resources(TrainConfig(data="d", out="o", use_gpu=True), [16.0]) == (1, 1)
    assert train.worker_resources(TrainConfig(data="d", out="o", cpus_per_worker=3), [16]) == (3, 3)


def test_workers_sharing_a_gpu_talk_over_gloo():
    base = {"data": "d", "out": "o", "use_gpu": True, "num_workers": 2}
    gpu = load_config(TrainConfig, overrides=base)
    shared = load_config(TrainConfig, overrides={**base, "gpus_per_worker": 0.5})
    assert train.collective_backend(gpu) == "nccl"
    assert train.collective_backend(shared) == "gloo"  # NCCL refuses two ranks on one device
    assert train.collective_backend(TrainConfig(data="d", out="o")) == "gloo"
    assert train.worker_bundle(shared, 1.0) == {"CPU": 1.0, "GPU": 0.5}
    assert train.worker_bundle(TrainConfig(data="d", out="o"), 0.5) == {"CPU": 0.5}
    train.check_gpu_count(shared, 1.0)  # 2 workers x 0.5 share the one GPU
    with pytest.raises(RaysegError, match="needs 2 GPUs; the cluster has 1 "):
        train.check_gpu_count(gpu, 1.0)
    with pytest.raises(RaysegError, match="needs 1 GPUs; the cluster has 0 "):
        train.check_gpu_count(shared, 0)
    with pytest.raises(RaysegError, match="gpus_per_worker"):
        load_config(TrainConfig, overrides={**base, "gpus_per_worker": 2})


def test_data_tasks_fit_beside_fractional_workers():
    assert train.data_task_cpus(1.0) == 1.0
    assert train.data_task_cpus(7.0) == 1.0
    assert train.data_task_cpus(0.5) == 0.5
    assert train.data_task_cpus(1.75) == 0.25


def test_data_tasks_per_worker_share_the_cpus_left():
    assert train.data_tasks_per_worker(1.0, 1.0, 1) == 1  # 2 CPUs, a worker holding 1
    assert train.data_tasks_per_worker(12.0, 1.0, 4) == 3
    assert train.data_tasks_per_worker(3.0, 0.5, 2) == 3
    assert train.data_tasks_per_worker(1.0, 1.0, 4) == 1  # fewer than workers: 1 each, queued


def test_prestart_counts_are_what_each_node_can_run_up_to_the_run_s_tasks():
    assert train.prestart_counts({"a": 2.0}, 1.0, 1) == {"a": 1}  # 2 CPUs, 1 worker of 1
    assert train.prestart_counts({"a": 16.0, "b": 16.0}, 1.0, 30) == {"a": 16, "b": 16}
    assert train.prestart_counts({"a": 2.0, "b": 1.0}, 0.5, 3) == {"a": 3, "b": 2}
    assert train.prestart_counts({"a": 4.0, "gpu-less-cpu-less": 0.0}, 1.0, 2) == {"a": 2}


def test_gpu_workers_with_few_cpus_left_for_data_get_a_note():
    gpu = TrainConfig(data="d", out="o", use_gpu=True, num_workers=2)
    assert train.data_cpus_note(gpu, 6, 1.0) is None  # 4 left: 2 per GPU
    note = train.data_cpus_note(gpu, 4, 1.0)
    assert note.startswith("note: 2 CPUs are left to load data for 2 GPUs (1.0 per GPU)")
    assert train.data_cpus_note(TrainConfig(data="d", out="o"), 2, 1.0) is None  # CPU training


def test_unknown_config_key_names_the_nearest():
    with pytest.raises(RaysegError, match="did you mean 'epochs'"):
        load_config(TrainConfig, None, {"data": "d", "out": "o", "epoch": 3})
    with pytest.raises(RaysegError, match="'batch_size' must be an integer"):
        load_config(TrainConfig, None, {"data": "d", "out": "o", "batch_size": "eight"})


def test_storage_probe_reports_an_invisible_marker(tmp_path):
    assert cluster._probe_storage(str(tmp_path), "missing-marker") is not None
    (tmp_path / "marker").write_text("ok")
    assert cluster._probe_storage(str(tmp_path), "marker") is None


# ---- bad input, refused before any worker starts ----------------------------------------------


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> Path:
    return write_masks(tmp_path_factory.mktemp("masks"), 30, bad=BAD_ROWS)


def test_refuses_crop_larger_than_every_image(masks, tmp_path):
    with pytest.raises(RaysegError, match="larger than every image"):
        train.run_train(config(masks, tmp_path / "run", crop_size=100))


def test_refuses_empty_dataset(tmp_path):
    from rayseg import storage

    folder = tmp_path / "empty" / "parquet"
    folder.mkdir(parents=True)
    storage.write_parquet(
        storage.locate(str(folder / "part-00000.parquet")), storage.mask_table([], META)
    )
    with pytest.raises(RaysegError, match="empty"):
        train.run_train(config(tmp_path / "empty", tmp_path / "run"))


def test_refuses_unwritable_storage(masks, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RaysegError, match="cannot create output folder|not writable"):
        train.run_train(config(masks, blocker / "run"))


def test_refuses_a_run_dir_it_did_not_make(masks, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.yaml").write_text("the user's own\n")
    with pytest.raises(RaysegError, match=r"no rayseg run made it \(it holds config.yaml\)"):
        train.run_train(config(masks, run))
    assert (run / "config.yaml").read_text() == "the user's own\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    with pytest.raises(RaysegError, match="is the input --data"):
        train.run_train(config(masks, masks))


def test_refuses_unknown_model_and_classes(masks, tmp_path):
    with pytest.raises(RaysegError, match="unknown; choose one of"):
        train.run_train(config(masks, tmp_path / "run", model="unet"))
    with pytest.raises(RaysegError, match="not in the masks' mapping"):
        train.run_train(config(masks, tmp_path / "run", classes="1,2"))


def test_refuses_val_data_with_another_mapping(masks, tmp_path):
    other = {**META, "classes": [{"value": 5, "category_id": 5, "name": "plane"}]}
    val = write_masks(tmp_path / "val", 4, meta=other)
    with pytest.raises(RaysegError, match="map classes differently"):
        train.run_train(config(masks, tmp_path / "run", val_data=str(val)))


# ---- on local Ray -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(ray_local, masks, tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    summary = train.run_train(config(masks, run))
    return run, summary


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_train_and_loss_goes_down(trained):
    run, summary = trained
    rows = history(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["loss"] < rows[0]["loss"]
    assert all(r["world_size"] == 2 and 0 <= r["val_miou"] <= 1 for r in rows)
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in rows)
    # Every planned batch trained, the first ones made before the workers started included.
    assert rows[0]["steps"] == rows[1]["steps"] > 0
    assert all(r["images"] == r["steps"] * 4 * 2 for r in rows)
    assert set(rows[0]["val_iou"]) == {"background", "square", "disc"}
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["epochs"] == 2


def test_checkpoints_and_export(trained):
    run, _ = trained
    assert (run / "epoch_0002" / "checkpoint.pt").exists()
    header = json.loads((run / "epoch_0002" / "checkpoint.json").read_text())
    assert header["model"] == "lraspp_mobilenet_v3_large" and header["epoch"] == 2
    model, info = load_model(str(run / "model.pt"))
    assert info["class_map"] == class_map_from_meta(META)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 48, 64))["out"].shape == (1, 3, 48, 64)


def test_undecodable_rows_are_counted_and_listed(trained):
    run, summary = trained
    listed = {s["image_id"] for s in summary["skipped"]}
    # Every bad row sits in training or validation; each is reported with its reason.
    assert listed == set(BAD_ROWS) and summary["skipped_rows"] == 2
    saved = json.loads((run / "summary.json").read_text())
    reasons = {s["image_id"]: s["reason"] for s in saved["skipped"]}
    assert reasons == {104: "image does not decode", 109: ingest.PROBLEMS[3]}


def test_checkpoint_of_another_model_or_classes_is_refused(trained, masks):
    run, _ = trained
    with pytest.raises(RaysegError, match="lraspp_mobilenet_v3_large checkpoint, not"):
        train.run_train(config(masks, run, model="deeplabv3_mobilenet_v3_large", epochs=3))
    with pytest.raises(RaysegError, match="was trained on classes"):
        train.run_train(config(masks, run, classes="3", epochs=3))


def test_gpu_request_without_gpus_is_refused(trained, masks, tmp_path):
    with pytest.raises(RaysegError, match="the Ray cluster has no GPUs"):
        train.run_train(config(masks, tmp_path / "run", use_gpu=True))


def test_rerun_with_more_epochs_resumes(trained, masks, capsys):
    run, _ = trained
    first = history(run)
    summary = train.run_train(config(masks, run, epochs=3))
    out = capsys.readouterr().out
    assert "resuming from" in out and "2 of 3 epochs done" in out
    rows = history(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[:2] == first
    assert (run / "epoch_0003" / "checkpoint.pt").exists() and summary["epochs"] == 3
    _, info = load_model(str(run))
    assert info["source"].endswith("model.pt")
    again = train.run_train(config(masks, run, epochs=3))
    assert "nothing to train" in capsys.readouterr().out and again["epochs"] == 3


def test_a_part_rewritten_after_the_scan_ends_training_with_one_line(
    ray_local, tmp_path, monkeypatch
):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(write_masks(tmp_path / "masks", 12), data)
    other = write_masks(tmp_path / "other", 12, bad={101: "image"})  # same ids, other pixels
    launch = train.launch

    def rewriting_a_part(cfg, checked):  # as if another job rewrote the data meanwhile
        part = "parquet/part-00001.parquet"
        shutil.copyfile(other / part, data / part)
        launch(cfg, checked)

    monkeypatch.setattr(train, "launch", rewriting_a_part)
    with pytest.raises(RaysegError) as e:
        train.run_train(config(data, tmp_path / "run", num_workers=1, epochs=1))
    line = str(e.value)
    assert line.startswith(f"{data / 'parquet' / 'part-00001.parquet'}: the data changed while")
    assert "\n" not in line and "Traceback" not in line


@pytest.mark.skipif(not COCO_SAMPLE.exists(), reason="../shared/data/coco_sample not present")
def test_real_coco_images_end_to_end(ray_local, tmp_path):
    from rayseg.config import MasksConfig, SubsetConfig
    from rayseg.masks import run_masks
    from rayseg.subset import run_subset

    images = str(COCO_SAMPLE / "images")
    subset = tmp_path / "subset.json"
    run_subset(
        SubsetConfig(
            annotations=str(COCO_SAMPLE / "annotations.json"),
            out=str(subset),
            num_images=24,
            images_dir=images,
        )
    )
    run_masks(
        MasksConfig(
            annotations=str(subset),
            out=str(tmp_path / "masks"),
            images_dir=images,
            crowd="ignore",
            shard_size=12,
        )
    )
    summary = train.run_train(
        TrainConfig(
            data=str(tmp_path / "masks"),
            out=str(tmp_path / "run"),
            epochs=1,
            batch_size=4,
            crop_size=96,
            num_workers=1,
            classes="voc",
            val_fraction=0.2,
            max_failures=0,
        )
    )
    assert summary["epochs"] == 1 and summary["skipped_rows"] == 0
    model, info = load_model(str(tmp_path / "run"))
    assert info["class_map"].names[0] == "background"
    assert info["class_map"].num_classes <= 21
