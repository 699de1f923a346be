"""Training: data-parallel training of a torchvision segmentation model with Ray Train (V2).

Inputs: a TrainConfig; masks Parquet from `rayseg masks` (--data, optionally --val-data).
Outputs: the run directory --out (local or s3://; format in rayseg.checkpoint): model.pt,
metrics.jsonl, curves.png, config.yaml, split.json, summary.json and Ray Train's epoch_NNNN/
checkpoints. Running the same command again with more epochs resumes from the newest checkpoint
that loads (a newer, unreadable one is skipped and said so).

run_train(cfg) runs on the driver: it checks data, classes, crop, storage and any earlier run
before a worker starts, plans how many data tasks each worker runs, runs TorchTrainer, and
exports RUN/model.pt. train_loop_per_worker runs on each worker: the plain PyTorch loop of
rayseg.loop around a few Ray Train calls, each marked `# Ray Train:`, fed by rayseg.feed (each
epoch's batches, planned by rayseg.ingest, made by Ray tasks).
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rayseg import (
    checkpoint,
    cluster,
    feed,
    ingest,
    loop,
    netif,
    outputs,
    prestart,
    raycompat,
    rayconnect,
    rayoutput,
    storage,
    waits,
    workerlines,
)
from rayseg.config import TrainConfig, to_dict
from rayseg.errors import RaysegError
from rayseg.models import (
    ClassMap,
    build_model,
    check_model_name,
    class_map_from_meta,
)
from rayseg.split import split_ids
from rayseg.text import plural


@dataclass(frozen=True)
class Split:
    train: ingest.DataSummary
    val: ingest.DataSummary
    train_ids: np.ndarray
    val_ids: np.ndarray


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs, decided on the driver."""

    cfg: TrainConfig
    class_map: ClassMap
    run_uri: str
    split: Split
    val_canvas: tuple[int, int]  # (H, W) every validation image is padded to
    steps_per_epoch: int
    threads: int
    data_cpus: float  # what each data-loading task asks of Ray (data_task_cpus)
    data_tasks: int  # data-loading tasks each worker runs at once (data_tasks_per_worker)
    resume_uri: str | None = None  # the newest checkpoint that loads (checkpoint.resume_point)
    first_batches_actor: str | None = None  # the Ray actor holding each rank's first batch


@dataclass(frozen=True)
class Checked:
    """What run_train learned before starting Ray: every input checked."""

    class_map: ClassMap
    split: Split
    steps_per_epoch: int
    run: storage.Location
    resume: checkpoint.ResumePoint


# ---- Ray Train worker ------------------------------------------------------------------------


def quiet_logs() -> None:
    if not rayoutput.verbose():
        rayoutput.quiet_ray()
    # MobileNet's depthwise weight grads come out in another stride order on CPU; DDP copes.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def report_epoch(
    record: dict[str, Any],
    state: loop.TrainingState,
    *,
    plan: Plan,
    rank: int,
    history: list[dict[str, Any]],
) -> None:
    """Rank 0 logs the epoch and reports it with a checkpoint; other ranks report without one.

    Every rank reports once per epoch: ray.train.report is a barrier across workers.
    """
    import ray.train

    cfg, epoch = plan.cfg, record["epoch"]
    metrics = {k: record[k] for k in ("epoch", "loss", "images_per_s")}
    metrics["val_miou"] = 0.0 if math.isnan(record["val_miou"]) else record["val_miou"]
    name = checkpoint.checkpoint_dir_name(epoch)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)  # Ray Train
        return
    history.append(record)
    checkpoint.write_history(storage.locate(plan.run_uri), history)
    workerlines.say(loop.epoch_line(record, cfg.epochs))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.write_checkpoint(folder, state, record, cfg=cfg, class_map=plan.class_map)
        # Ray Train: persists the folder as RUN/epoch_NNNN, keeps the best num_to_keep + latest.
        saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=name)


def resume(state: loop.TrainingState, *, plan: Plan, rank: int) -> int:
    """Epochs done by the checkpoint resumed from (0 if none): the newer of the one Ray Train
    hands back (a restart within this run) and the one the driver found loadable."""
    import ray.train

    saved = ray.train.get_checkpoint()  # Ray Train: the latest checkpoint it registered, or None
    ours = plan.resume_uri
    if saved is not None and ours and checkpoint.dir_name(saved.path) < checkpoint.dir_name(ours):
        saved = None  # the driver's is newer: written, but never registered by Ray Train
    if saved is not None:
        with saved.as_directory() as folder:
            done = checkpoint.restore(folder, state, name=plan.cfg.model, class_map=plan.class_map)
        where = saved.path
    elif ours is not None:
        done = checkpoint.restore(ours, state, name=plan.cfg.model, class_map=plan.class_map)
        where = ours
    else:
        return 0
    if rank == 0:
        workerlines.say(f"resumed from epoch {done} ({where})")
    return done


