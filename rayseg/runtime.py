"""Ray plumbing shared by every distributed stage, and progress reporting for long work.

connect_ray joins or starts a cluster (a joined cluster's job gets job_env: the driver's AWS_*
settings for every worker, and netif's socket hook); worker_uri makes a location valid on any
worker; check_gpus refuses a GPU run on a cluster without GPUs. Ray is imported inside the
functions that use it.

Quiet by default: Ray's own warnings, error-level lines of its processes and deprecation warnings
stay in Ray's log files (RAY_TMPDIR/ray/session_*/logs); `rayseg --verbose` (RAYSEG_VERBOSE=1)
shows them. A Ray worker talks to the user with say() / StepReporter: lines marked WORKER_LINE /
WORKER_PROGRESS, which the driver prints bare or turns into a Progress bar.

Signals: under stop_on_signals (cli.main) SIGINT and SIGTERM raise errors.Interrupted in the main
thread, except inside ray.init, where they wait until it returns; stop_ray then ends the Ray
this process started (or leaves the cluster it joined) before the command exits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TextIO

from rayseg.errors import Interrupted, RaysegError

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
    loud = verbose()
    if not loud:
        quiet_ray()
    common = {"logging_level": logging.WARNING if loud else logging.ERROR, "log_to_driver": True}
    if address or os.environ.get("RAY_ADDRESS"):
        with signals_deferred():
            ray.init(address=address or None, runtime_env=job_env(), **common)
            _SIGNALS.connected = True
        quiet_driver(loud)
        return
    # Embedded Ray of our own ("local": never silently join another cluster on this machine).
    # No metrics exporter (nothing reads it) and no dashboard unless asked: start-up stays at
    # seconds. `--address auto` joins a running cluster instead.
    with signals_deferred(), private_tmpdir():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _system_config={"enable_metrics_collection": False},
            **common,
        )
        _SIGNALS.connected = True
    quiet_driver(loud)


def stop_ray() -> None:
    """Leave Ray if connect_ray joined or started it: a Ray of our own stops with all it started.

    Signals that arrive meanwhile are ignored (a third one ends the process at once).
    """
    if not _SIGNALS.connected:
        return
    import ray

    _SIGNALS.connected = False
    _SIGNALS.stopping = True
    end_autoscaler_monitor()
    ray.shutdown()
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


_SCRATCH: list[str] = []  # the temp folders of the Ray this process started (private_tmpdir)


@contextmanager
def private_tmpdir() -> Iterator[None]:
    """Ray's processes started inside get a temp folder of their own, removed by stop_ray.

    The dashboard's forkserver and Ray's workers make temp folders (`pymp-*`, scratch files)
    that a killed process never removes: one per run in /tmp. RAY_TMPDIR is pinned to where Ray
    would put its session folder anyway, so its logs stay where they were.
    """
    system = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    scratch = tempfile.mkdtemp(prefix="rayseg-tmp-", dir=system)
    _SCRATCH.append(scratch)
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "TMPDIR")}
    os.environ.update(RAY_TMPDIR=system, TMPDIR=scratch)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def end_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of a Ray this process started, before ray.shutdown.

    ray.shutdown stops the GCS first and then the monitor, whose SIGTERM handler reports to the
    dead GCS until Ray kills it a second later: 1.0 of the 1.35 s a shutdown takes (measured with
    Ray 2.60). A local Ray's monitor holds nothing to save. Ray's process table is private: where
    it is not as expected, nothing is done and the shutdown only takes longer.
    """
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None)
    if not isinstance(processes, dict):
        return
    for info in processes.get("monitor", []):
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=1)


# ---- signals ---------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class SignalState:
    handling: bool = False  # stop_on_signals is active
    deferring: bool = False  # inside ray.init
    pending: int = 0  # a signal that arrived while deferring
    stopping: bool = False  # Interrupted was raised, or Ray is being stopped
    received: int = 0  # the signal that stopped it (Ray's C++ calls re-raise KeyboardInterrupt)
    seen: int = 0  # signals so far
    connected: bool = False  # connect_ray joined or started Ray


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


@contextmanager
def signals_deferred() -> Iterator[None]:
    """A signal that arrives inside is raised as Interrupted when the block has run.

    For ray.init: cut short, it crashes the driver or leaves Ray's agents running. ray.init also
    installs its own SIGTERM handler (sys.exit(15)), kept out while rayseg handles signals.
    """
    if not _SIGNALS.handling or _SIGNALS.deferring:
        yield
        return
    import ray._private.utils as ray_utils

    set_sigterm_handler = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    _SIGNALS.deferring = True
    try:
        yield
    finally:
        _SIGNALS.deferring = False
        ray_utils.set_sigterm_handler = set_sigterm_handler
        install_signal_handlers()
    if _SIGNALS.pending and not _SIGNALS.stopping:
        _SIGNALS.stopping, _SIGNALS.received = True, _SIGNALS.pending
        raise Interrupted(_SIGNALS.pending)


