"""Shared run-time plumbing: connecting to Ray, and progress reporting for long work."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO


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
