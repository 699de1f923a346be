"""Faults cost time, never data: a killed render worker, a killed driver, a killed train worker.

Each run is `python -m rayseg ...` in its own process group with its own local Ray (private
RAY_TMPDIR), so the processes to kill are found among that run's descendants in /proc and
nothing outside the test is ever signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import stop_process_group
from tiny_coco import HEIGHT, WIDTH, write_big_coco

from rayseg import storage

NUM_IMAGES = 120


def start_rayseg(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rayseg", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, log: Path, *, timeout: float = 180) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        stop_process_group(proc, grace=3)
    assert proc.returncode == 0, log.read_text()[-4000:]


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def title(pid: int) -> str:
    """A Ray worker's process title: `ray::<task name>` while it runs a task, else `ray::IDLE`."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def workers_running(root: int, task: str) -> list[int]:
    return [pid for pid in descendants(root) if title(pid).startswith(f"ray::{task}")]


def shard_records(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "_shards").glob("shard-*.json"))


def record_pids(out: Path) -> dict[str, int]:
    """Shard record name -> pid of the worker that wrote it."""
    return {n: json.loads((out / "_shards" / n).read_text())["pid"] for n in shard_records(out)}


def check_every_image_once(out: Path, num_images: int) -> dict:
    """Manifest, Parquet parts and PNGs all account for each image exactly once, none cut short."""
    leftovers = [p for p in out.rglob("*") if storage.is_temporary(p.name)]
    assert not leftovers, leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["rendered_total"] == counts["images_valid"] == num_images
    assert counts["masks_written"] + counts["resumed"] == num_images
    assert counts["failed"] == 0 and counts["shards_done"] == counts["shards"]
    ids = []
    for part in sorted((out / "parquet").iterdir()):
        ids += pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == list(range(1, num_images + 1))
    masks = sorted((out / "masks").iterdir())
    assert len(masks) == num_images
    for png in masks:
        assert storage.decode_png(png.read_bytes()).shape == (HEIGHT, WIDTH), png.name
    return counts


@pytest.fixture(scope="module")
def big_coco(tmp_path_factory, ray_tmpdir) -> Path:
    return write_big_coco(tmp_path_factory.mktemp("big") / "instances.json", NUM_IMAGES)


@pytest.mark.slow
def test_killed_render_worker_is_retried(big_coco, tmp_path):
    out, log = tmp_path / "out", tmp_path / "masks.log"
    proc = start_rayseg(
        [
            "masks",
            "--annotations",
            str(big_coco),
            "--out",
            str(out),
            "--shard-size",
            "20",
            "--num-cpus",
            "2",
            "--verbose",  # Ray's own report of the dead worker is part of what is checked
            "--no-render-while-ray-starts",  # every shard a Ray task: one of them is killed
        ],
        log,
    )
    killed = None
    deadline = time.monotonic() + 90
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for pid in workers_running(proc.pid, "render_shard"):
            time.sleep(0.05)  # well into the task
            if title(pid).startswith("ray::render_shard"):
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.01)
    done_at_kill = record_pids(out)
    finish(proc, log)

    assert killed is not None, "no render worker was seen running"
    assert len(done_at_kill) < 6, "the kill came after every shard had finished"
    # Ray reports the dead worker and resubmits its task (ray 2.x's driver messages).
    text = log.read_text()
    assert f"Worker PID: {killed}" in text, text[-4000:]
    assert re.search(r"Task render_shard failed\. .* the task will be retried", text), text[-4000:]
    counts = check_every_image_once(out, NUM_IMAGES)
    assert counts["masks_written"] == NUM_IMAGES and counts["shards_run"] == 6
    # Shards finished before the kill were not redone, and the killed worker finished nothing
    # after it: its shard was rendered again, once, by another worker.
    done = record_pids(out)
    assert {n: done[n] for n in done_at_kill} == done_at_kill
    assert killed not in {pid for n, pid in done.items() if n not in done_at_kill}


