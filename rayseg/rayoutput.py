"""What of Ray's own output reaches the terminal: by default, none of it.

Ray's warnings, error-level lines of its processes and deprecation warnings stay in Ray's log
files (RAY_TMPDIR/ray/session_*/logs); `rayseg --verbose` (RAYSEG_VERBOSE=1) shows them. What
a Ray worker says to the user (workerlines) is printed bare. The private Ray hooks this needs
live in raycompat. Ray is imported inside the functions that use it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from rayseg import raycompat
from rayseg.workerlines import WorkerBars, forward_worker_lines

VERBOSE_ENV = "RAYSEG_VERBOSE"


def verbose() -> bool:
    """True under `rayseg --verbose` (the CLI sets RAYSEG_VERBOSE=1; Ray workers inherit it)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_ray() -> None:
    """Keep Ray's driver-side warnings off the terminal (before ray.init)."""
    from ray.util.annotations import RayDeprecationWarning

    # The token-auth notice of every new local cluster, and Ray Data's per-dataset INFO lines.
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")


def quiet_driver(loud: bool) -> None:
    """After ray.init: workers' lines filtered, and (quiet CLI) fd 2 into Ray's logs."""
    filter_worker_output(show_ray=loud)
    if not loud:
        native_stderr_to_ray_logs()


def filter_worker_output(*, show_ray: bool) -> None:
    """Pass what Ray prints from its processes through forward_worker_lines (after ray.init).

    Ray's own printer stays for `show_ray` (raycompat.route_worker_output).
    """
    bars = WorkerBars()

    def make_forward(ray_print: Callable[..., None]) -> Callable[..., None]:
        def forward(data: dict[str, Any], ignore_prefix: bool = False) -> None:
            forward_worker_lines(data, show_ray=show_ray, bars=bars, ray_print=ray_print)

        return forward

    raycompat.route_worker_output(make_forward)


def native_stderr_to_ray_logs() -> None:
    """Under the quiet CLI (RAYSEG_VERBOSE=0): the process's fd 2 goes to Ray's logs dir.

    The driver's C++ core worker prints its error-level lines to fd 2 as well as to its log
    file there (python-core-driver-*.log); Python's sys.stderr keeps the terminal.
    """
    if os.environ.get(VERBOSE_ENV) != "0":
        return
    logs = raycompat.logs_dir()
    if logs is None:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    sys.stderr = open(terminal, "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    with open(os.path.join(logs, f"rayseg-driver-{os.getpid()}.err"), "ab") as log:
        os.dup2(log.fileno(), 2)


def quiet_ray_data() -> None:
    """Ray Data's INFO lines and progress logs stay in ray-data.log (after importing ray.data)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose()
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
