"""Every use of a private Ray API in rayseg: what each works around, and what it falls back to.

Checked on Ray CHECKED_RAY. tests/test_raycompat.py fails on any other Ray, so an upgrade is a
deliberate act: re-check each touch below against the new Ray, then update CHECKED_RAY.

Each touch first checks that what it needs is there. Where it is not, Ray's own behaviour stays
in place and `fell_back` says so once per process, on stderr (never a silent no-op):
- end_autoscaler_monitor   ray._private.worker._global_node.all_processes["monitor"]
- logs_dir                 ray._private.worker.global_worker.node.get_logs_dir_path()
- ray_sigterm_handler_held ray._private.utils.set_sigterm_handler, patched during ray.init
- route_worker_output      ray._private.worker.print_to_stdstream and the "ray_print_logs"
                           handler of ray._private.ray_logging's stdstream dispatcher
- keep_sigint_handler      DataParallelTrainer._register_sigint_handler (Ray Train V2)
- sync_train_snapshot      Ray Train V2's checkpoint_manager_snapshot.json, rewritten
- embedded_init_options    ray.init's `_system_config` (Ray's testing-only argument)
- submitted_runtime_env    RAY_JOB_CONFIG_JSON_ENV_VAR, set by Ray's job supervisor
- train_worker_env         the env_vars Ray Train V2 gives its workers (ray.train.v2._internal)
- in_chunks / joined       how Ray copies an object's buffers into its object store and lays
                           them out there (serialization.pxi, not an API: no import of it)
Ray is imported inside the functions that use it.
"""

from __future__ import annotations

import json
import logging
import pickle
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rayseg.storage import Location

CHECKED_RAY = "2.60.0"
log = logging.getLogger("rayseg.raycompat")  # no handler: Python prints warnings on stderr
_SAID: set[str] = set()  # the touches that fell back in this process


def fell_back(touch: str, consequence: str) -> None:
    """Say once per process that `touch` found Ray not as checked, and what Ray does instead."""
    if touch in _SAID:
        return
    _SAID.add(touch)
    log.warning(
        "rayseg: %s is not as rayseg expects (checked on Ray %s, running Ray %s); "
        "Ray's own behaviour stays: %s",
        touch,
        CHECKED_RAY,
        installed_ray(),
        consequence,
    )


def installed_ray() -> str:
    """The installed Ray's version (without importing Ray)."""
    from importlib import metadata

    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "(not installed)"


# ---- ray.init and ray.shutdown ---------------------------------------------------------------


def embedded_init_options() -> dict[str, Any]:
    """ray.init's private options for an embedded Ray: no metrics exporter (nothing reads it).

    Works around: the exporter's start-up time. `_system_config` is ray.init's testing-only
    argument and `enable_metrics_collection` a RayConfig key of Ray's C++ core (checked on Ray
    2.60.0). A key Ray no longer knows is fatal to its GCS ("Received unexpected config
    parameter"), and ray.init then fails only after a timeout, so it is passed to the Ray it
    was checked on alone. Fallback, on any other Ray: Ray's defaults (the exporter runs).
    """
    import ray

    if ray.__version__ != CHECKED_RAY:
        fell_back(
            "ray.init(_system_config={'enable_metrics_collection': False})",
            "an embedded Ray starts its metrics exporter",
        )
        return {}
    return {"_system_config": {"enable_metrics_collection": False}}


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_runtime_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The runtime_env a `ray job submit` gave this driver ({} for a driver not submitted).

    Works around: ray.init refuses to merge its runtime_env with the submitted job's where
    both set a key, and Ray has no public API for the submitted one. Checked on Ray 2.60.0:
    the job supervisor passes the job config as JSON in RAY_JOB_CONFIG_JSON_ENV_VAR
    (ray._private.runtime_env.constants), which ray.init reads. Fallback: a variable that is
    not JSON of that shape is said once and read as {}; were it renamed, ray.init's own merge
    refuses a key given twice with its own error.
    """
    raw = environ.get(JOB_CONFIG_ENV) or "{}"
    try:
        given = json.loads(raw).get("runtime_env") or {}
        if not isinstance(given, dict):
            raise TypeError(type(given).__name__)
    except (ValueError, AttributeError, TypeError):
        fell_back(JOB_CONFIG_ENV, "ray.init merges the submitted runtime_env as Ray does")
        return {}
    return given


def end_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the Ray this process started, before ray.shutdown.

    Works around: ray.shutdown stops the GCS first and then the monitor, whose SIGTERM handler
    reports to the dead GCS until Ray kills it a second later: 1.0 of the 1.35 s a shutdown
    takes. Ray's process table is private (checked on Ray 2.60.0:
    ray._private.worker._global_node.all_processes["monitor"], a list of ProcessInfo whose
    `.process` is a Popen). Fallback: ray.shutdown stops the monitor itself, a second later.
    """
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    processes = getattr(node, "all_processes", None)
    monitors = processes.get("monitor") if isinstance(processes, dict) else None
    popens = [getattr(info, "process", None) for info in monitors or []]
    if not monitors or not all(hasattr(p, "poll") and hasattr(p, "kill") for p in popens):
        fell_back(
            "ray._private.worker._global_node.all_processes['monitor']",
            "ray.shutdown stops the autoscaler monitor, about a second slower",
        )
        return
    for process in popens:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=1)