@pytest.mark.slow
def test_killed_driver_resumes_without_redoing_finished_shards(big_coco, tmp_path):
    out, log = tmp_path / "out", tmp_path / "masks.log"
    args = ["masks", "--annotations", str(big_coco), "--out", str(out), "--shard-size", "8"]
    proc = start_rayseg([*args, "--num-cpus", "1"], log)
    deadline = time.monotonic() + 90
    while len(shard_records(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its raylet and workers die with it
    proc.wait(timeout=30)
    # Ray's dashboard and runtime-env agents can outlive it for a while; they write nothing.
    stop_process_group(proc, grace=3)
    done = len(shard_records(out))
    assert 3 <= done < 15, f"{done} of 15 shards were done when the driver died"
    assert not (out / "manifest.json").exists()

    rerun = start_rayseg([*args, "--num-cpus", "2"], log)
    finish(rerun, log)
    counts = check_every_image_once(out, NUM_IMAGES)
    assert counts["resumed"] == 8 * done
    assert counts["shards_run"] == 15 - done
    assert counts["masks_written"] == NUM_IMAGES - 8 * done


@pytest.fixture(scope="module")
def bucket(moto_server) -> str:
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="faults")
    return "faults"


@pytest.fixture(scope="module")
def train_data(make_synth, bucket, tmp_path_factory, ray_tmpdir) -> str:
    """24 synthetic images rendered to masks on S3, images embedded (training input)."""
    annotations = make_synth(24)
    out = f"s3://{bucket}/train-data"
    log = tmp_path_factory.mktemp("train_data") / "masks.log"
    finish(
        start_rayseg(
            [
                "masks",
                "--annotations",
                str(annotations),
                "--out",
                out,
                "--images-dir",
                str(annotations.parent / "images"),
                "--num-cpus",
                "2",
            ],
            log,
        ),
        log,
    )
    return out


def latest_checkpoint(fs: pafs.FileSystem, run: str) -> str | None:
    """The newest checkpoint Ray Train has registered (its snapshot), not merely uploaded."""
    try:
        with fs.open_input_stream(f"{run}/checkpoint_manager_snapshot.json") as f:
            snapshot = json.loads(f.read())
    except (OSError, ValueError):
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


@pytest.mark.slow
def test_killed_train_worker_resumes_from_last_checkpoint(train_data, bucket, tmp_path):
    # Data and checkpoints on S3, as on a cluster: the restarted worker reads epoch 1 back from
    # the bucket. (tests/test_s3.py covers the rest of the shared-storage story.)
    fs, run = storage.locate(f"s3://{bucket}").fs, f"{bucket}/runs/r1"
    log = tmp_path / "train.log"
    args = [
        "train",
        "--data",
        train_data,
        "--out",
        f"s3://{run}",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--crop-size",
        "64",
        "--num-workers",
        "1",
        "--max-failures",
        "1",
        "--num-cpus",
        "2",
    ]
    proc = start_rayseg(args, log)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        if latest_checkpoint(fs, run) == "epoch_0001":
            for pid in workers_running(proc.pid, "RayTrainWorker"):
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.1)
    finish(proc, log, timeout=300)

    assert killed is not None, "no training worker was seen after the first checkpoint"
    text = log.read_text()
    assert f"resumed from epoch 1 ({run}/epoch_0001)" in text, text[-4000:]
    with fs.open_input_stream(f"{run}/metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f.read().decode().splitlines()] == [1, 2]
    assert latest_checkpoint(fs, run) == "epoch_0002"
    with fs.open_input_stream(f"{run}/summary.json") as f:
        assert json.loads(f.read())["epochs"] == 2
    assert fs.get_file_info(f"{run}/model.pt").size > 0

    # A new driver finds both epochs in the bucket and trains nothing again.
    rerun_log = tmp_path / "rerun.log"
    finish(start_rayseg(args, rerun_log), rerun_log)
    assert f"s3://{run} already has 2 epochs" in rerun_log.read_text()