def step_progress(plan: Plan, *, rank: int, world: int):
    """Rank 0's loop.fit_epochs on_step: steps, loss and images/s within each epoch."""
    if rank != 0:
        return None

    def for_epoch(epoch: int) -> loop.StepHook:
        label = f"epoch {epoch}/{plan.cfg.epochs}"
        reporter = workerlines.StepReporter(label, plan.steps_per_epoch)

        def hook(stats: loop.EpochStats, loss: torch.Tensor) -> None:
            if reporter.due(stats.steps):
                rate = world * stats.images / max(stats.seconds, 1e-9)  # every worker's images
                reporter.report(
                    stats.steps, loss=f"{float(loss):.4f}", **{"images/s": f"{rate:.1f}"}
                )

        return hook

    return for_epoch


def train_part_tasks(plan: Plan, epoch: int, *, rank: int, world: int) -> list[ingest.PartTask]:
    cfg, split = plan.cfg, plan.split
    return ingest.train_tasks(
        split.train, split.train_ids, rank=rank, world=world, batch_size=cfg.batch_size,
        seed=cfg.seed, epoch=epoch,
    )  # fmt: skip


def train_make_batch(plan: Plan):
    return functools.partial(
        ingest.train_batch, lut=plan.class_map.train_lut(), crop_size=plan.cfg.crop_size
    )


def train_batches(plan: Plan, epoch: int, *, rank: int, world: int, device, made=None) -> feed.Feed:
    """Worker `rank`'s shuffled, augmented training batches of `epoch`; their tasks start now.
    made: prestart.take_first's (ObjectRef of the first batch, its task), or None."""
    tasks = train_part_tasks(plan, epoch, rank=rank, world=world)
    return data_feed(plan, tasks, plan.split.train, train_make_batch(plan), device, made=made)


def plan_first_batches(plan: Plan, epoch: int, name: str) -> prestart.FirstBatches:
    """Every rank's first training batch of `epoch`, for rayseg.prestart to make."""
    world = plan.cfg.num_workers
    return prestart.FirstBatches(
        name=name,
        epoch=epoch,
        tasks={
            rank: ingest.split_first(train_part_tasks(plan, epoch, rank=rank, world=world)[0])[0]
            for rank in range(world)
        },
        fs=plan.split.train.location.fs,
        make_batch=train_make_batch(plan),
        num_cpus=plan.data_cpus,
    )


def val_batches(plan: Plan, *, rank: int, world: int, device) -> feed.Feed:
    """Worker `rank`'s share of the validation images, unscaled, padded to plan.val_canvas."""
    split = plan.split
    ids = ingest.shard_ids(split.val_ids, world)[rank]
    tasks = ingest.val_tasks(split.val, ids, batch_size=plan.cfg.batch_size)
    height, width = plan.val_canvas
    make = functools.partial(
        ingest.val_batch, lut=plan.class_map.train_lut(), height=height, width=width
    )
    return data_feed(plan, tasks, split.val, make, device)


def data_feed(
    plan: Plan, tasks, data: ingest.DataSummary, make_batch, device, made=None
) -> feed.Feed:
    """`tasks` of `data` run with the plan's CPUs per task and tasks at once."""
    return feed.Feed(
        tasks,
        fs=data.location.fs,
        make_batch=make_batch,
        in_flight=plan.data_tasks,
        num_cpus=plan.data_cpus,
        device=device,
        made=made,
    )


