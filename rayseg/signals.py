"""SIGINT and SIGTERM: a command stops with errors.Interrupted, never halfway through ray.init.

Under stop_on_signals (cli.main) SIGINT and SIGTERM raise errors.Interrupted in the main
thread, except inside signals_deferred (around ray.init), where they wait until it returns.
Once stopping (Interrupted raised, or rayconnect.stop_ray under way) further signals are
ignored; a third signal ends the process at once. No Ray here but raycompat's patch of ray.init.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rayseg.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class SignalState:
    handling: bool = False  # stop_on_signals is active
    deferring: bool = False  # inside ray.init
    pending: int = 0  # a signal that arrived while deferring
    stopping: bool = False  # Interrupted was raised, or Ray is being stopped
    received: int = 0  # the signal that stopped it (Ray's C++ calls re-raise KeyboardInterrupt)
    seen: int = 0  # signals so far


_SIGNALS = SignalState()  # process-wide, as signal handlers are


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread while inside (cli.main)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _SIGNALS.handling, _SIGNALS.stopping = True, False
    _SIGNALS.pending = _SIGNALS.received = _SIGNALS.seen = 0
    install_signal_handlers()
    try:
        yield
    finally:
        _SIGNALS.handling = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def install_signal_handlers() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    _SIGNALS.seen += 1
    if _SIGNALS.seen >= 3:  # the user insists: stop now, whatever is still running
        os._exit(128 + signum)
    if _SIGNALS.deferring and not _SIGNALS.pending:
        _SIGNALS.pending = signum
    if _SIGNALS.deferring or _SIGNALS.stopping:
        return
    _SIGNALS.stopping, _SIGNALS.received = True, signum
    raise Interrupted(signum)


def stop_signal() -> int:
    """The SIGINT / SIGTERM that stopped the command (0 if none did)."""
    return _SIGNALS.received


def ignore_from_now() -> None:
    """Signals from now on are ignored (stop_ray is under way; a third still ends the process)."""
    _SIGNALS.stopping = True


@contextmanager
def signals_deferred() -> Iterator[None]:
    """A signal that arrives inside is raised as Interrupted when the block has run.

    For ray.init: cut short, it crashes the driver or leaves Ray's agents running. ray.init also
    installs its own SIGTERM handler (sys.exit(15)), kept out while rayseg handles signals
    (raycompat.ray_sigterm_handler_held).
    """
    if not _SIGNALS.handling or _SIGNALS.deferring:
        yield
        return
    from rayseg.raycompat import ray_sigterm_handler_held

    _SIGNALS.deferring = True
    try:
        with ray_sigterm_handler_held():
            yield
    finally:
        _SIGNALS.deferring = False
        install_signal_handlers()
    if _SIGNALS.pending and not _SIGNALS.stopping:
        _SIGNALS.stopping, _SIGNALS.received = True, _SIGNALS.pending
        raise Interrupted(_SIGNALS.pending)
