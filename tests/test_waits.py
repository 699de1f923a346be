"""rayseg.waits: one line for work Ray cannot place, after a short while, then now and then."""

from __future__ import annotations

import pytest

from rayseg import feed, waits
from rayseg.waits import Need, ResourceWatch

DATA = Need("data loading", (("CPU", 1.0),))


def test_purpose_names_rays_work_in_user_words():
    assert waits.purpose(feed.TASK_NAME) == "data loading"  # training's data tasks
    assert waits.purpose("RayTrainWorker") == "a training worker"
    assert waits.purpose("render_shard") == "mask rendering"
    assert waits.purpose("PlacementGroupCleaner") is None  # Ray's own: not said


def test_describe_wait_says_what_holds_the_cpus():
    line = waits.describe_wait(
        DATA,
        60.4,
        total={"CPU": 2.0, "memory": 1e9},
        available={"CPU": 0.0},
        held={"training workers": 2.0},
    )
    assert line == (
        "waiting 60 s for 1 CPU for data loading; "
        "the cluster has 2 CPUs, 2 held by training workers"
    )
    anonymous = waits.describe_wait(
        Need("mask rendering", (("CPU", 1.0), ("memory", 5.0), ("node:__internal_head__", 1.0))),
        31,
        total={"CPU": 3.0},
        available={"CPU": 0.5},
        held={},
    )
    assert anonymous.endswith("for 1 CPU for mask rendering; the cluster has 3 CPUs, 2.5 in use")


def test_watch_speaks_after_the_wait_then_every_so_often():
    now = [0.0]
    pending = [[DATA]]
    said = []
    watch = ResourceWatch(
        held={"training workers": 2.0},
        after=30,
        every=60,
        needs=lambda: pending[0],
        resources=lambda: ({"CPU": 2.0}, {"CPU": 0.0}),
        clock=lambda: now[0],
        say=said.append,
    )
    for t in (0, 10, 29):
        now[0] = t
        assert watch.check() == []
    now[0] = 30
    assert watch.check() == [
        "waiting 30 s for 1 CPU for data loading; "
        "the cluster has 2 CPUs, 2 held by training workers"
    ]
    now[0] = 60
    assert watch.check() == []  # said 30 s ago
    now[0] = 90
    assert watch.check()[0].startswith("waiting 90 s")
    pending[0] = []  # placed: the wait is over and forgotten
    now[0] = 100
    assert watch.check() == []
    pending[0] = [DATA]
    now[0] = 110
    assert watch.check() == []  # a new wait starts from zero


def test_watch_keeps_quiet_about_work_that_waits_on_nothing_held():
    # Ray Data's 0-CPU actors starting on a busy machine, or a CPU that is free: no resource
    # wait; said only once it lasts 4x `after`.
    now = [0.0]
    starting = Need("data loading", (("memory", 1.0),))
    free = Need("data loading", (("CPU", 1.0),))
    watch = ResourceWatch(
        after=30,
        needs=lambda: [starting, free],
        resources=lambda: ({"CPU": 2.0}, {"CPU": 1.0}),
        clock=lambda: now[0],
    )
    for t in (0, 30, 60, 119):
        now[0] = t
        assert watch.check() == []
    now[0] = 120
    lines = watch.check()
    assert len(lines) == 2 and all(x.startswith("waiting 120 s for") for x in lines)
    assert any(x.endswith("2 CPUs, 1 in use") for x in lines)


def test_watch_thread_reports_and_stops():
    import threading

    seen = threading.Event()
    said = []

    def say(line):
        said.append(line)
        seen.set()

    with ResourceWatch(
        after=0,
        interval=0.01,
        needs=lambda: [DATA],
        resources=lambda: ({"CPU": 1.0}, {"CPU": 0.0}),
        say=say,
    ) as watch:
        assert seen.wait(10)
    assert not watch._thread.is_alive()
    assert said[0].startswith("waiting 0 s for 1 CPU for data loading")