def epochs_done_hint(plan: Plan) -> int:
    """The epochs resume() will restore, from the checkpoints' folder names alone (epoch_NNNN),
    so that the first epoch's data can start loading before the model is built."""
    import ray.train

    saved = ray.train.get_checkpoint()  # Ray Train
    names = [checkpoint.dir_name(u) for u in (saved and saved.path, plan.resume_uri) if u]
    return max((checkpoint.epoch_of_dir(n) for n in names), default=0)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: config = {"plan": Plan}."""
    import ray.train
    import ray.train.torch

    plan: Plan = config["plan"]
    cfg = plan.cfg
    quiet_logs()
    ctx = ray.train.get_context()  # Ray Train
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # Ray Train
    torch.set_num_threads(plan.threads)
    torch.manual_seed(cfg.seed)
    # The first epoch's data starts loading now, while the model is built and restored
    # (bench/ingest_bench.py, "first_epoch_wait").
    first = epochs_done_hint(plan) + 1
    first_batches = None
    if first <= cfg.epochs:  # else a restart after the last epoch's checkpoint: nothing to train
        made = None
        if plan.first_batches_actor:  # made while Ray Train started this worker (prestart)
            made = prestart.take_first(plan.first_batches_actor, rank=rank, epoch=first)
        first_batches = train_batches(plan, first, rank=rank, world=world, device=device, made=made)
    amp = cfg.amp and device.type == "cuda"
    num_classes = plan.class_map.num_classes
    state = loop.build_training(
        cfg, num_classes, plan.steps_per_epoch, device, world_size=world, channels_last=amp
    )
    start_epoch = resume(state, plan=plan, rank=rank)
    if first_batches is not None and start_epoch + 1 != first:  # a checkpoint's name was wrong
        first_batches.close()
        first_batches = None
    run = storage.locate(plan.run_uri)
    history = checkpoint.read_history(run, upto_epoch=start_epoch) if rank == 0 else []
    train_model = torch.compile(state[0]) if cfg.compile else state[0]
    train_model = ray.train.torch.prepare_model(train_model, move_to_device=False)  # Ray Train: DDP
    loop.fit_epochs(
        state,
        train_model,
        epochs=range(start_epoch + 1, cfg.epochs + 1),
        train_batches=lambda epoch: train_batches(
            plan, epoch, rank=rank, world=world, device=device
        ),
        val_batches=lambda: val_batches(plan, rank=rank, world=world, device=device),
        class_map=plan.class_map,
        device=device,
        amp=amp,
        world_size=world,
        on_epoch=lambda rec: report_epoch(rec, state, plan=plan, rank=rank, history=history),
        on_step=step_progress(plan, rank=rank, world=world),
        first_batches=first_batches,
    )


# ---- driver: checks before Ray ---------------------------------------------------------------


def check_settings(cfg: TrainConfig) -> None:
    check_model_name(cfg.model)
    for key in ("epochs", "batch_size", "crop_size", "num_workers"):
        if getattr(cfg, key) < 1:
            raise RaysegError(f"{key} is {getattr(cfg, key)}, expected a positive integer")
    if cfg.lr <= 0:
        raise RaysegError(f"lr is {cfg.lr}, expected > 0")
    if cfg.max_failures < -1 or cfg.num_to_keep < 1:
        raise RaysegError("max_failures must be >= -1 and num_to_keep >= 1")


def plan_split(cfg: TrainConfig, data: ingest.DataSummary, class_map: ClassMap) -> Split:
    """Training and validation images: --val-data, or a deterministic split by image id."""
    if cfg.val_data:
        val = ingest.scan_data(cfg.val_data)
        val_map = class_map_from_meta(val.meta, cfg.classes)
        if val_map != class_map:
            raise RaysegError(
                f"{cfg.val_data}: its masks map classes differently from {cfg.data} "
                f"({list(val_map.mask_values)} vs {list(class_map.mask_values)}); "
                "render both with the same `rayseg masks --values`"
            )
        return Split(data, val, np.unique(data.image_ids), np.unique(val.image_ids))
    if cfg.val_fraction <= 0:
        raise RaysegError("validation needs images: set --val-fraction > 0 or --val-data")
    train_ids, val_ids = split_ids(data.image_ids, cfg.val_fraction, seed=cfg.seed)
    return Split(data, data, train_ids, val_ids)


def steps_per_epoch(num_train: int, cfg: TrainConfig) -> int:
    # ingest.train_tasks gives each worker floor(N / W) images; the last partial batch is dropped.
    steps = (num_train // cfg.num_workers) // cfg.batch_size
    if steps < 1:
        raise RaysegError(
            f"{num_train} training images are too few for --batch-size {cfg.batch_size} on "
            f"{plural(cfg.num_workers, 'worker')} "
            f"(each step needs {cfg.batch_size * cfg.num_workers})"
        )
    return steps


def storage_for(run: storage.Location) -> tuple[str, str]:
    """(Ray Train storage_path on run.fs, run name): RUN's parent folder and last part."""
    parent, _, name = run.path.rstrip("/").rpartition("/")
    if not parent or not name:
        raise RaysegError(
            f"{run.uri}: the run directory needs a parent folder (e.g. s3://b/runs/x)"
        )
    return parent, name


