"""What a command checks of the connected Ray cluster, and how its workers find files.

worker_uri makes a location valid on any worker; check_gpus refuses a GPU run on a cluster
without GPUs; check_storage_reachable refuses a run dir that some node cannot see. Ray is
imported inside the functions that use it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from rayseg.errors import RaysegError

if TYPE_CHECKING:  # storage pulls in pyarrow and OpenCV; Ray stages import it lazily
    from rayseg.storage import Location


def worker_uri(uri: str) -> str:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    from rayseg import storage

    loc = storage.locate(uri)
    return loc.path if loc.is_local else uri


def check_gpus(use_gpu: bool) -> None:
    """RaysegError if `use_gpu` and the connected cluster has no GPU."""
    import ray

    if use_gpu and not ray.cluster_resources().get("GPU", 0):
        raise RaysegError("--use-gpu: the Ray cluster has no GPUs (drop --use-gpu to run on CPUs)")


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
