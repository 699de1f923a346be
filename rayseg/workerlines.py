"""How a Ray worker talks to the user: marked lines on its stdout, shown by the driver.

A worker writes say() lines (WORKER_LINE) and StepReporter messages (WORKER_PROGRESS, JSON);
Ray streams them to the driver, where forward_worker_lines prints the first bare and turns the
second into a Progress (WorkerBars). Anything else a worker prints is Ray's or a library's and
reaches the terminal only with --verbose. No Ray: rayoutput hands Ray's streams to this.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rayseg.progress import Progress

# Prefixes of the lines a Ray worker writes for the user (say, StepReporter).
WORKER_LINE = "rayseg| "
WORKER_PROGRESS = "rayseg-progress| "


def say(line: str) -> None:
    """One line for the user from a Ray worker (the driver prints it without Ray's prefix).

    Ray Train patches print() in workers to write both to its logger and to stdout (the driver
    would show it twice); the process's own stdout shows it once.
    """
    print(WORKER_LINE + line, file=sys.__stdout__, flush=True)


class StepReporter:
    """From a worker: progress of `total` steps of `label`, at most once per `interval` seconds.

    The driver's WorkerBars shows it as a Progress (a bar on a terminal, periodic lines otherwise).
    Callers check due() first, so values that cost a device sync are read only when shown.
    """

    def __init__(self, label: str, total: int, *, unit: str = "steps", interval: float = 1.0):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self._last = float("-inf")

    def due(self, done: int) -> bool:
        return done >= self.total or time.monotonic() - self._last >= self.interval

    def report(self, done: int, **postfix: str) -> None:
        self._last = time.monotonic()
        message = {"label": self.label, "total": self.total, "unit": self.unit, "done": done}
        line = WORKER_PROGRESS + json.dumps({**message, "postfix": postfix})
        print(line, file=sys.__stdout__, flush=True)


class WorkerBars:
    """Driver side of StepReporter: one Progress per label, the previous one closed."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.label: str | None = None
        self.progress: Progress | None = None

    def show(self, message: dict[str, Any]) -> None:
        progress = self.progress
        if progress is None or message["label"] != self.label:
            self.close()
            self.label = message["label"]
            progress = self.progress = Progress(
                message["total"], message["label"], unit=message["unit"], stream=self.stream
            )
        progress.update(message["done"] - progress.done, postfix=message["postfix"])
        if message["done"] >= message["total"]:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.label = self.progress = None


def forward_worker_lines(
    data: dict[str, Any], *, show_ray: bool, bars: WorkerBars, ray_print: Callable[..., None]
) -> None:
    """One batch of streamed lines: rayseg's printed bare, the rest by Ray only if `show_ray`."""
    other = []
    for line in data.get("lines", []):
        if line.startswith(WORKER_PROGRESS):
            bars.show(json.loads(line[len(WORKER_PROGRESS) :]))
        elif line.startswith(WORKER_LINE):
            bars.close()
            print(line[len(WORKER_LINE) :], flush=True)
        else:
            other.append(line)
    if show_ray and other:
        ray_print({**data, "lines": other}, ignore_prefix=False)
