"""Ray plumbing shared by every distributed stage, and progress reporting for long work.

connect_ray joins or starts a cluster; forwarded_env is the runtime_env that gives Ray workers the
driver's object-store settings; worker_uri makes a location valid on any worker; check_gpus refuses
a GPU run on a cluster without GPUs. Ray is imported inside the functions that use it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

from rayseg.errors import RaysegError


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
    common = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, **common)
        return
    # Embedded Ray of our own ("local": never silently join another cluster on this machine).
    # No metrics exporter (nothing reads it) and no dashboard unless asked: start-up stays at
    # seconds. `--address auto` joins a running cluster instead.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        _system_config={"enable_metrics_collection": False},
        **common,
    )


def forwarded_env(*uris: str | None) -> dict[str, Any]:
    """A Ray runtime_env carrying the driver's AWS_* settings, when any of `uris` is s3://.

    Workers on other nodes read and write the same bucket with the same endpoint and credentials.
    Empty when nothing needs it, so local runs stay plain.
    """
    if not any(u and u.startswith("s3://") for u in uris):
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"env_vars": env} if env else {}


def worker_uri(uri: str) -> str:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    from rayseg import storage

    loc = storage.locate(uri)
    return loc.path if loc.is_local else uri


def check_gpus(use_gpu: bool, needed: int = 1) -> None:
    """RaysegError unless the connected cluster has `needed` GPUs (when `use_gpu`)."""
    import ray

    have = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu and have < needed:
        if have == 0:
            raise RaysegError(
                "--use-gpu: the Ray cluster has no GPUs (drop --use-gpu to run on CPUs)"
            )
        raise RaysegError(
            f"--use-gpu with {needed} workers needs {needed} GPUs; the cluster has {have}"
        )


class Progress:
    """A tqdm bar on a terminal; a periodic `label: done/total (rate/s, ETA)` line otherwise."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        unit: str = "images",
        interval: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.label, self.unit, self.interval = total, label, unit, interval
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self._last = time.monotonic()
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=label,
                unit=unit[:-1] if unit.endswith("s") else unit,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s, ETA {eta_text})"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
