"""Say what a run waits for: work Ray cannot place, for longer than a short while, in one line.

A Ray cluster that lost a node, or whose CPUs are all held, leaves tasks pending without a word
(`ray status` shows "Pending Demands"). ResourceWatch is a driver thread, around a long call
(training, a masks run): every `interval` seconds it asks Ray's state API for tasks and actors
waiting for a node, and once the same need has waited `after` seconds it prints, then every
`every` seconds while it lasts:

    waiting 60 s for 1 CPU for data loading; the cluster has 2 CPUs, 2 held by training workers

`describe_wait` is the pure part (what to say); `pending_needs` the Ray part (what is pending).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Ray's states for work that waits for a place to run (the state API's names).
PENDING_TASK = "PENDING_NODE_ASSIGNMENT"
PENDING_ACTOR = "PENDING_CREATION"


@dataclass(frozen=True)
class Need:
    """One kind of pending work: what it is for and the resources each one asks for."""

    what: str
    resources: tuple[tuple[str, float], ...]


# The name of training's data-loading tasks (rayseg.feed's).
DATA_TASK = "load_data"


def purpose(name: str) -> str | None:
    """A user's word for a Ray task or actor name (None: Ray's own, not the user's work)."""
    if name == DATA_TASK:
        return "data loading"
    if "RayTrainWorker" in name:
        return "a training worker"
    if name == "render_shard":
        return "mask rendering"
    return None


def counted(resources: Mapping[str, float]) -> dict[str, float]:
    """The resources a user sizes a cluster by (Ray's memory, bundle and node keys left out)."""
    return {
        k: v
        for k, v in sorted(resources.items())
        if v
        and k not in ("memory", "object_store_memory")
        and "_group_" not in k
        and not k.startswith("node:")
    }


def amount(resources: Mapping[str, float]) -> str:
    """'1 CPU', '0.5 CPU and 1 GPU'."""
    return " and ".join(f"{v:g} {k}" for k, v in counted(resources).items()) or "resources"


def short(need: Need, available: Mapping[str, float]) -> bool:
    """The cluster has less free than one of `need` asks for (work that asks for nothing, or
    for what is free, waits on something else: a worker process starting on a busy machine)."""
    return any(available.get(k, 0) < v for k, v in counted(dict(need.resources)).items())


def describe_wait(
    need: Need,
    seconds: float,
    *,
    total: Mapping[str, float],
    available: Mapping[str, float],
    held: Mapping[str, float],
) -> str:
    """One line; `held` names what holds CPUs ({"training workers": 2.0}), if rayseg knows."""
    cpus = total.get("CPU", 0)
    used = cpus - available.get("CPU", 0)
    holders = ", ".join(f"{v:g} held by {k}" for k, v in held.items() if v) or f"{used:g} in use"
    return (
        f"waiting {seconds:.0f} s for {amount(dict(need.resources))} for {need.what}; "
        f"the cluster has {cpus:g} CPUs, {holders}"
    )


def pending_needs() -> list[Need]:
    """Tasks and actors of this job that wait for a node (Ray's state API, via the dashboard)."""
    import ray
    from ray.util.state import list_actors, list_tasks

    job = ray.get_runtime_context().get_job_id()
    needs = []
    for listing, state, name_of in (
        (list_tasks, PENDING_TASK, lambda t: t.name),
        (list_actors, PENDING_ACTOR, lambda a: a.class_name or ""),
    ):
        pending = listing(
            address=ray.get_runtime_context().gcs_address,  # this cluster's, not any on the machine
            filters=[("state", "=", state), ("job_id", "=", job)],
            detail=True,
            timeout=10,
            raise_on_missing_output=False,
        )
        for item in pending:
            if what := purpose(name_of(item)):
                needs.append(Need(what, tuple(sorted((item.required_resources or {}).items()))))
    return needs


def starved_data(held_cpus: float, data_cpus: float) -> list[Need]:
    """Data loading, when the workers hold so much of the cluster's CPUs that none of its tasks
    fits (as after a lost node), known from the resources alone: a Feed submits only a few
    tasks per epoch, and between epochs none may be pending for the state API to show."""
    import ray

    if ray.cluster_resources().get("CPU", 0) - held_cpus < data_cpus - 1e-9:
        return [Need("data loading", (("CPU", data_cpus),))]
    return []


def cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
    import ray

    return ray.cluster_resources(), ray.available_resources()