@contextmanager
def ray_sigterm_handler_held() -> Iterator[None]:
    """Inside (ray.init), Ray does not install its own SIGTERM handler; the caller's stays.

    Works around: ray.init installs a SIGTERM handler (sys.exit(15)) that would replace
    rayseg's (signals.signals_deferred) and end the driver halfway through starting Ray. Checked
    on Ray 2.60.0: ray.init and Node call ray._private.utils.set_sigterm_handler, made a no-op
    here. Fallback: Ray's handler is in place while ray.init runs (a SIGTERM then exits at
    once); a patch that did not hold is also reported, when the handler is found replaced.
    """
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if not callable(original):
        fell_back(
            "ray._private.utils.set_sigterm_handler",
            "a SIGTERM while ray.init runs ends rayseg at once, without its last line",
        )
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
        if on_main_thread() and signal.getsignal(signal.SIGTERM) is not before:
            fell_back(
                "ray._private.utils.set_sigterm_handler (ray.init set SIGTERM another way)",
                "a SIGTERM while ray.init runs ends rayseg at once, without its last line",
            )


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ---- Ray's output on the driver --------------------------------------------------------------


def logs_dir() -> str | None:
    """The connected Ray session's logs folder (None, said once, where Ray has moved it).

    Ray has no public API for it. Checked on Ray 2.60.0:
    ray._private.worker.global_worker.node.get_logs_dir_path(). Fallback: the caller leaves the
    process's fd 2 on the terminal, where Ray's C++ core prints its error-level lines.
    """
    from ray._private import worker

    node = getattr(getattr(worker, "global_worker", None), "node", None)
    get_path = getattr(node, "get_logs_dir_path", None)
    if not callable(get_path):
        fell_back(
            "ray._private.worker.global_worker.node.get_logs_dir_path",
            "the driver's C++ error-level lines reach the terminal",
        )
        return None
    return get_path()


RAY_PRINT_HANDLER = "ray_print_logs"  # the dispatcher handler ray.init adds with log_to_driver


def route_worker_output(make_forward: Callable[[Callable[..., None]], Callable[..., None]]) -> bool:
    """Ray's two driver-side printers replaced by make_forward(Ray's printer) (after ray.init).

    Works around: Ray prints what its processes write, and the raylet's error messages, on the
    driver with a `(pid)` prefix and no filter. Checked on Ray 2.60.0: both go through
    ray._private.worker.print_to_stdstream (the error listener by module global, log_to_driver
    through the handler named "ray_print_logs" of ray._private.ray_logging's
    global_worker_stdstream_dispatcher, whose `handlers` is a list of (name, handler)).
    Fallback: False; Ray's printers stay (every line with Ray's prefix, rayseg's marked lines
    and progress messages as they were written).
    """
    from ray._private import ray_logging
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    handlers = getattr(dispatcher, "handlers", None)
    known = isinstance(handlers, list) and any(
        isinstance(pair, tuple) and pair[:1] == (RAY_PRINT_HANDLER,) for pair in handlers
    )
    if not callable(printer) or not known:
        fell_back(
            "ray._private.worker.print_to_stdstream / the 'ray_print_logs' handler",
            "what Ray's processes print reaches the terminal as Ray prints it",
        )
        return False
    ray_print = getattr(printer, "ray_print", printer)  # ours already, from an earlier init
    forward = make_forward(ray_print)
    forward.ray_print = ray_print  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = forward
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, forward)
    return True


