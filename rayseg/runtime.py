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
from typing import TYPE_CHECKING, Any, TextIO

from rayseg.errors import RaysegError

if TYPE_CHECKING:  # storage pulls in pyarrow and OpenCV; Ray stages import it lazily
    from rayseg.storage import Location


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


def map_with_actors(
    ds: Any,
    actor: type,
    *,
    constructor_kwargs: dict[str, Any],
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
    env: dict[str, Any],
) -> Any:
    """ds.map_batches through a fixed pool of `num_actors` `actor`s (a GPU each with use_gpu).

    `ds` is a ray.data.Dataset; each actor is built once (a model loaded once per replica).
    `env` is a runtime_env (forwarded_env), {} for none.
    """
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
        **({"runtime_env": env} if env else {}),
    )


def worker_uri(uri: str) -> str:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    from rayseg import storage

    loc = storage.locate(uri)
    return loc.path if loc.is_local else uri


def check_gpus(use_gpu: bool, *, workers: int | None = None) -> None:
    """RaysegError unless the connected cluster has a GPU (`workers` GPUs, one per worker)."""
    import ray

    have = int(ray.cluster_resources().get("GPU", 0))
    if not use_gpu or have >= (workers or 1):
        return
    if workers is None:
        raise RaysegError("--use-gpu: the Ray cluster has no GPUs (drop --use-gpu to run on CPUs)")
    raise RaysegError(
        f"--use-gpu with {workers} workers needs {workers} GPUs; the cluster has {have}"
    )


def check_storage_reachable(run: Location) -> None:
    """Every node must see the run dir (Ray Train persists checkpoints there from workers)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rayseg import storage

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
    if len(nodes) < 2:
        return
    marker = f".storage-probe-{os.getpid()}-{time.time_ns()}"
    storage.write_bytes(run.join(marker), b"ok")
    try:
        probe = ray.remote(num_cpus=0)(_probe_storage)
        refs = {
            n["NodeManagerAddress"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(run.uri, marker)
            for n in nodes
        }
        for address, ref in refs.items():
            problem = ray.get(ref, timeout=120)
            if problem:
                raise RaysegError(
                    f"{run.uri}: not reachable from node {address} ({problem}); "
                    "use storage every node shares (s3:// or a shared filesystem)"
                )
    finally:
        storage.delete(run.join(marker))


def _probe_storage(uri: str, marker: str) -> str | None:
    from rayseg import storage

    try:
        loc = storage.locate(uri)
        if not storage.exists(loc.join(marker)):
            return "a file the driver wrote there is not visible"
    except (OSError, RaysegError) as e:
        return str(e)
    return None


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
