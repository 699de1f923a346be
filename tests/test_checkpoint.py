"""rayseg.checkpoint: the run directory's files, written and read back without Ray.

A run directory in tmp_path gets one epoch_0002 checkpoint of LR-ASPP (3 classes) as Ray Train
would persist it; resume, the export and load_model must all agree with the model that wrote it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mask_data import category_meta

from rayseg import checkpoint, loop, storage
from rayseg.config import TrainConfig
from rayseg.errors import RaysegError
from rayseg.models import class_map_from_meta, forward_logits

META = category_meta({1: "square", 2: "disc"})
CLASS_MAP = class_map_from_meta(META)
CFG = TrainConfig(data="d", out="o", model="lraspp_mobilenet_v3_large", epochs=3)
X = torch.randn(1, 3, 32, 32)


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


def test_checkpoint_header_and_done_epochs(run):
    loc, _ = run
    header = storage.read_json(checkpoint.latest_checkpoint_dir(loc).join("checkpoint.json"))
    assert header == checkpoint.checkpoint_header(CFG.model, CLASS_MAP, 2)
    assert checkpoint.done_epochs(loc, model=CFG.model, class_map=CLASS_MAP)[0] == 2


def test_done_epochs_without_header_reads_the_checkpoint(run):
    loc, _ = run
    storage.delete(loc.join("epoch_0002", checkpoint.CHECKPOINT_INFO))
    done, latest = checkpoint.done_epochs(loc, model=CFG.model, class_map=CLASS_MAP)
    assert done == 2 and latest.endswith("epoch_0002")


def test_another_model_or_classes_is_refused(run):
    loc, _ = run
    with pytest.raises(RaysegError, match="lraspp_mobilenet_v3_large checkpoint, not fcn"):
        checkpoint.done_epochs(loc, model="fcn_resnet50", class_map=CLASS_MAP)
    other = class_map_from_meta(META, "2")
    with pytest.raises(RaysegError, match=r"was trained on classes \['square', 'disc'\]"):
        checkpoint.done_epochs(loc, model=CFG.model, class_map=other)


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
