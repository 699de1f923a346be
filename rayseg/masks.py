"""`rayseg masks`: a COCO instances file -> PNG masks, a Parquet dataset and a manifest.

Input: MasksConfig. Output under OUT (local or s3://; every name in rayseg.layout): `masks/*.png`,
`parquet/part-NNNNN.parquet` (one per shard), `_shards/` (plan.json + one record per finished
shard), `manifest.json` (counts, pixels per class, every problem), `config.yaml`, `README.md` (the
Hugging Face dataset card) and, with `--layout voc`, `VOCdevkit/` (rayseg.export). The output's
plan fingerprints the input and every setting that changes what is written, so a rerun resumes only
a run with the same ones; the rendering itself is rayseg.shard's.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rayseg import export, layout, lease, outputs, storage, verify
from rayseg.classes import mask_classes
from rayseg.coco import CocoIndex, load_coco
from rayseg.coco_apart import load_coco_apart
from rayseg.config import MasksConfig, dump_yaml, to_dict
from rayseg.errors import RaysegError
from rayseg.progress import Progress
from rayseg.rayconnect import connect_ray
from rayseg.render import ValueScheme, value_scheme
from rayseg.shard import (
    ShardJobs,
    auto_shard_size,
    plan_jobs,
    render_shard,
    run_jobs,
    scheme_meta,
)

# Settings that change what is written; a resumed run must match them all.
_OUTPUT_KEYS = (
    "classes",
    "rasterizer",
    "overlap",
    "values",
    "crowd",
    "naming",
    "palette",
    "images_dir",
    "follow_image_links",
    "shard_size",
    "layout",
    "max_pixels",
    "max_vertices",
)
# Settings that change only the --layout voc split files.
_VOC_KEYS = ("val_fraction", "seed")


def fingerprint(index_digest: str, cfg: MasksConfig) -> dict[str, Any]:
    keys = _OUTPUT_KEYS + (_VOC_KEYS if cfg.layout == "voc" else ())
    settings = {k: getattr(cfg, k) for k in keys}
    return {"annotations_sha1": index_digest, **settings}


def read_plan(out: storage.Location) -> dict[str, Any] | None:
    """The output's plan, None if there is none; an unreadable one is said and ignored."""
    loc = layout.plan_path(out)
    if not storage.exists(loc):
        return None
    try:
        plan = storage.read_json(loc)
        if isinstance(plan, dict):
            return plan
        reason = "not a JSON object"
    except (OSError, ValueError) as e:
        reason = f"{type(e).__name__}: {e}"
    print(
        f"masks: {loc.uri} is unreadable ({reason}); its settings cannot be checked, so every "
        "shard is rendered again",
        flush=True,
    )
    for name in storage.list_files(out.join(layout.SHARDS)):
        if layout.record_shard(name) is not None:
            storage.delete(out.join(layout.SHARDS, name))
    return None


def resolve_shard_size(
    cfg: MasksConfig, previous: dict[str, Any] | None, n: int, cpus: float
) -> int:
    """--shard-size, or (0, auto) the size the output was started with, or auto_shard_size."""
    if cfg.shard_size:
        return cfg.shard_size
    if previous and isinstance(previous.get("shard_size"), int) and previous["shard_size"] > 0:
        return previous["shard_size"]
    return auto_shard_size(n, cpus)


def prepare_output(
    out: storage.Location,
    plan: dict[str, Any],
    previous: dict[str, Any] | None,
    *,
    overwrite: bool,
) -> set[int]:
    """Check the plan against the `previous` one (or start over); returns the shards with a
    record (finished or damaged)."""
    plan_loc = layout.plan_path(out)
    if overwrite:
        kept = outputs.remove_masks_run(out)
        if kept:
            print(
                f"masks: --overwrite kept {len(kept)} files no rayseg run recorded in {out.uri} "
                f"({outputs.listing(kept)})",
                flush=True,
            )
    else:
        # A key the previous plan lacks was added by a later rayseg version: not a difference.
        changed = [k for k in plan if previous and k in previous and previous[k] != plan[k]]
        if changed:
            raise RaysegError(
                f"{out.uri} holds masks made with other settings ({', '.join(changed)} differ); "
                "rerun with --overwrite or choose another --out"
            )
    for sub in layout.RENDER_FOLDERS:
        storage.make_dirs(out.join(sub), below=out)
        storage.remove_stray_temporaries(out.join(sub))
    storage.write_json(plan_loc, plan)
    done = {layout.record_shard(name) for name in storage.list_files(out.join(layout.SHARDS))}
    return {k for k in done if k is not None and k < plan["num_shards"]}


