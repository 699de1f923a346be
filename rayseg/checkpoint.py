"""The run directory's files: training checkpoints and the exported model; their only home.

An export (RUN/model.pt) is one `torch.save` dict: format, model (builder name), num_classes,
aux_loss, class_map (ClassMap.to_dict) and state_dict, plus epoch when it came from training. A
checkpoint (RUN/epoch_NNNN/checkpoint.pt) is the same record with optimizer, scheduler and
metrics added, and a small checkpoint.json header beside it. Local paths or s3:// URIs; no Ray.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from rayseg import storage
from rayseg.errors import RaysegError
from rayseg.models import ClassMap, build_model, has_aux

EXPORT_FORMAT = "rayseg-model/1"
EXPORT_NAME = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREFIX = "epoch_"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def model_record(
    model: nn.Module, *, name: str, class_map: ClassMap, aux_loss: bool
) -> dict[str, Any]:
    """What rebuilds the model: builder name, classes, aux flag, weights (SyncBN-free)."""
    return {
        "format": EXPORT_FORMAT,
        "model": name,
        "num_classes": class_map.num_classes,
        "aux_loss": has_aux(name, aux_loss),
        "class_map": class_map.to_dict(),
        "state_dict": cpu_state_dict(model),
    }


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_model(
    uri: str, model: nn.Module, *, name: str, class_map: ClassMap, aux_loss: bool
) -> None:
    """Export for use without Ray: one torch.save file, written atomically (local or s3://)."""
    record = model_record(model, name=name, class_map=class_map, aux_loss=aux_loss)
    storage.write_bytes(storage.locate(uri), to_bytes(record))


def read_record(loc: storage.Location) -> dict[str, Any]:
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(loc)), map_location="cpu")
    except (OSError, RuntimeError, EOFError) as e:
        raise RaysegError(f"{loc.uri}: cannot read model ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        raise RaysegError(f"{loc.uri}: not a rayseg model export or checkpoint")
    return obj


def find_model_file(uri: str) -> storage.Location:
    """A file as given; a run dir -> RUN/model.pt, else its latest epoch checkpoint."""
    loc = storage.locate(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == storage.pafs.FileType.File:
        return loc
    if info.type == storage.pafs.FileType.NotFound:
        raise RaysegError(f"{uri}: no such model file or run directory")
    export = loc.join(EXPORT_NAME)
    if storage.exists(export):
        return export
    latest = latest_checkpoint_dir(loc)
    if latest is None:
        raise RaysegError(f"{uri}: no {EXPORT_NAME} and no checkpoints in this run directory")
    return latest.join(CHECKPOINT_FILE)


def latest_checkpoint_dir(run: storage.Location) -> storage.Location | None:
    """The highest `epoch_NNNN` folder holding a checkpoint directly inside the run dir."""
    selector = storage.pafs.FileSelector(run.path, allow_not_found=True)
    names = sorted(
        i.base_name
        for i in run.fs.get_file_info(selector)
        if i.type == storage.pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
    )
    for name in reversed(names):
        if storage.exists(run.join(name, CHECKPOINT_FILE)):
            return run.join(name)
    return None


def model_from_record(record: dict[str, Any], *, where: str) -> tuple[nn.Module, ClassMap]:
    class_map = ClassMap.from_dict(record["class_map"])
    model = build_model(record["model"], record["num_classes"], aux_loss=record["aux_loss"])
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise RaysegError(f"{where}: weights do not fit {record['model']} ({first})") from None
    return model, class_map


def load_model(uri: str, *, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """An export file or a run directory -> (model in eval mode on `device`, info).

    info: "model" (builder name), "class_map" (ClassMap), "num_classes", "aux_loss", "source"
    (the file read), and "epoch" when it came from a training checkpoint.
    """
    loc = find_model_file(uri)
    record = read_record(loc)
    model, class_map = model_from_record(record, where=loc.uri)
    info = {
        "model": record["model"],
        "class_map": class_map,
        "num_classes": record["num_classes"],
        "aux_loss": record["aux_loss"],
        "source": loc.uri,
    }
    if "epoch" in record:
        info["epoch"] = record["epoch"]
    return model.to(device).eval(), info