def check_inputs(cfg: TrainConfig) -> Checked:
    """Data, classes, split, crop, weights, output and any earlier run: RaysegError if unusable."""
    check_settings(cfg)
    data = ingest.scan_data(cfg.data)
    storage.check_mask_values(storage.parquet_files(data.location), data.meta, cfg.data)
    class_map = class_map_from_meta(data.meta, cfg.classes)
    split = plan_split(cfg, data, class_map)
    ingest.check_crop(split.train, split.train_ids, cfg.crop_size)
    steps = steps_per_epoch(len(split.train_ids), cfg)
    if cfg.weights or cfg.weights_backbone:
        build_model(
            cfg.model,
            class_map.num_classes,
            aux_loss=cfg.aux_loss,
            weights=cfg.weights,
            weights_backbone=cfg.weights_backbone,
        )
    run = storage.locate(cfg.out)
    storage.check_writable(run)
    storage_for(run)
    outputs.check_apart(cfg.out, inputs={"--data": cfg.data, "--val-data": cfg.val_data}, images={})
    outputs.claim(
        run, "train", writes=checkpoint.RUN_WRITES, overwrite=None,
        made_by_rayseg=checkpoint.is_run_dir(run),
    )  # fmt: skip
    resume = checkpoint.resume_point(run, model=cfg.model, class_map=class_map)
    return Checked(class_map, split, steps, run, resume)


# ---- driver: the cluster ---------------------------------------------------------------------


def worker_resources(cfg: TrainConfig, node_cpus: list[float]) -> tuple[float, int]:
    """(CPUs reserved per worker, torch threads per worker), given the CPUs of each node.

    With GPUs a worker reserves ingest.GPU_CPUS_PER_WORKER (measured: the rest of a node's CPUs
    decode its data). CPU training gets all CPUs but one, shared out (no more
    than a node has): the data tasks decode on the CPUs that Train did not reserve. On a cluster of
    several nodes, where Ray Train restarts the workers after a failure (max_failures != 0), the
    share is planned as if the largest node were gone: restarted on the nodes left, the workers
    would otherwise hold every CPU, and the data loading they wait for could never be placed.
    """
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    elif cfg.use_gpu:
        cpus = float(ingest.GPU_CPUS_PER_WORKER)
    else:
        usable = sum(node_cpus)
        if len(node_cpus) > 1 and cfg.max_failures != 0:
            usable -= max(node_cpus)
        cpus = max(0.5, min((usable - 1) / cfg.num_workers, max(node_cpus)))
    return cpus, max(1, int(cpus))


def data_task_cpus(cpus_per_worker: float) -> float:
    """CPUs each data-loading task asks for: 1, or what a worker's fraction of a CPU leaves.

    Workers of 0.5 CPU, one per 1-CPU node, leave half a CPU on each: a task asking for a whole
    one would wait forever beside them, however many such halves the cluster has.
    """
    fraction = cpus_per_worker % 1
    return 1.0 if fraction < 1e-6 else round(1 - fraction, 3)


def data_tasks_per_worker(free_cpus: float, data_cpus: float, num_workers: int) -> int:
    """Data-loading tasks each worker keeps running: the CPUs its workers leave, shared out
    (at least 1). No more: a task waiting for a CPU would read as a stalled run (rayseg.waits)."""
    return max(1, int(free_cpus / data_cpus / num_workers + 1e-9))


def prestart_counts(
    node_cpus: dict[str, float], data_cpus: float, data_tasks: int
) -> dict[str, int]:
    """Data-loading processes to start on each node before training (rayseg.prestart): as many
    as the node's CPUs run data tasks at once, and no more than the run's data tasks (before
    fit() rayseg cannot know where Ray Train puts its workers; Ray ends the idle ones that
    the CPUs left to data loading cannot use)."""
    return {
        node: min(data_tasks, int(cpus / data_cpus + 1e-9))
        for node, cpus in node_cpus.items()
        if cpus >= data_cpus
    }


def collective_backend(cfg: TrainConfig) -> str:
    """The process group's backend: NCCL for a GPU per worker; gloo on CPUs, and where workers
    share a GPU (NCCL refuses two ranks on one device)."""
    return "nccl" if cfg.use_gpu and cfg.gpus_per_worker >= 1 else "gloo"


