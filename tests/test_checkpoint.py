"""rayseg.checkpoint: the run directory's files, written and read back without Ray.

A run directory in tmp_path gets one epoch_0002 checkpoint of LR-ASPP (3 classes) as Ray Train
would persist it; resume, the export and load_model must all agree with the model that wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mask_data import category_meta
from test_raycompat import ray_snapshot  # Ray Train V2's snapshot file, as it writes it

from rayseg import checkpoint, loop, raycompat, storage
from rayseg.config import TrainConfig
from rayseg.errors import RaysegError
from rayseg.models import class_map_from_meta, forward_logits

META = category_meta({1: "square", 2: "disc"})
CLASS_MAP = class_map_from_meta(META)
CFG = TrainConfig(data="d", out="o", model="lraspp_mobilenet_v3_large", epochs=3)
X = torch.randn(1, 3, 32, 32)


class Payload:
    """A pickle that, if unpickled with code allowed, creates the folder `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def state(seed: int) -> loop.TrainingState:
    torch.manual_seed(seed)
    return loop.build_training(
        CFG, CLASS_MAP.num_classes, 4, torch.device("cpu"), world_size=1, channels_last=False
    )


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return forward_logits(model.eval(), X)


@pytest.fixture
def run(tmp_path):
    """A run dir with epoch_0002/ (checkpoint.pt + checkpoint.json), one LR step in."""
    written = state(seed=1)
    written[1].step()
    written[2].step()  # the scheduler's position must survive too
    folder = tmp_path / "run" / checkpoint.checkpoint_dir_name(2)
    folder.mkdir(parents=True)
    record = {"epoch": 2, "loss": 0.5, "skipped": [{"image_id": 3, "reason": "x"}]}
    checkpoint.write_checkpoint(str(folder), written, record, cfg=CFG, class_map=CLASS_MAP)
    return storage.locate(str(tmp_path / "run")), written


def test_checkpoint_header_and_resume_point(run):
    loc, _ = run
    header = storage.read_json(checkpoint.latest_checkpoint_dir(loc).join("checkpoint.json"))
    assert header == checkpoint.checkpoint_header(CFG.model, CLASS_MAP, 2)
    point = checkpoint.resume_point(loc, model=CFG.model, class_map=CLASS_MAP)
    assert (point.epochs, point.name, point.skipped) == (2, "epoch_0002", ())


def test_another_model_or_classes_is_refused(run):
    loc, _ = run
    with pytest.raises(RaysegError, match="lraspp_mobilenet_v3_large checkpoint, not fcn"):
        checkpoint.resume_point(loc, model="fcn_resnet50", class_map=CLASS_MAP)
    other = class_map_from_meta(META, "2")
    with pytest.raises(RaysegError, match=r"was trained on classes \['square', 'disc'\]"):
        checkpoint.resume_point(loc, model=CFG.model, class_map=other)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "does not load: "),
        (lambda p: p.write_bytes(b""), "does not load: "),
        (lambda p: torch.save({"format": checkpoint.EXPORT_FORMAT}, p), "lacks state_dict"),
        # Issue 21: a pickle payload is refused unrun (even with torch's env override set).
        (lambda p: torch.save({"x": Payload(p.parent / "ran")}, p), "does not load: refused"),
    ],
    ids=["truncated", "empty", "export-only", "pickle-payload"],
)
def test_unreadable_newest_checkpoint_is_skipped_for_the_previous_one(
    run, damage, why, monkeypatch
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    loc, written = run
    newer = loc.join("epoch_0003")
    storage.make_dirs(newer)
    record = {"epoch": 3, "loss": 0.4}
    checkpoint.write_checkpoint(newer.path, written, record, cfg=CFG, class_map=CLASS_MAP)
    damage(Path(newer.path, checkpoint.CHECKPOINT_FILE))
    storage.write_json(loc.join(raycompat.TRAIN_SNAPSHOT), ray_snapshot("epoch_0002", "epoch_0003"))

    point = checkpoint.resume_point(loc, model=CFG.model, class_map=CLASS_MAP)
    assert (point.epochs, point.name) == (2, "epoch_0002")
    ((name, reason),) = point.skipped
    assert name == "epoch_0003" and reason.startswith("checkpoint.pt ") and why in reason
    assert not Path(newer.path, "ran").exists() and "weights_only" not in reason
    # Ray Train's snapshot forgets it: it would hand it to the workers again.
    snapshot = storage.read_json(loc.join(raycompat.TRAIN_SNAPSHOT))
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == ["epoch_0002"]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "epoch_0002"
    assert checkpoint.export_final(loc)["epoch"] == 2


def test_without_a_loadable_checkpoint_training_starts_afresh(run):
    loc, _ = run
    (Path(loc.path) / "epoch_0002" / "checkpoint.pt").write_bytes(b"x")
    storage.write_json(loc.join(raycompat.TRAIN_SNAPSHOT), ray_snapshot("epoch_0002"))
    point = checkpoint.resume_point(loc, model=CFG.model, class_map=CLASS_MAP)
    assert (point.epochs, point.uri, [n for n, _ in point.skipped]) == (0, None, ["epoch_0002"])
    snapshot = storage.read_json(loc.join(raycompat.TRAIN_SNAPSHOT))
    assert snapshot["checkpoint_results"] == [] and snapshot["latest_checkpoint_result"] is None


def test_a_cut_short_ray_snapshot_is_removed(run):
    loc, _ = run
    storage.write_bytes(loc.join(raycompat.TRAIN_SNAPSHOT), b'{"ray_version": "2.6')
    assert checkpoint.resume_point(loc, model=CFG.model, class_map=CLASS_MAP).epochs == 2
    assert not storage.exists(loc.join(raycompat.TRAIN_SNAPSHOT))


def test_restore_brings_back_weights_optimizer_and_schedule(run):
    loc, written = run
    fresh = state(seed=2)
    assert not torch.allclose(outputs(fresh[0]), outputs(written[0]))
    folder = loc.join("epoch_0002").path
    assert checkpoint.restore(folder, fresh, name=CFG.model, class_map=CLASS_MAP) == 2
    assert torch.allclose(outputs(fresh[0]), outputs(written[0]))
    assert fresh[2].last_epoch == written[2].last_epoch == 1
    assert fresh[1].state_dict()["param_groups"] == written[1].state_dict()["param_groups"]


def test_export_drops_training_state_and_loads_like_save_model(run, tmp_path):
    loc, written = run
    record = checkpoint.export_final(loc)
    assert record["metrics"] == {"epoch": 2, "loss": 0.5}  # skipped rows live in metrics.jsonl
    exported = torch.load(loc.join(checkpoint.EXPORT_NAME).path)
    assert set(exported) == set(checkpoint.EXPORT_KEYS) and exported["epoch"] == 2
    saved = tmp_path / "saved.pt"
    checkpoint.save_model(
        str(saved), written[0], name=CFG.model, class_map=CLASS_MAP, aux_loss=CFG.aux_loss
    )
    assert set(torch.load(saved)) == set(checkpoint.EXPORT_KEYS) - {"epoch"}
    for uri in (loc.uri, str(saved)):
        model, info = checkpoint.load_model(uri)
        assert info["class_map"] == CLASS_MAP and not model.training
        assert torch.allclose(outputs(model), outputs(written[0]))
    assert checkpoint.load_model(loc.uri)[1]["epoch"] == 2


def test_export_without_checkpoints_is_an_error(tmp_path):
    with pytest.raises(RaysegError, match="training wrote no checkpoint"):
        checkpoint.export_final(storage.locate(str(tmp_path)))


def test_history_round_trip_drops_epochs_of_a_lost_attempt(tmp_path):
    loc = storage.locate(str(tmp_path))
    assert checkpoint.read_history(loc, upto_epoch=5) == []
    rows = [{"epoch": e, "loss": 1.0 / e, "val_miou": 0.1 * e} for e in (1, 2, 3)]
    checkpoint.write_history(loc, rows)
    assert checkpoint.read_history(loc, upto_epoch=2) == rows[:2]
    assert (tmp_path / checkpoint.CURVES_NAME).read_bytes()[:4] == b"\x89PNG"


def test_run_summary_lists_every_skipped_row_once(tmp_path):
    loc = storage.locate(str(tmp_path))
    history = [
        {"epoch": 1, "val_miou": 0.4, "skipped": [{"image_id": 9, "reason": "a"}]},
        {"epoch": 2, "val_miou": 0.3, "skipped": [{"image_id": 9, "reason": "a"}]},
    ]
    summary = checkpoint.run_summary(loc, history)
    assert summary["epochs"] == 2 and summary["best_val_miou"] == 0.4
    assert summary["skipped"] == [{"image_id": 9, "reason": "a"}] and summary["skipped_rows"] == 1
    checkpoint.write_summary(loc, summary)
    assert json.loads((tmp_path / checkpoint.SUMMARY_NAME).read_text()) == summary


def test_run_files_hold_the_resolved_config_and_the_split(tmp_path):
    from rayseg.config import load_config

    loc = storage.locate(str(tmp_path))
    cfg = TrainConfig(data="d", out="o", val_fraction=0.25, seed=7)
    checkpoint.write_run_files(
        loc, cfg, data_uri="d", val_data_uri="d", train_images=6, val_ids=[np.int64(3), 5]
    )
    again = load_config(TrainConfig, str(tmp_path / checkpoint.CONFIG_NAME), {})
    assert again == cfg
    split = json.loads((tmp_path / checkpoint.SPLIT_NAME).read_text())
    assert split == {
        "data": "d",
        "val_data": "d",
        "val_fraction": 0.25,
        "seed": 7,
        "train_images": 6,
        "val_image_ids": [3, 5],
    }


def test_epoch_of_dir_reads_checkpoint_folder_names():
    assert checkpoint.epoch_of_dir(checkpoint.checkpoint_dir_name(12)) == 12
    assert checkpoint.epoch_of_dir("epoch_x") == checkpoint.epoch_of_dir("model.pt") == 0