@dataclass
class ResourceWatch:
    """A driver thread saying what pending work waits for (see the module docstring)."""

    held: Mapping[str, float] = field(default_factory=dict)
    after: float = 30.0
    every: float = 60.0
    interval: float = 5.0
    say: Callable[[str], None] = print
    needs: Callable[[], list[Need]] = pending_needs
    resources: Callable[[], tuple[dict[str, float], dict[str, float]]] = cluster_resources
    clock: Callable[[], float] = time.monotonic
    _since: dict[Need, float] = field(default_factory=dict)
    _said: dict[Need, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def check(self) -> list[str]:
        """One look: the lines due now (and the waits remembered for the next look)."""
        now = self.clock()
        pending = set(self.needs())
        self._since = {n: self._since.get(n, now) for n in pending}
        self._said = {n: t for n, t in self._said.items() if n in pending}
        due = [
            n
            for n, since in self._since.items()
            if now - since >= self.after and now - self._said.get(n, -float("inf")) >= self.every
        ]
        if not due:
            return []
        total, available = self.resources()
        # Past 4x `after`, a wait is said whatever it waits on (a CPU free on no single node).
        due = [n for n in due if short(n, available) or now - self._since[n] >= 4 * self.after]
        lines = []
        for need in due:
            self._said[need] = now
            lines.append(
                describe_wait(
                    need, now - self._since[need], total=total, available=available, held=self.held
                )
            )
        return lines

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                lines = self.check()
            except Exception as e:  # the state API is the dashboard's; without it, say so once
                self.say(f"(cannot see what Ray is waiting for: {type(e).__name__}: {e})")
                return
            for line in lines:
                self.say(line)

    def __enter__(self) -> ResourceWatch:
        self._thread = threading.Thread(target=self._run, name="rayseg-waits", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


# ---- work stranded on a lost node ------------------------------------------------------------
#
# A node cut off from the network (not crashed: its TCP connections get no reset) is marked dead
# by the GCS within its health-check timeout, but the owner of a task running there learns it only
# when gRPC's keepalive gives up on the call: about 7 minutes at Ray 2.60's defaults
# (grpc_client_keepalive_time_ms 300 s + grpc_client_keepalive_timeout_ms 120 s). Until then the
# task's ref stays pending and Ray does not retry it. A driver whose tasks are idempotent can look
# for itself and submit them again.


@dataclass(frozen=True)
class Attempt:
    """One attempt of a task, as Ray's state API lists it."""

    task_id: str
    attempt: int
    node_id: str | None


def stranded(
    pending: Mapping[str, Any], attempts: list[Attempt], dead: set[str], *, unplaced: bool = False
) -> list[Any]:
    """The keys of the pending tasks to submit again: each whose latest attempt was placed on a
    dead node, and with `unplaced` each not placed on a node yet.

    `pending`: task id (hex) -> the caller's key for that task."""
    latest: dict[str, Attempt] = {}
    for a in attempts:
        if a.task_id in pending and a.attempt >= latest.get(a.task_id, a).attempt:
            latest[a.task_id] = a
    keys = []
    for task_id, key in pending.items():
        node = latest[task_id].node_id if task_id in latest else None
        if node in dead or (unplaced and not node):
            keys.append(key)
    return keys


def away_from(nodes: set[str]) -> dict[str, str]:
    """A label selector (Ray's `label_selector=`) for any node but `nodes` (node ids)."""
    return {"ray.io/node-id": f"!in({', '.join(sorted(nodes))})"}


def dead_nodes() -> dict[str, str]:
    """Node id -> address of every node the GCS has marked dead."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if not n["Alive"]}


def task_attempts(name: str) -> list[Attempt]:
    """Every attempt of this job's tasks called `name` (Ray's state API, via the dashboard)."""
    import ray
    from ray.util.state import list_tasks

    job = ray.get_runtime_context().get_job_id()
    tasks = list_tasks(
        address=ray.get_runtime_context().gcs_address,
        filters=[("job_id", "=", job), ("name", "=", name)],
        limit=10_000,
        timeout=10,
        raise_on_missing_output=False,
    )
    return [Attempt(t.task_id, t.attempt_number, t.node_id) for t in tasks]


@dataclass
class LostNodes:
    """Tasks (idempotent ones) stranded by a node the cluster lost without a word: the driver's
    look, every so often, at which of its pending refs to submit again, away from that node.

    Two kinds are stranded. Tasks running there: their owner hears of the node's death only
    when gRPC gives up on the call. And tasks not placed yet: the owner's requests for workers
    for their kind of task wait on the lost node the same way, and new tasks of that kind queue
    behind them, while the other nodes sit idle (seen on Ray 2.60: "no resource demands", CPUs
    free, tasks PENDING_NODE_ASSIGNMENT). Tasks submitted again with a label selector that
    excludes the lost nodes (`away_from(self.lost)`) are a new kind with requests of their own.
    Looks for `watch_s` after each newly dead node (the state API's record of where a task runs
    arrives within seconds); says which node was lost."""

    name: str  # the Ray task's name
    what: str = "task"  # the user's word for one task
    say: Callable[[str], None] = print
    watch_s: float = 60.0
    dead_nodes: Callable[[], dict[str, str]] = dead_nodes
    attempts: Callable[[str], list[Attempt]] = task_attempts
    clock: Callable[[], float] = time.monotonic
    lost: dict[str, str] = field(default_factory=dict)  # node id -> address, died since start
    _known: dict[str, str] | None = None  # every dead node seen; the first look's: before start
    _since: float = -float("inf")
    _move_unplaced: bool = False

    def stranded(self, pending: Mapping[Any, Any]) -> list[Any]:
        """The refs in `pending` to submit again (each ref has Ray's `task_id()`), away from
        `self.lost`: those placed on a dead node, and after a new death those not placed."""
        dead = self.dead_nodes()
        if self._known is None:  # the first look: nodes dead before the run are no news
            self._known = dict(dead)
        new = {n: a for n, a in dead.items() if n not in self._known}
        if new:
            self._known.update(new)
            self.lost.update(new)
            self._since = self.clock()
            self._move_unplaced = True
        if not pending or self.clock() - self._since > self.watch_s:
            return []
        try:
            attempts = self.attempts(self.name)
        except Exception:  # noqa: BLE001 - no state API (no dashboard): Ray retries in its time
            return []
        by_task = {ref.task_id().hex(): ref for ref in pending}
        refs = stranded(by_task, attempts, set(dead), unplaced=self._move_unplaced)
        self._move_unplaced = False
        if new or refs:
            where = ", ".join(sorted((new or self.lost).values()))
            n = len(refs)
            self.say(
                f"lost {where}; submitting {n} {self.what}{'' if n == 1 else 's'} again, "
                "away from it"
            )
        return refs