def worker_bundle(cfg: TrainConfig, cpus_per_worker: float) -> dict[str, float]:
    """What each Ray Train worker reserves."""
    gpus = {"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {}
    return {"CPU": cpus_per_worker, **gpus}


def check_gpu_count(cfg: TrainConfig, have: float) -> None:
    """RaysegError unless `have` GPUs hold the workers (a GPU each, or --gpus-per-worker)."""
    if not cfg.use_gpu:
        return
    need = cfg.gpus_per_worker * cfg.num_workers
    if need > have + 1e-9:
        raise RaysegError(
            f"--use-gpu with {plural(cfg.num_workers, 'worker')} x {cfg.gpus_per_worker:g} GPUs "
            "needs "
            f"{need:g} GPUs; the cluster has {have:g} (lower --num-workers, or share GPUs "
            "with --gpus-per-worker 0.5)"
        )


def check_cluster(cfg: TrainConfig, cpus_per_worker: float) -> None:
    """Refuse a run that could never be scheduled, rather than wait for it forever."""
    import ray

    have = ray.cluster_resources()
    cluster.check_gpus(cfg.use_gpu)
    check_gpu_count(cfg, have.get("GPU", 0))
    need = cpus_per_worker * cfg.num_workers
    if need > have.get("CPU", 0):
        raise RaysegError(
            f"{plural(cfg.num_workers, 'worker')} x {cpus_per_worker:g} CPUs need {need:g} CPUs; "
            f"the cluster has {have.get('CPU', 0):g} (lower --num-workers or --cpus-per-worker)"
        )
    if have.get("CPU", 0) - need < data_task_cpus(cpus_per_worker) - 1e-9:
        raise RaysegError(
            f"{plural(cfg.num_workers, 'worker')} x {cpus_per_worker:g} CPUs hold all "
            f"{have['CPU']:g} CPUs of the cluster: none is left for loading their data "
            "(lower --num-workers or --cpus-per-worker)"
        )


def data_cpus_note(cfg: TrainConfig, cluster_cpus: float, cpus_per_worker: float) -> str | None:
    """A line when GPU workers leave fewer CPUs per GPU for data loading than feeding a fast GPU
    takes (ingest.DATA_CPUS_PER_GPU); None otherwise, and on CPU."""
    if not cfg.use_gpu:
        return None
    gpus = cfg.num_workers * cfg.gpus_per_worker
    left = cluster_cpus - cpus_per_worker * cfg.num_workers
    if left >= ingest.DATA_CPUS_PER_GPU * gpus:
        return None
    return (
        f"note: {left:g} CPUs are left to load data for {gpus:g} GPUs ({left / gpus:.1f} per "
        f"GPU); feeding 272 images/s (deeplabv3_resnet50 on one H200) takes about "
        f"{ingest.DATA_CPUS_PER_GPU} (docs/performance.md): data loading may hold the GPUs back"
    )


def build_trainer(plan: Plan, run: storage.Location, cpus_per_worker: float):
    """Ray Train: a TorchTrainer running train_loop_per_worker on cfg.num_workers workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = plan.cfg
    storage_path, name = storage_for(run)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend=collective_backend(cfg)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=worker_bundle(cfg, cpus_per_worker),
            # CPU ranks on distinct hosts where there are several (each gets a host's cores);
            # GPU ranks packed (Ray's default): fast links within a node.
            placement_strategy="PACK" if cfg.use_gpu else "SPREAD",
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=run.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="val_miou",
                checkpoint_score_order="max",
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(trainer) -> None:
    """trainer.fit(), with a worker's RaysegError surfacing as itself.

    Ray Train's fit() would swap in its own SIGINT handler (it aborts the run, then exits 1);
    rayseg's stays (signals.stop_on_signals; raycompat.keep_sigint_handler), and stopping Ray
    ends the run at once.
    """
    import ray.train

    raycompat.keep_sigint_handler(trainer)
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        for failure in getattr(e, "worker_failures", {}).values():
            cause = failure
            while cause is not None and not isinstance(cause, RaysegError):
                cause = cause.__cause__ or getattr(cause, "cause", None)
            if isinstance(cause, RaysegError):
                raise RaysegError(str(cause)) from None
        if line := netif.collective_failure("".join(traceback.format_exception(e))):
            raise RaysegError(line) from None
        raise


def launch(cfg: TrainConfig, checked: Checked) -> None:
    """Connect to Ray, check the cluster can run it, and train."""
    import ray

    rayconnect.connect_ray(cfg.address, cfg.num_cpus, dashboard=True)
    node_cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")}
    cpus_per_worker, threads = worker_resources(cfg, list(node_cpus.values()))
    check_cluster(cfg, cpus_per_worker)
    if note := data_cpus_note(cfg, ray.cluster_resources().get("CPU", 0), cpus_per_worker):
        print(note)
    cluster.check_storage_reachable(checked.run)
    split = checked.split
    data_cpus = data_task_cpus(cpus_per_worker)
    held = cpus_per_worker * cfg.num_workers
    plan = Plan(
        cfg=cfg,
        class_map=checked.class_map,
        run_uri=checked.run.uri,
        split=split,
        val_canvas=ingest.val_canvas(split.val, split.val_ids),
        steps_per_epoch=checked.steps_per_epoch,
        threads=threads,
        data_cpus=data_cpus,
        data_tasks=data_tasks_per_worker(
            ray.cluster_resources().get("CPU", 0) - held, data_cpus, cfg.num_workers
        ),
        resume_uri=checked.resume.uri,
        first_batches_actor=f"rayseg-first-batches-{uuid.uuid4().hex[:12]}",
    )
    print(
        f"training {cfg.model} on {len(split.train_ids)} images ({len(split.val_ids)} for "
        "validation), "
        f"{plural(plan.class_map.num_classes, 'class')}, {plural(cfg.num_workers, 'worker')} x "
        f"{cfg.batch_size} "
        f"images/step, {plan.steps_per_epoch} steps/epoch"
    )

    def needs() -> list[waits.Need]:
        return waits.starved_data(held, plan.data_cpus) + waits.pending_needs()

    # While Ray Train starts its workers: the first epoch's data tasks find their processes
    # started, and each worker its first batch made.
    started = prestart.start(
        prestart_counts(node_cpus, data_cpus, plan.data_tasks * cfg.num_workers),
        first=plan_first_batches(plan, checked.resume.epochs + 1, plan.first_batches_actor),
    )
    try:
        # A line whenever work waits for a CPU that is held (or gone with a lost node).
        with waits.ResourceWatch(held={"training workers": held}, needs=needs):
            fit(build_trainer(plan, checked.run, cpus_per_worker))
    finally:
        prestart.stop(started)


# ---- driver: the command ---------------------------------------------------------------------


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """`rayseg train`: check everything, train (or resume), export RUN/model.pt, summarise."""
    start = time.monotonic()
    checked = check_inputs(cfg)
    run = checked.run
    split = checked.split
    checkpoint.write_run_files(
        run,
        cfg,
        data_uri=split.train.location.uri,
        val_data_uri=split.val.location.uri,
        train_images=len(split.train_ids),
        val_ids=split.val_ids,
    )
    resume = checked.resume
    for name, why in resume.skipped:
        after = f"resuming from {resume.name}" if resume.uri else "training from the start"
        print(f"skipping checkpoint {name} ({why}); {after}")
    if resume.epochs >= cfg.epochs:
        print(
            f"{run.uri} already has {plural(resume.epochs, 'epoch')} (--epochs {cfg.epochs}): "
            "nothing to train"
        )
    else:
        if resume.uri:
            print(f"resuming from {resume.uri}: {resume.epochs} of {cfg.epochs} epochs done")
        launch(cfg, checked)
    state = checkpoint.export_final(run)
    history = checkpoint.read_history(run, upto_epoch=int(state["epoch"]))
    summary = checkpoint.run_summary(run, history)
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["config"] = to_dict(cfg)
    checkpoint.write_summary(run, summary)
    print_outputs(summary, run)
    return summary


def print_outputs(summary: dict[str, Any], run: storage.Location) -> None:
    if summary["skipped_rows"]:
        first = summary["skipped"][0]
        print(
            f"skipped {summary['skipped_rows']} rows whose image or mask did not decode "
            f"(first: image {first['image_id']}: {first['reason']}); "
            f"listed in {run.join(checkpoint.SUMMARY_NAME).uri}"
        )
    miou = summary["val_miou"]
    trained = f"trained {plural(summary['epochs'], 'epoch')}"
    print(f"{trained}: val mIoU {miou:.4f}" if miou is not None else trained)
    print(f"model:       {summary['model_file']}")
    print(f"metrics:     {run.join(checkpoint.METRICS_NAME).uri}")
    print(f"curves:      {run.join(checkpoint.CURVES_NAME).uri}")
    print(f"checkpoints: {run.uri}/{checkpoint.CHECKPOINT_PREFIX}*")
