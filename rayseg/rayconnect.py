"""Joining or starting Ray for a command, and leaving it: connect_ray, stop_ray, job_env.

connect_ray joins a cluster (its job gets job_env: the driver's AWS_* settings for every worker,
and netif's socket hook) or starts a lean embedded Ray whose processes get a temp folder of their
own (private_tmpdir). ray.init runs with signals deferred (signals.signals_deferred) and Ray's
output quieted (rayoutput). stop_ray ends the Ray this process started, or leaves the cluster it
joined, ignoring signals meanwhile. Ray is imported inside the functions that use it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rayseg import raycompat, rayoutput, signals


@dataclass
class Connection:
    connected: bool = False  # connect_ray joined or started Ray
    started: bool = False  # ... and started it (an embedded Ray of our own)


_RAY = Connection()  # process-wide, as Ray's own connection is
_SCRATCH: list[str] = []  # the temp folders of the Ray this process started (private_tmpdir)


def connect_ray(
    address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = False
) -> None:
    """Join the given cluster, the job's cluster (RAY_ADDRESS), or start a lean local one.

    `dashboard=True` (training) starts the local dashboard too: Ray Train watches its controller
    through the state API, which lives there, and warns every few seconds without it.
    """
    import ray

    if ray.is_initialized():
        return
    loud = rayoutput.verbose()
    if not loud:
        rayoutput.quiet_ray()
    common = {"logging_level": logging.WARNING if loud else logging.ERROR, "log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):
        with signals.signals_deferred():
            ray.init(address=address or None, runtime_env=job_env(), **common)
            _RAY.connected = True
        rayoutput.quiet_driver(loud)
        return
    # Embedded Ray of our own ("local": never silently join another cluster on this machine).
    # No metrics exporter (nothing reads it) and no dashboard unless asked: start-up stays at
    # seconds. `--address auto` joins a running cluster instead.
    with signals.signals_deferred(), private_tmpdir():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            **raycompat.embedded_init_options(),
            **common,
        )
        _RAY.connected = _RAY.started = True
    rayoutput.quiet_driver(loud)


def stop_ray() -> None:
    """Leave Ray if connect_ray joined or started it: a Ray of our own stops with all it started.

    Signals that arrive meanwhile are ignored (a third one ends the process at once).
    """
    if not _RAY.connected:
        return
    import ray

    started = _RAY.started
    _RAY.connected = _RAY.started = False
    signals.ignore_from_now()
    if started:
        raycompat.end_autoscaler_monitor()
    ray.shutdown()
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


@contextmanager
def private_tmpdir() -> Iterator[None]:
    """Ray's processes started inside get a temp folder of their own, removed by stop_ray.

    The dashboard's forkserver and Ray's workers make temp folders (`pymp-*`, scratch files)
    that a killed process never removes: one per run in /tmp. RAY_TMPDIR is pinned to where Ray
    would put its session folder anyway, so its logs stay where they were.
    """
    system = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    scratch = tempfile.mkdtemp(prefix="rayseg-tmp-", dir=system)
    _SCRATCH.append(scratch)
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "TMPDIR")}
    os.environ.update(RAY_TMPDIR=system, TMPDIR=scratch)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def job_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env of a job on a joined cluster: the driver's AWS_*, and the socket hook.

    On a cluster, tasks run on other hosts under their raylet's environment, not the driver's:
    Ray Data's read tasks, storage probes, Ray Train's workers and their data all reach S3 with
    the driver's endpoint and credentials only through the job's runtime_env (the credentials
    in its setup hook, the rest in env_vars; a job with a hook of its own: all in env_vars).
    Every worker process also runs rayseg.netif.pin_socket_interface, so gloo and NCCL talk on
    the interface of the node's Ray address (Ray takes a setup hook only job-wide). What the
    submitted job already sets (`ray job submit --runtime-env-json`) is left to it: Ray refuses
    to merge a key given twice. An embedded Ray's workers inherit the driver's environment and
    share one host.
    """
    from rayseg.netif import SETUP_HOOK

    environ = os.environ if environ is None else environ
    given = raycompat.submitted_runtime_env(environ)
    env = {
        k: v
        for k, v in environ.items()
        if k.startswith("AWS_") and k not in (given.get("env_vars") or {})
    }
    own_hook = "worker_process_setup_hook" not in given
    secrets = {k: env.pop(k) for k in SECRET_VARIABLES if k in env} if own_hook else {}
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    if own_hook:
        runtime_env["worker_process_setup_hook"] = worker_setup(secrets) if secrets else SETUP_HOOK
    return runtime_env


# Ray writes a runtime_env's env_vars into every node's runtime_env_agent.log and onto worker
# command lines (`ps`); credentials travel inside the setup hook instead, which Ray pickles into
# its GCS (checked on Ray 2.60 with the namespace cluster, tests/cluster).
SECRET_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
)  # fmt: skip


def worker_setup(secrets: dict[str, str]) -> Callable[[], None]:
    """A job's worker_process_setup_hook that gives each worker the driver's `secrets`, then
    pins the socket interface (rayseg.netif); Ray ships it by value (cloudpickle)."""

    def setup_worker() -> None:
        from rayseg.netif import pin_socket_interface

        os.environ.update(secrets)
        pin_socket_interface()

    return setup_worker