def finished_shards(
    out: storage.Location, recorded: set[int], *, deep: bool
) -> dict[int, dict[str, Any]]:
    """The records of the shards whose outputs hold up; each damaged one is said and its record
    removed, so it is rendered again."""
    good, damaged = verify.check_shards(out, recorded, deep=deep)
    for k, reason in damaged.items():
        print(f"masks: shard {k} is damaged ({reason}); rendering it again", flush=True)
        storage.delete(layout.record_path(out, k))
    return good


@dataclass(frozen=True)
class MasksPlan:
    """What a `rayseg masks` run draws, before any pixels: input, kept classes, scheme, shards."""

    index: CocoIndex
    names: dict[int, str]  # drawn category id -> name, in pixel-value order
    scheme: ValueScheme
    jobs: ShardJobs


@dataclass(frozen=True)
class MasksInput:
    """The parsed input and what is drawn from it (no shards yet: their size may need Ray)."""

    index: CocoIndex
    names: dict[int, str]
    scheme: ValueScheme


def read_input(cfg: MasksConfig, *, apart: bool = False) -> MasksInput:
    """Read the input and check the settings against it (no Ray, no output). `apart`: parse
    in a child process and keep records as byte ranges (the driver never holds the file)."""
    index = (load_coco_apart if apart else load_coco)(cfg.annotations)
    names = mask_classes(cfg.classes, {c.id: c.name for c in index.categories})
    scheme = value_scheme(names, cfg.values, keep_order=True)
    for flag, wanted in (("--palette", cfg.palette), ("--layout voc", cfg.layout == "voc")):
        if wanted and scheme.dtype != "uint8":
            raise RaysegError(
                f"{flag} needs 8-bit values; --values {cfg.values} gives 16-bit masks"
            )
    if cfg.layout == "voc" and not cfg.images_dir:
        raise RaysegError("--layout voc needs --images-dir (the VOC folder holds the images)")
    if (
        cfg.images_dir
        and storage.locate(cfg.images_dir).is_local
        and not os.path.isdir(cfg.images_dir)
    ):
        raise RaysegError(f"{cfg.images_dir}: images folder not found")
    return MasksInput(index, names, scheme)


def plan_masks(cfg: MasksConfig, *, cpus: float | None = None) -> MasksPlan:
    """read_input and the shards (auto size for `cpus`, default this machine's)."""
    read = read_input(cfg)
    size = resolve_shard_size(cfg, None, len(read.index.images), cpus or local_cpus(cfg))
    jobs = plan_jobs(read.index, cfg, read.scheme, read.names, shard_size=size)
    return MasksPlan(read.index, read.names, read.scheme, jobs)


@dataclass(frozen=True)
class Prepared:
    """A run ready to render: its shards, those already finished, and those to do."""

    read: MasksInput
    jobs: ShardJobs
    done: dict[int, dict[str, Any]]
    todo: list[int]


def prepare_run(cfg: MasksConfig, out: storage.Location, read: MasksInput, cpus: float) -> Prepared:
    """Plan the shards, check the output against its previous plan and its finished shards."""
    previous = None if cfg.overwrite else read_plan(out)
    size = resolve_shard_size(cfg, previous, len(read.index.images), cpus)
    jobs = plan_jobs(read.index, cfg, read.scheme, read.names, shard_size=size)
    plan = {**fingerprint(read.index.digest, cfg), "shard_size": size, "num_shards": len(jobs)}
    recorded = prepare_output(out, plan, previous, overwrite=cfg.overwrite)
    done = finished_shards(out, recorded, deep=cfg.verify)
    if cfg.layout == "voc":
        export.prepare_voc(out)
    return Prepared(read, jobs, done, [k for k in range(len(jobs)) if k not in done])


@dataclass
class StartUp:
    """What the start-up thread hands over: the prepared run, and the shards it rendered itself
    (with their records) before Ray was up."""

    prepared: Prepared | None = None
    rendered: dict[int, dict[str, Any]] = field(default_factory=dict)
    progress: Progress | None = None
    error: BaseException | None = None


