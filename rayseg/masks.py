"""`rayseg masks`: a COCO instances file -> PNG masks, a Parquet dataset and a manifest.

Input: MasksConfig. Output under OUT (local or s3://): `masks/*.png`, `parquet/part-NNNNN.parquet`
(one per shard), `_shards/` (plan.json + one record per finished shard), `manifest.json` (counts,
pixels per class, every problem), `config.yaml`, `README.md` (the Hugging Face dataset card) and,
with `--layout voc`, `VOCdevkit/` (rayseg.export). The output's plan fingerprints the input and
every setting that changes what is written, so a rerun resumes only a run with the same ones; the
rendering itself is rayseg.shard's.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rayseg import export, storage
from rayseg.classes import mask_classes
from rayseg.coco import CocoIndex, load_coco
from rayseg.config import MasksConfig, dump_yaml, to_dict
from rayseg.errors import RaysegError
from rayseg.render import ValueScheme, value_scheme
from rayseg.shard import ShardJob, plan_jobs, run_jobs, scheme_meta, shard_record_name

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
    "shard_size",
    "layout",
)
# Settings that change only the --layout voc split files.
_VOC_KEYS = ("val_fraction", "seed")


def fingerprint(index_digest: str, cfg: MasksConfig) -> dict[str, Any]:
    keys = _OUTPUT_KEYS + (_VOC_KEYS if cfg.layout == "voc" else ())
    settings = {k: getattr(cfg, k) for k in keys}
    return {"annotations_sha1": index_digest, **settings}


def prepare_output(out: storage.Location, plan: dict[str, Any], *, overwrite: bool) -> set[int]:
    """Check or start the output folder; returns the shards already done."""
    storage.check_writable(out)
    plan_loc = out.join("_shards", "plan.json")
    if overwrite:
        for sub in ("masks", "parquet", "_shards", export.VOC_DIR[0]):
            storage.delete_dir(out.join(sub))
        storage.delete(out.join("manifest.json"))
        storage.delete(out.join("README.md"))
    elif storage.exists(plan_loc):
        previous = storage.read_json(plan_loc)
        changed = [k for k in plan if previous.get(k) != plan[k]]
        if changed:
            raise RaysegError(
                f"{out.uri} holds masks made with other settings ({', '.join(changed)} differ); "
                "rerun with --overwrite or choose another --out"
            )
    for sub in ("masks", "parquet", "_shards"):
        storage.make_dirs(out.join(sub))
        storage.remove_stray_temporaries(out.join(sub))
    storage.write_json(plan_loc, plan)
    done = set()
    for name in storage.list_files(out.join("_shards")):
        if name.startswith("shard-") and name.endswith(".json"):
            done.add(int(name[len("shard-") : -len(".json")]))
    return done


@dataclass(frozen=True)
class MasksPlan:
    """What a `rayseg masks` run draws, before any pixels: input, kept classes, scheme, shards."""

    index: CocoIndex
    names: dict[int, str]  # drawn category id -> name, in pixel-value order
    scheme: ValueScheme
    jobs: list[ShardJob]


def plan_masks(cfg: MasksConfig) -> MasksPlan:
    """Read the input, check the settings against it and cut it into shards (no Ray, no output)."""
    index = load_coco(cfg.annotations)
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
    return MasksPlan(index, names, scheme, plan_jobs(index, cfg, scheme, names))


def run_masks(cfg: MasksConfig) -> dict[str, Any]:
    start = time.monotonic()
    planned = plan_masks(cfg)
    index, scheme, jobs = planned.index, planned.scheme, planned.jobs
    out = storage.locate(cfg.out)
    plan = fingerprint(index.digest, cfg)
    done = prepare_output(out, {**plan, "num_shards": len(jobs)}, overwrite=cfg.overwrite)
    if cfg.layout == "voc":
        export.prepare_voc(out)
    todo = [j for j in jobs if j.shard not in done]
    new_records, errors = run_jobs(todo, cfg, total_images=len(index.images))
    for sub in ("masks", "parquet", "_shards"):
        # A worker killed mid-write (and retried by Ray) leaves its temporary behind.
        storage.remove_stray_temporaries(out.join(sub))
    records = {r["shard"]: r for r in new_records}
    for k in sorted(done):
        records[k] = storage.read_json(out.join("_shards", shard_record_name(k)))
    manifest = build_manifest(
        cfg, index, scheme, jobs, records, new_shards=set(records) - done, names=planned.names
    )
    if cfg.layout == "voc":
        stems = {im.id: export.stem(im.file_name) for im in index.images}
        written = {i: stems[i] for r in records.values() for i in r["written"]}
        manifest["voc"] = export.write_voc_lists(
            out, written, manifest["value_scheme"], val_fraction=cfg.val_fraction, seed=cfg.seed
        )
    storage.write_bytes(
        out.join("README.md"), export.dataset_card(manifest["value_scheme"]).encode()
    )
    manifest["counts"]["seconds"] = round(time.monotonic() - start, 2)
    storage.write_json(out.join("manifest.json"), manifest)
    storage.write_bytes(out.join("config.yaml"), dump_yaml(cfg).encode())
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
    jobs: list[ShardJob],
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
    c = manifest["counts"]
    voc = ", VOCdevkit/" if "voc" in manifest else ""
    return (
        f"masks: {c['images_valid']} images -> {c['masks_written']} written, "
        f"{c['resumed']} resumed, {c['failed']} failed, {c['problems']} problems "
        f"({c['shards_run']}/{c['shards']} shards run); outputs in {out_uri} "
        f"(masks/, parquet/, manifest.json{voc})"
    )
