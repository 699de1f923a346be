"""The run directory's files: checkpoints, metrics history and the exported model; their only home.

Inputs: models, optimizers and records from training (rayseg.train, rayseg.loop). Outputs, in a
run directory RUN (local path or s3:// URI):
- RUN/model.pt, the export: one `torch.save` dict: format, model (builder name), num_classes,
  aux_loss, class_map (ClassMap.to_dict) and state_dict, plus epoch when it came from training.
  write_export is its one writer (save_model and export_final both go through it).
- RUN/epoch_NNNN/checkpoint.pt: the same record with optimizer, scheduler and metrics added, and
  a small checkpoint.json header beside it (model, class_map, epoch).
- RUN/metrics.jsonl (one line per epoch) and RUN/curves.png (loss and validation mIoU).
- RUN/config.yaml, RUN/split.json and RUN/summary.json.
- RUN/checkpoint_manager_snapshot.json is Ray Train's list of the checkpoints it registered;
  resume_point drops from it the checkpoints that no longer load (its format is Ray Train's
  private state, so raycompat.sync_train_snapshot reads and writes it).
No Ray.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rayseg import raycompat, storage
from rayseg.config import TrainConfig, dump_yaml
from rayseg.errors import RaysegError
from rayseg.loop import TrainingState
from rayseg.models import ClassMap, build_model, has_aux, load_weights_only
from rayseg.records import Problem

EXPORT_FORMAT = "rayseg-model/1"
EXPORT_NAME = "model.pt"
# What an export keeps of a record; a checkpoint adds optimizer, scheduler and metrics.
EXPORT_KEYS = ("format", "model", "num_classes", "aux_loss", "class_map", "state_dict", "epoch")
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_INFO = "checkpoint.json"
CHECKPOINT_PREFIX = "epoch_"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
CONFIG_NAME = "config.yaml"
SPLIT_NAME = "split.json"
SUMMARY_NAME = "summary.json"
# What restore needs of a checkpoint record, beyond the export's keys.
RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "epoch")


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


def write_export(loc: storage.Location, record: dict[str, Any]) -> None:
    """The one writer of model.pt: the record without training state, written atomically."""
    storage.write_bytes(loc, to_bytes({k: record[k] for k in EXPORT_KEYS if k in record}))


def save_model(
    uri: str, model: nn.Module, *, name: str, class_map: ClassMap, aux_loss: bool
) -> None:
    """Export for use without Ray: one torch.save file (local or s3://)."""
    write_export(
        storage.locate(uri), model_record(model, name=name, class_map=class_map, aux_loss=aux_loss)
    )


def read_record(loc: storage.Location) -> dict[str, Any]:
    try:
        obj = load_weights_only(storage.read_bytes(loc), loc.uri)
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


def checkpoint_dirs(run: storage.Location) -> list[storage.Location]:
    """The `epoch_NNNN` folders holding a checkpoint directly inside the run dir, newest first."""
    selector = storage.pafs.FileSelector(run.path, allow_not_found=True)
    names = sorted(
        i.base_name
        for i in run.fs.get_file_info(selector)
        if i.type == storage.pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
    )
    found = [run.join(name) for name in reversed(names)]
    return [loc for loc in found if storage.exists(loc.join(CHECKPOINT_FILE))]


# What `rayseg train` puts at the top of a run directory (its epoch_NNNN folders besides).
RUN_WRITES = (
    CONFIG_NAME, SPLIT_NAME, METRICS_NAME, CURVES_NAME, SUMMARY_NAME, EXPORT_NAME,
    raycompat.TRAIN_SNAPSHOT,
)  # fmt: skip


def is_run_dir(run: storage.Location) -> bool:
    """A run directory an earlier `rayseg train` made: a checkpoint, or its config and split."""
    made = all(storage.exists(run.join(name)) for name in (CONFIG_NAME, SPLIT_NAME))
    return made or bool(checkpoint_dirs(run))


def latest_checkpoint_dir(run: storage.Location) -> storage.Location | None:
    """The highest `epoch_NNNN` folder holding a checkpoint directly inside the run dir."""
    folders = checkpoint_dirs(run)
    return folders[0] if folders else None


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


# ---- training checkpoints: RUN/epoch_NNNN/ -----------------------------------------------------


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def checkpoint_header(name: str, class_map: ClassMap, epoch: int) -> dict[str, Any]:
    return {"model": name, "class_map": class_map.to_dict(), "epoch": epoch}


def write_checkpoint(
    folder: str,
    state: TrainingState,
    record: dict[str, Any],
    *,
    cfg: TrainConfig,
    class_map: ClassMap,
) -> None:
    """checkpoint.pt (the export record + training state + the epoch's metrics) and a small
    checkpoint.json header, in a local `folder` (Ray Train persists it as RUN/epoch_NNNN)."""
    name, epoch = cfg.model, record["epoch"]
    model, optimizer, scheduler = state
    saved = model_record(model, name=name, class_map=class_map, aux_loss=cfg.aux_loss)
    saved.update(
        epoch=epoch,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        metrics={k: v for k, v in record.items() if k != "skipped"},
    )
    torch.save(saved, os.path.join(folder, CHECKPOINT_FILE))
    with open(os.path.join(folder, CHECKPOINT_INFO), "w") as f:
        json.dump(checkpoint_header(name, class_map, epoch), f)


def check_same_run(header: dict[str, Any], *, model: str, class_map: ClassMap, where: str) -> None:
    """A checkpoint of another model or class mapping cannot be resumed: say which differs."""
    if header["model"] != model:
        raise RaysegError(
            f"{where} holds a {header['model']} checkpoint, not {model}; "
            "use another --out or the same --model"
        )
    theirs = ClassMap.from_dict(header["class_map"])
    if theirs != class_map:
        raise RaysegError(
            f"{where} was trained on classes {list(theirs.names[1:])} "
            f"(mask values {list(theirs.mask_values)}), not {list(class_map.names[1:])} "
            f"(mask values {list(class_map.mask_values)}); use another --out or the same "
            "--classes and masks"
        )


def restore(folder: str, state: TrainingState, *, name: str, class_map: ClassMap) -> int:
    """Load a checkpoint folder into model, optimizer and scheduler; returns its epochs."""
    model, optimizer, scheduler = state
    saved = read_record(storage.locate(os.path.join(folder, CHECKPOINT_FILE)))
    check_same_run(saved, model=name, class_map=class_map, where=folder)
    unwrap(model).load_state_dict(saved["state_dict"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return int(saved["epoch"])


@dataclass(frozen=True)
class ResumePoint:
    """Where training continues: the newest checkpoint that loads, and the newer ones that don't."""

    epochs: int = 0  # epochs it holds (0: train from the start)
    uri: str | None = None  # its folder, RUN/epoch_NNNN
    skipped: tuple[tuple[str, str], ...] = ()  # (folder name, why it does not load)

    @property
    def name(self) -> str | None:
        return dir_name(self.uri) if self.uri else None


def dir_name(path: str) -> str:
    """`epoch_0003` of a checkpoint folder's path or URI (the names sort by epoch)."""
    return path.rstrip("/").rpartition("/")[2]


def epoch_of_dir(name: str) -> int:
    """3 for `epoch_0003`; 0 for a name that is not a checkpoint folder's."""
    digits = name.removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else 0


def load_for_resume(folder: storage.Location) -> tuple[dict[str, Any] | None, str]:
    """(the checkpoint record, "") if folder/checkpoint.pt loads and can be resumed, else
    (None, why not)."""
    try:
        record = load_weights_only(
            storage.read_bytes(folder.join(CHECKPOINT_FILE)), CHECKPOINT_FILE
        )
    except RaysegError as e:
        return None, f"{CHECKPOINT_FILE} does not load: {str(e).split(': ', 1)[1]}"
    except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, and said so
        # torch's messages run on with advice; their first sentence says what is wrong.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        return None, f"{CHECKPOINT_FILE} does not load: {first.rstrip('.')}"
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        return None, f"{CHECKPOINT_FILE} is not a rayseg checkpoint"
    missing = [k for k in RESUME_KEYS if k not in record]
    if missing:
        return None, f"{CHECKPOINT_FILE} lacks {', '.join(missing)}"
    return record, ""


def resume_point(run: storage.Location, *, model: str, class_map: ClassMap) -> ResumePoint:
    """The newest checkpoint in the run dir that loads (read whole), and the newer ones that do
    not; Ray Train's snapshot is made to agree. Another model or class mapping is an error."""
    folders = checkpoint_dirs(run)
    skipped: list[tuple[str, str]] = []
    point = ResumePoint()
    for folder in folders:
        record, why = load_for_resume(folder)
        if record is None:
            skipped.append((dir_name(folder.path), why))
            continue
        check_same_run(record, model=model, class_map=class_map, where=folder.uri)
        point = ResumePoint(int(record["epoch"]), folder.uri)
        break
    keep = {dir_name(f.path) for f in folders} - {name for name, _ in skipped}
    raycompat.sync_train_snapshot(run, keep)
    return ResumePoint(point.epochs, point.uri, tuple(skipped))


def export_final(run: storage.Location) -> dict[str, Any]:
    """RUN/model.pt from the newest checkpoint that loads; returns that checkpoint's record."""
    for folder in checkpoint_dirs(run):
        record, _ = load_for_resume(folder)
        if record is not None:
            write_export(run.join(EXPORT_NAME), record)
            return record
    raise RaysegError(f"{run.uri}: training wrote no checkpoint")


# ---- history, run files: RUN/metrics.jsonl, curves.png, config.yaml, split.json, summary.json --


def plot_curves(history: list[dict[str, Any]]) -> bytes:
    """PNG of training loss and validation mIoU per epoch (curves_figure)."""
    buf = io.BytesIO()
    curves_figure(history).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curves_figure(history: list[dict[str, Any]]):
    """A matplotlib Figure: training loss and validation mIoU per epoch, whole-epoch ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.5), layout="tight")
    FigureCanvasAgg(fig)
    ax_loss, ax_miou = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_miou.plot(epochs, [r["val_miou"] for r in history], marker="o", color="tab:green")
    ax_miou.set(xlabel="epoch", ylabel="mIoU", title="validation mIoU", ylim=(0, 1))
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
        # Epochs are whole: ticks 1, 2, ... (one epoch used to get 0.96 ... 1.04).
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    return fig


def read_history(run: storage.Location, *, upto_epoch: int) -> list[dict[str, Any]]:
    """metrics.jsonl lines of epochs <= upto_epoch (later ones belong to a lost attempt)."""
    loc = run.join(METRICS_NAME)
    if not storage.exists(loc):
        return []
    lines = storage.read_bytes(loc).decode().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def write_history(run: storage.Location, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in history)
    storage.write_bytes(run.join(METRICS_NAME), text.encode())
    storage.write_bytes(run.join(CURVES_NAME), plot_curves(history))


def write_run_files(
    run: storage.Location,
    cfg: TrainConfig,
    *,
    data_uri: str,
    val_data_uri: str,
    train_images: int,
    val_ids: Iterable[int],
) -> None:
    """config.yaml (the resolved config) and split.json (which images validate)."""
    storage.write_bytes(run.join(CONFIG_NAME), dump_yaml(cfg).encode())
    split = {
        "data": data_uri,
        "val_data": val_data_uri,
        "val_fraction": None if cfg.val_data else cfg.val_fraction,
        "seed": cfg.seed,
        "train_images": train_images,
        "val_image_ids": [int(i) for i in val_ids],
    }
    storage.write_json(run.join(SPLIT_NAME), split)


def run_summary(run: storage.Location, history: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's numbers: the last epoch, the best mIoU, every row ever skipped."""
    skipped: dict[int, Problem] = {}
    for rec in history:
        skipped.update({s["image_id"]: Problem.from_dict(s) for s in rec.get("skipped", [])})
    last = history[-1] if history else {}
    return {
        "run": run.uri,
        "model_file": run.join(EXPORT_NAME).uri,
        "epochs": last.get("epoch", 0),
        "val_miou": last.get("val_miou"),
        "best_val_miou": max((r["val_miou"] for r in history), default=None),
        "images_per_s": last.get("images_per_s"),
        "data_wait_fraction": last.get("data_wait_fraction"),
        "skipped_rows": len(skipped),
        "skipped": [p.to_dict() for _, p in sorted(skipped.items())],
    }


def write_summary(run: storage.Location, summary: dict[str, Any]) -> None:
    storage.write_json(run.join(SUMMARY_NAME), summary)