def prepare_while_ray_starts(cfg: MasksConfig, out: storage.Location) -> StartUp:
    """Parse the input (in a child process, waited on by a thread) while Ray starts in this
    thread: both take seconds. When this run starts a Ray of its own, that thread then prepares
    the run and renders shards in this process until Ray is up (on a small machine its start-up
    is as long as the rendering). Ray is not started when the output looks finished."""
    own = not (cfg.address or os.environ.get("RAY_ADDRESS"))
    ray_up = threading.Event()  # set: the start-up thread renders no more shards
    cluster: dict[str, float] = {}
    state = StartUp()

    def start_up() -> None:
        try:
            read = read_input(cfg, apart=True)
            if not own:  # the cluster's CPUs decide the shard size
                ray_up.wait()
                if "CPU" not in cluster and not skip_ray:
                    return  # Ray did not come up: the output is left untouched
            state.prepared = prepare_run(cfg, out, read, cluster.get("CPU", local_cpus(cfg)))
            todo = state.prepared.todo
            if todo:
                state.progress = Progress(
                    sum(state.prepared.jobs.num_images(k) for k in todo), "masks"
                )
            if own and cfg.render_while_ray_starts and state.progress is not None:
                state.rendered = render_until(state.prepared, ray_up, state.progress)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            state.error = e

    finished = not cfg.overwrite and _looks_finished(out)
    # A missing local file is the parse's to report: no Ray start for that.
    missing = not storage.is_uri(cfg.annotations) and not os.path.exists(cfg.annotations)
    skip_ray = finished or missing
    thread = threading.Thread(target=start_up, name="rayseg-start-up", daemon=True)
    thread.start()
    try:
        if not skip_ray:
            import ray

            connect_ray(cfg.address, cfg.num_cpus)
            cluster.update(ray.cluster_resources())
    finally:
        ray_up.set()
        thread.join()
    if state.error is not None:
        raise state.error
    return state


def local_cpus(cfg: MasksConfig) -> float:
    """The CPUs a Ray of this run's own gets: --num-cpus, or the ones this process may use."""
    return float(cfg.num_cpus or len(os.sched_getaffinity(0)) or 1)


def render_until(
    prepared: Prepared, stop: threading.Event, progress: Progress
) -> dict[int, dict[str, Any]]:
    """Render shards from the front of prepared.todo in this process until `stop` is set; a
    shard that fails here is left to the Ray tasks (which retry it)."""
    records = {}
    for k in prepared.todo:
        if stop.is_set():
            break
        try:
            records[k] = render_shard(prepared.jobs[k])
        except Exception:  # noqa: BLE001 - the shard stays in todo: Ray renders and reports it
            break
        progress.update(prepared.jobs.num_images(k))
    return records


def _looks_finished(out: storage.Location) -> bool:
    try:
        plan = storage.read_json(layout.plan_path(out))
        names = storage.list_files(out.join(layout.SHARDS))
        records = [n for n in names if layout.record_shard(n) is not None]
        return len(records) >= int(plan["num_shards"])
    except Exception:  # noqa: BLE001 - anything unclear: start Ray, the run decides
        return False


def run_masks(cfg: MasksConfig) -> dict[str, Any]:
    start = time.monotonic()
    out = storage.locate(cfg.out)
    outputs.check_apart(
        cfg.out, inputs={"--annotations": cfg.annotations}, images={"--images-dir": cfg.images_dir}
    )
    storage.check_writable(out)
    outputs.claim(
        out,
        "masks",
        writes=layout.TOP_FILES + layout.TOP_FOLDERS,
        overwrite=cfg.overwrite,
        made_by_rayseg=storage.exists(layout.plan_path(out)),
    )
    held = lease.acquire(out)
    try:
        return _run_masks(cfg, out, start)
    finally:
        held.release()


