"""Progress of long work for the user: a tqdm bar on a terminal, periodic lines otherwise.

No Ray: the driver shows its own work here, and a Ray worker's through workerlines.WorkerBars.
"""

from __future__ import annotations

import sys
import time
from typing import Any, ClassVar, TextIO


class Progress:
    """A tqdm bar on a terminal; a periodic `label: done/total (rate/s, ETA)` line otherwise.

    Progress.latest is the one made last in this process: an interrupted command reports it.
    """

    latest: ClassVar[Progress | None] = None

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
        self.postfix: dict[str, Any] = {}
        self.start = self._last = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, done) at the first update
        self._bar = None
        Progress.latest = self
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=label,
                unit=unit[:-1] if unit.endswith("s") else unit,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, n: int, *, postfix: dict[str, Any] | None = None) -> None:
        """`n` more done; `postfix` (e.g. {"loss": 0.41}) is shown after the count."""
        self.done += n
        if self._first is None:
            self._first = (time.monotonic(), self.done)
        self.postfix = postfix or self.postfix
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        # The rate counts from the first update: start-up before it is not work (predict's
        # first line used to say "0.1/s, ETA 1684s" for a job that took 10 s).
        since, done_then = self._first or (self.start, 0)
        elapsed = max(time.monotonic() - since, 1e-9)
        rate = (self.done - done_then) / elapsed if self._first else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} "
            f"({rate:.1f}/s, ETA {eta_text}{extra})"
        )

    def count(self) -> str:
        """`3 of 5 steps`."""
        return f"{self.done} of {self.total} {self.unit}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