def test_watch_says_once_when_it_cannot_see():
    said = []

    def broken():
        raise ConnectionError("no dashboard")

    watch = ResourceWatch(interval=0.01, needs=broken, say=said.append)
    with watch:
        watch._thread.join(10)
    assert said == ["(cannot see what Ray is waiting for: ConnectionError: no dashboard)"]


class Ref:
    """Stands for a Ray ObjectRef: all LostNodes asks of one is its task's id."""

    def __init__(self, task: str):
        self.task = task

    def task_id(self):
        return bytes.fromhex(self.task)


def test_stranded_takes_each_tasks_latest_attempt():
    attempts = [
        waits.Attempt("aa", 0, "dead"),  # retried by Ray on a live node since
        waits.Attempt("aa", 1, "live"),
        waits.Attempt("bb", 0, "dead"),
        waits.Attempt("cc", 0, None),  # not placed yet
        waits.Attempt("dd", 0, "dead"),  # not one of ours (finished)
    ]
    pending = {"aa": 1, "bb": 2, "cc": 3, "ee": 4}  # ee: not in the state API yet
    assert waits.stranded(pending, attempts, {"dead"}) == [2]
    assert waits.stranded(pending, attempts, {"dead"}, unplaced=True) == [2, 3, 4]


def test_away_from_is_a_label_selector_ray_accepts():
    from ray._private.label_utils import validate_label_selector

    ids = {"a" * 56, "b" * 56}  # Ray's node ids: 56 hex digits
    selector = waits.away_from(ids)
    assert selector == {"ray.io/node-id": f"!in({'a' * 56}, {'b' * 56})"}
    assert validate_label_selector(selector) is None  # Ray's own check of .options(...)


def test_lost_nodes_moves_stranded_and_unplaced_refs_away_from_a_new_death():
    now = [0.0]
    dead = {"old": "198.51.100.99"}  # dead before the run: no news
    said = []
    attempts = [waits.Attempt("0a", 0, "n1"), waits.Attempt("0b", 0, "n2")]
    lost = waits.LostNodes(
        "render_shard",
        what="shard",
        say=said.append,
        dead_nodes=lambda: dict(dead),
        attempts=lambda name: attempts if name == "render_shard" else [],
        clock=lambda: now[0],
    )
    a, b, c = Ref("0a"), Ref("0b"), Ref("0c")  # c: not placed yet
    assert lost.stranded({a: 0, b: 1, c: 2}) == [] and lost.lost == {} and said == []
    dead["n2"] = "198.51.100.12"
    now[0] = 10.0
    assert lost.stranded({a: 0, b: 1, c: 2}) == [b, c]  # on the lost node, and not placed
    assert lost.lost == {"n2": "198.51.100.12"}
    assert said == ["lost 198.51.100.12; submitting 2 shards again, away from it"]
    now[0] = 20.0  # the next look: only what sits on the lost node (none now)
    assert lost.stranded({a: 0, Ref("0d"): 3}) == []
    now[0] = 80.0  # a minute after the death, nothing more is looked for
    attempts.append(waits.Attempt("0e", 0, "n2"))
    assert lost.stranded({Ref("0e"): 4}) == []
    assert len(said) == 1


def test_lost_nodes_leaves_it_to_ray_without_a_state_api():
    def no_dashboard(name):
        raise ConnectionError("no dashboard")

    dead: dict[str, str] = {}
    lost = waits.LostNodes(
        "render_shard", dead_nodes=lambda: dict(dead), attempts=no_dashboard, say=print
    )
    assert lost.stranded({Ref("0a"): 0}) == []
    dead["n1"] = "x"
    assert lost.stranded({Ref("0a"): 0}) == []


def test_a_task_sent_away_from_lost_nodes_runs_on_the_others(ray_local):
    import ray

    gone = {"a" * 56}  # a node id no node has
    task = ray.remote(lambda: ray.get_runtime_context().get_node_id())
    here = ray.get(task.options(label_selector=waits.away_from(gone)).remote(), timeout=120)
    assert here not in gone
    with pytest.raises(ray.exceptions.GetTimeoutError):  # and never on a node it excludes
        ray.get(task.options(label_selector=waits.away_from({here})).remote(), timeout=5)