def _run_masks(cfg: MasksConfig, out: storage.Location, start: float) -> dict[str, Any]:
    started = prepare_while_ray_starts(cfg, out)
    prepared, early = started.prepared, started.rendered
    assert prepared is not None
    index, scheme, jobs, done = (
        prepared.read.index,
        prepared.read.scheme,
        prepared.jobs,
        prepared.done,
    )
    todo = [k for k in prepared.todo if k not in early]
    new_records, errors = run_jobs(jobs, todo, cfg, started.progress)
    for sub in layout.RENDER_FOLDERS:
        # A worker killed mid-write (and retried by Ray) leaves its temporary behind.
        storage.remove_stray_temporaries(out.join(sub))
    records = {**done, **early, **{r["shard"]: r for r in new_records}}
    manifest = build_manifest(
        cfg,
        index,
        scheme,
        jobs,
        records,
        new_shards=set(records) - set(done),
        names=prepared.read.names,
    )
    if cfg.layout == "voc":
        stems = dict(zip((im.id for im in index.images), jobs.stems, strict=True))
        written = {i: stems[i] for r in records.values() for i in r["written"]}
        manifest["voc"] = export.write_voc_lists(
            out, written, manifest["value_scheme"], val_fraction=cfg.val_fraction, seed=cfg.seed
        )
    split = None
    if "voc" in manifest:
        where = layout.voc_list_rel("{train,val}")
        split = {"train": manifest["voc"]["train"], "val": manifest["voc"]["val"], "where": where}
    value_meta = manifest["value_scheme"]
    export.write_hf_classes(out, value_meta)
    storage.write_bytes(
        out.join(layout.CARD), export.dataset_card(value_meta, split=split).encode()
    )
    manifest["counts"]["seconds"] = round(time.monotonic() - start, 2)
    storage.write_json(out.join(layout.MANIFEST), manifest)
    storage.write_bytes(out.join(layout.CONFIG), dump_yaml(cfg).encode())
    print(summary_line(manifest, out.uri))
    if errors:
        first = errors[0]
        raise RaysegError(
            f"{len(errors)} of {len(jobs)} shards failed (first: shard {first[0]}: {first[1]}); "
            "the finished ones are kept: rerun the same command to retry the rest"
        )
    return manifest


def build_manifest(
    cfg: MasksConfig,
    index: CocoIndex,
    scheme: ValueScheme,
    jobs: ShardJobs,
    records: dict[int, dict],
    *,
    new_shards: set[int],
    names: dict[int, str],
) -> dict[str, Any]:
    pixels: Counter[int] = Counter()
    problems = [p.to_dict() for p in index.problems]
    written = resumed = failed = 0
    for k in sorted(records):
        r = records[k]
        pixels.update({int(v): n for v, n in r["class_pixels"].items()})
        problems.extend(r["problems"])
        if k in new_shards:
            written += len(r["written"])
        else:
            resumed += len(r["written"])
        failed += len(r["failed"])
    meta = scheme_meta(scheme, names)
    class_pixels = {
        "background": pixels.get(scheme.background_value, 0),
        "ignore": pixels.get(scheme.ignore_value, 0),
    }
    for c in meta["classes"]:
        class_pixels[c["name"]] = pixels.get(c["value"], 0)
    rendered_images = {i for r in records.values() for i in r["written"]}
    return {
        "config": to_dict(cfg),
        "value_scheme": meta,
        "counts": {
            "images_in": index.num_images_in_file,
            "images_valid": len(index.images),
            "masks_written": written,
            "resumed": resumed,
            "failed": failed + index.num_images_in_file - len(index.images),
            "rendered_total": len(rendered_images),
            "shards": len(jobs),
            "shards_done": len(records),
            "shards_run": len(new_shards),
            "problems": len(problems),
        },
        "class_pixels": class_pixels,
        "problems": problems,
    }


def summary_line(manifest: dict[str, Any], out_uri: str) -> str:
    """One line whose image counts add up: written + resumed + failed (+ those in shards that
    did not finish) = the images in the file."""
    c = manifest["counts"]
    voc = f", {layout.VOC}/" if "voc" in manifest else ""
    unfinished = c["images_in"] - c["masks_written"] - c["resumed"] - c["failed"]
    return (
        f"masks: {c['images_in']} images -> {c['masks_written']} written, "
        f"{c['resumed']} resumed, {c['failed']} failed"
        + (f", {unfinished} in unfinished shards" if unfinished else "")
        + f"; {c['problems']} problems "
        f"({c['shards_run']}/{c['shards']} shards run); outputs in {out_uri} "
        f"({layout.MASKS}/, {layout.PARQUET}/, {layout.MANIFEST}{voc})"
    )