# ---- Ray Train -------------------------------------------------------------------------------


def keep_sigint_handler(trainer: Any) -> None:
    """trainer.fit() leaves the process's SIGINT handler (rayseg's) in place.

    Works around: Ray Train's fit() swaps in its own SIGINT handler (it aborts the run, then
    exits 1), so Ctrl-C would not end with rayseg's line and exit 130. Checked on Ray 2.60.0:
    DataParallelTrainer._register_sigint_handler(controller), called from fit() on the main
    thread. Fallback: Ray Train's handler is installed during fit().
    """
    if not callable(getattr(trainer, "_register_sigint_handler", None)):
        fell_back(
            "ray.train DataParallelTrainer._register_sigint_handler",
            "Ctrl-C during training aborts the run Ray Train's way and exits 1",
        )
        return
    trainer._register_sigint_handler = lambda controller: None


def train_worker_env() -> dict[str, Any]:
    """The runtime_env of Ray Train's workers, as the driver can know it before fit().

    Works around: Ray lends an idle worker process only to a task of the same runtime_env, and
    the tasks a training worker starts inherit the one Ray Train gives it, which no public API
    names (rayseg.prestart starts data-loading processes ahead of them). Checked on Ray 2.60.0:
    DataParallelTrainer gives its controller get_env_vars_to_propagate() plus
    RAY_WARN_BLOCKING_GET_INSIDE_ASYNC (default "0"), and the controller passes them on to each
    worker. Fallback: {} (the processes start with the job's runtime_env; the first epoch's
    tasks then start their own, as without rayseg.prestart).
    """
    try:
        from ray.train.v2._internal import constants
    except ImportError:
        constants = None
    needs = (
        "get_env_vars_to_propagate",
        "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR",
        "DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE",
    )
    if constants is None or not all(hasattr(constants, name) for name in needs):
        fell_back(
            "ray.train.v2._internal.constants (Ray Train's worker env_vars)",
            "the first epoch's data tasks start their own processes",
        )
        return {}
    env = dict(constants.get_env_vars_to_propagate())
    env.setdefault(
        constants.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
        constants.DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
    )
    return {"env_vars": env}


TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's CheckpointManager state


def sync_train_snapshot(run: Location, keep: set[str]) -> None:
    """Ray Train's snapshot of the run (if any) without the checkpoint folders not in `keep`.

    Works around: Ray Train hands the latest checkpoint it lists to the workers (an unreadable
    one fails every attempt), refuses to start if one is missing, and may later delete a new
    checkpoint written to the folder of one it remembers. The file is Ray Train V2's private
    _CheckpointManagerState (checked on Ray 2.60.0; drop_from_snapshot names its fields).
    Fallback: a snapshot of another shape is deleted, said once; Ray Train then starts as it
    does on a run without one (rayseg still resumes from its own newest checkpoint).
    """
    from rayseg import storage

    loc = run.join(TRAIN_SNAPSHOT)
    if not storage.exists(loc):
        return
    try:
        snapshot = storage.read_json(loc)
    except ValueError:  # cut short while Ray wrote it: Ray Train starts without one
        storage.delete(loc)
        return
    try:
        synced = drop_from_snapshot(snapshot, keep)
    except (KeyError, TypeError, AttributeError, ValueError):
        storage.delete(loc)
        fell_back(
            f"Ray Train's {TRAIN_SNAPSHOT}",
            f"{loc.uri} removed; Ray Train starts without its list of checkpoints",
        )
        return
    if synced != snapshot:
        storage.write_json(loc, synced)


