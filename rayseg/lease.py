"""One run at a time per output: a lease file `OUT/_lock.json`, renewed while the run lives.

A run writes {owner, host, pid, started, renewed} and re-reads it after a short settle time: if
another run's owner is there, it lost a race and stops. A live run renews the file every RENEW_S
seconds; a lease not renewed for STALE_S seconds, or held by a dead process on this host, is
taken over (a crashed run never blocks its rerun for long). Local folders and s3:// work the
same way; on S3, where there is no create-if-absent here, the settle time (SETTLE_S) is the
window two runs starting at the same moment must be apart for one of them to see the other.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rayseg import layout, storage
from rayseg.errors import RaysegError

RENEW_S = 15.0
STALE_S = 60.0
SETTLE_S = {True: 0.05, False: 1.0}  # local, object store


@dataclass
class Lease:
    loc: storage.Location
    owner: str
    started: float
    _stop: threading.Event = field(default_factory=threading.Event)

    def body(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "renewed": time.time(),
        }

    def renew_in_background(self) -> None:
        def renew() -> None:
            while not self._stop.wait(RENEW_S):
                if _read(self.loc).get("owner") == self.owner:
                    storage.write_json(self.loc, self.body())

        threading.Thread(target=renew, name="rayseg-lease", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        try:
            if _read(self.loc).get("owner") == self.owner:
                storage.delete(self.loc)
        except OSError:
            pass  # the lease goes stale by itself


def acquire(out: storage.Location) -> Lease:
    """Hold the output for this run, or raise a RaysegError naming the run that holds it."""
    loc = out.join(layout.LOCK)
    held = _read(loc)
    if held and not _stale(held):
        raise _busy(out, loc, held)
    lease = Lease(loc, uuid.uuid4().hex, time.time())
    storage.write_json(loc, lease.body())
    time.sleep(SETTLE_S[loc.is_local])
    now = _read(loc)
    if now.get("owner") != lease.owner:
        raise _busy(out, loc, now)
    lease.renew_in_background()
    return lease


def _read(loc: storage.Location) -> dict[str, Any]:
    try:
        body = json.loads(storage.read_bytes(loc))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"owner": "?", "renewed": 0}  # unreadable: stale, taken over
    return body if isinstance(body, dict) else {"owner": "?", "renewed": 0}


def _stale(held: dict[str, Any]) -> bool:
    if time.time() - float(held.get("renewed", 0)) > STALE_S:
        return True
    return held.get("host") == socket.gethostname() and not _alive(held.get("pid"))


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(out: storage.Location, loc: storage.Location, held: dict[str, Any]) -> RaysegError:
    since = time.strftime("%H:%M:%S", time.localtime(float(held.get("started", 0))))
    return RaysegError(
        f"{out.uri} is in use by another rayseg run (pid {held.get('pid')} on "
        f"{held.get('host')}, since {since}); wait for it to end, or if it is gone delete "
        f"{loc.uri} (a lease not renewed for {STALE_S:.0f} s is taken over)"
    )