def quiet_driver(loud: bool) -> None:
    filter_worker_output(show_ray=loud)
    if not loud:
        native_stderr_to_ray_logs()


# ---- quiet output ----------------------------------------------------------------------------

VERBOSE_ENV = "RAYSEG_VERBOSE"
# Prefixes of the lines a Ray worker writes for the user (say, StepReporter); anything else a
# worker prints is Ray's or a library's and reaches the terminal only with --verbose.
WORKER_LINE = "rayseg| "
WORKER_PROGRESS = "rayseg-progress| "


def verbose() -> bool:
    """True under `rayseg --verbose` (the CLI sets RAYSEG_VERBOSE=1; Ray workers inherit it)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def native_stderr_to_ray_logs() -> None:
    """Under the quiet CLI (RAYSEG_VERBOSE=0): the process's fd 2 goes to Ray's logs dir.

    The driver's C++ core worker prints its error-level lines to fd 2 as well as to its log
    file there (python-core-driver-*.log); Python's sys.stderr keeps the terminal.
    """
    import ray

    if os.environ.get(VERBOSE_ENV) != "0":
        return
    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
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


def quiet_ray() -> None:
    """Keep Ray's driver-side warnings off the terminal (before ray.init)."""
    from ray.util.annotations import RayDeprecationWarning

    # The token-auth notice of every new local cluster, and Ray Data's per-dataset INFO lines.
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")


def filter_worker_output(*, show_ray: bool) -> None:
    """Pass what Ray prints from its processes through forward_worker_lines (after ray.init).

    Ray prints two streams on the driver, both through ray._private.worker.print_to_stdstream:
    the output of its processes (log_to_driver, a dispatcher handler named "ray_print_logs")
    and the raylet's error messages. Ours replaces both; Ray's own printer stays for `show_ray`.
    """
    from ray._private import ray_logging
    from ray._private import worker as ray_worker

    ray_print = getattr(ray_worker.print_to_stdstream, "ray_print", ray_worker.print_to_stdstream)
    bars = WorkerBars()

    def forward(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        forward_worker_lines(data, show_ray=show_ray, bars=bars, ray_print=ray_print)

    forward.ray_print = ray_print  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = forward
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", forward)


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


def job_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env of a job on a joined cluster: the driver's AWS_*, and the socket hook.

    On a cluster, tasks run on other hosts under their raylet's environment, not the driver's:
    Ray Data's read tasks, storage probes, Ray Train's workers and their data all reach S3 with
    the driver's endpoint and credentials only through the job's runtime_env (the credentials
    in its setup hook, the rest in env_vars; a job with a hook of its own: all in env_vars).
    Every worker process also runs rayseg.netif.pin_socket_interface, so gloo and NCCL talk on
    the interface of the node's Ray address (Ray takes a setup hook only job-wide). What the
    submitted job already sets (`ray job submit --runtime-env-json`) is left to it: Ray refuses
    to merge a key given twice. An embedded Ray's workers inherit the driver's environment and
    share one host.
    """
    from rayseg.netif import SETUP_HOOK

    environ = os.environ if environ is None else environ
    submitted = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
    given = submitted.get("runtime_env") or {}
    env = {
        k: v
        for k, v in environ.items()
        if k.startswith("AWS_") and k not in (given.get("env_vars") or {})
    }
    own_hook = "worker_process_setup_hook" not in given
    secrets = {k: env.pop(k) for k in SECRET_VARIABLES if k in env} if own_hook else {}
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    if own_hook:
        runtime_env["worker_process_setup_hook"] = worker_setup(secrets) if secrets else SETUP_HOOK
    return runtime_env


# Ray writes a runtime_env's env_vars into every node's runtime_env_agent.log and onto worker
# command lines (`ps`); credentials travel inside the setup hook instead, which Ray pickles into
# its GCS (checked on Ray 2.60 with the namespace cluster, tests/cluster).
SECRET_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
)  # fmt: skip


def worker_setup(secrets: dict[str, str]) -> Callable[[], None]:
    """A job's worker_process_setup_hook that gives each worker the driver's `secrets`, then
    pins the socket interface (rayseg.netif); Ray ships it by value (cloudpickle)."""

    def setup_worker() -> None:
        from rayseg.netif import pin_socket_interface

        os.environ.update(secrets)
        pin_socket_interface()

    return setup_worker


def map_with_actors(
    ds: Any,
    actor: type,
    *,
    constructor_kwargs: dict[str, Any],
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
) -> Any:
    """ds.map_batches through a fixed pool of `num_actors` `actor`s (a GPU each with use_gpu).

    `ds` is a ray.data.Dataset; each actor is built once (a model loaded once per replica).
    """
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
    )


def rows_with_progress(ds: Any, *, total: int, label: str) -> Iterator[dict[str, Any]]:
    """ds.iter_rows() with a Progress of rows done (Ray Data's own bars only with --verbose)."""
    quiet_ray_data()
    progress = Progress(total, label)
    try:
        for row in ds.iter_rows():
            progress.update(1)
            yield row
    finally:
        progress.close()


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