def drop_from_snapshot(snapshot: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """Ray Train V2's CheckpointManager state with only the checkpoint folders `keep`."""
    snapshot = dict(snapshot)
    pairs = zip(snapshot["checkpoint_report_indices"], snapshot["checkpoint_results"], strict=True)
    kept = [(i, r) for i, r in pairs if r["checkpoint_dir_name"] in keep]
    snapshot["checkpoint_report_indices"] = [i for i, _ in kept]
    snapshot["checkpoint_results"] = [r for _, r in kept]
    latest = snapshot.get("latest_checkpoint_result")
    if latest and latest["checkpoint_dir_name"] not in keep:
        snapshot["latest_checkpoint_result"] = max(kept, key=lambda p: p[0])[1] if kept else None
    pending = zip(
        snapshot["pending_training_results"], snapshot["pending_validation_specs"], strict=True
    )
    still = [(r, v) for r, v in pending if r["checkpoint_dir_name"] in keep]
    snapshot["pending_training_results"] = [r for r, _ in still]
    snapshot["pending_validation_specs"] = [v for _, v in still]
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        snapshot[key] = [n for n in snapshot.get(key, []) if n in keep]
    return snapshot


# ---- Ray's object store -----------------------------------------------------------------------

# Ray writes each out-of-band buffer of an object (a numpy array's bytes) into its object store
# with memcpy on the calling thread up to 1 MiB, with 6 helper threads above (MEMCOPY_THREADS and
# kMemcopyDefaultThreshold in Ray's serialization.pxi, fixed when Ray is built), each buffer
# from a multiple of 64 bytes, one after the other. A multiple of 64 itself, so chunks of this
# size lie back to back.
CHUNK = 1 << 20


def in_chunks(array: np.ndarray) -> Any:
    """`array` as a data task hands it to Ray: InChunks where it is over CHUNK bytes."""
    if array.dtype.hasobject or array.nbytes <= CHUNK:
        return array
    return InChunks(array)


class InChunks:
    """An array that pickles (protocol 5) as out-of-band buffers of at most CHUNK bytes, and
    unpickles as one array again (`joined`).

    Works around: Ray's copy of a larger buffer with 6 helper threads. Where data tasks keep
    every core busy, the task waits at its yield for threads queued behind the other tasks;
    buffers of CHUNK bytes it copies itself (issue 22: +4.5% of the ingest's images per second,
    bench/paired_bench.py --change chunks). Checked on Ray 2.60.0. Fallback: where the chunks
    do not lie back to back, `joined` copies them into one array, said once.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce_ex__(self, protocol: int):
        if protocol < 5:  # no out-of-band buffers: pickled as the array itself
            return self.array.__reduce_ex__(protocol)
        flat = np.ascontiguousarray(self.array).reshape(-1).view(np.uint8)
        chunks = [pickle.PickleBuffer(flat[i : i + CHUNK]) for i in range(0, flat.size, CHUNK)]
        return joined, (self.array.shape, self.array.dtype.str, *chunks)


def joined(shape: tuple[int, ...], dtype: str, *chunks: Any) -> np.ndarray:
    """InChunks unpickled: its chunks as one read-only array, a view of their memory where each
    starts where the one before ends (as Ray lays them out in its object store), else a copy."""
    parts = [np.frombuffer(c, np.uint8) for c in chunks]
    if not parts:
        return np.empty(shape, dtype)
    ends = [p.ctypes.data + p.nbytes for p in parts[:-1]]
    if ends == [p.ctypes.data for p in parts[1:]]:
        flat = np.asarray(_Span(parts))
    else:
        fell_back(
            "Ray's layout of an object's buffers (back to back in its object store)",
            "each array handed over in chunks is copied into one where it is read",
        )
        flat = np.concatenate(parts)
        flat.flags.writeable = False
    return flat.view(dtype).reshape(shape)


class _Span:
    """Parts lying back to back, as one uint8 array interface that keeps them (and so their
    memory) alive."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.__array_interface__ = {
            "shape": (sum(p.nbytes for p in parts),),
            "typestr": "|u1",
            "data": (parts[0].ctypes.data, True),  # read-only, as Ray's arrays are
            "version": 3,
        }
