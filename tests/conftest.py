"""Shared fixtures for the cluster tests: a private Ray temp dir, tiny synthetic data, local S3.

Nothing here starts Ray; each test module that needs Ray starts its own and stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with_env(key: str, value: str) -> list[int]:
    """Pids whose start-up environment has key=value (Linux /proc; [] elsewhere)."""
    marker = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in env:
            found.append(pid)
    return found


def end_processes(pids: list[int], *, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever still runs after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or sig == signal.SIGKILL:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(p) for p in alive):
            time.sleep(0.1)
        pids = [p for p in alive if _running(p)]


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat fields after the command name: [state, ppid, pgrp, ...] ([] if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def stop_process_group(proc: subprocess.Popen, *, grace: float = 30.0) -> None:
    """End a child started with start_new_session=True and everything in its group.

    SIGTERM goes to the leader alone (`ray start --block` then stops its processes in order;
    signalling them all at once can leave a raylet waiting for a GCS that is gone); SIGKILL to
    the whole group if anything of it is still alive after `grace` seconds.
    """
    pgid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not group_members(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_tmpdir() -> Iterator[str]:
    """A Ray temp dir private to this module (RAY_TMPDIR), so nothing here joins another Ray.

    `ray start` and `ray.cluster_utils.Cluster` record their address in the temp dir, and a
    plain `ray.init()` joins whatever cluster is recorded there. On the way out, any process
    still carrying this RAY_TMPDIR (a Ray process of ours that outlived its parent) is ended.
    """
    # Short: Ray's unix sockets live under it and socket paths must stay under 108 bytes.
    path = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", path)
        mp.delenv("RAY_ADDRESS", raising=False)
        yield path
    end_processes(_processes_with_env("RAY_TMPDIR", path))
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def make_synth(tmp_path_factory) -> Callable[..., Path]:
    """make_synth(num_images, width=, height=) -> a synthetic COCO annotations file (cached)."""
    from rayseg.config import SynthConfig
    from rayseg.synth import run_synth

    made: dict[tuple, Path] = {}

    def make(num_images: int, *, width: int = 160, height: int = 120) -> Path:
        key = (num_images, width, height)
        if key not in made:
            out = tmp_path_factory.mktemp(f"synth{num_images}")
            run_synth(SynthConfig(out=str(out), num_images=num_images, width=width, height=height))
            made[key] = out / "annotations.json"
        return made[key]

    return make


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 (moto); the AWS_* variables point at it.

    Yields the endpoint URL; Ray workers started afterwards inherit the variables.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="module")
def ray_local(ray_tmpdir):
    """One local 2-CPU Ray per test module, in the module's private temp dir."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    yield
    context.enable_progress_bars = bars
    ray.shutdown()


@pytest.fixture(scope="module")
def ns():
    """The namespace cluster of tests/cluster/nscluster.py, one per test module, removed after.

    Where namespaces cannot be made here (not root, no `unshare`), its tests skip with one line.
    """
    import nscluster  # tests/cluster, on sys.path for the modules there

    why = nscluster.why_unavailable()
    if why:
        pytest.skip(f"namespace cluster unavailable: {why}")
    c = nscluster.NsCluster()
    try:
        yield c.up()
    finally:
        c.down()
        assert c.leftovers() == [], "namespaces left behind"
