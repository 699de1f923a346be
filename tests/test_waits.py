"""rayseg.waits: one line for work Ray cannot place, after a short while, then now and then."""

from __future__ import annotations

from rayseg import waits
from rayseg.waits import Need, ResourceWatch

DATA = Need("data loading", (("CPU", 1.0),))


def test_purpose_names_rays_work_in_user_words():
    assert waits.purpose("ReadParquet->Filter->MapBatches(train_batch)") == "data loading"
    assert waits.purpose("MapBatches(val_batch)") == "data loading"
    assert waits.purpose("RayTrainWorker") == "a training worker"
    assert waits.purpose("render_shard") == "mask rendering"
    assert waits.purpose("FooterReader") == waits.purpose("ListFiles") == "data loading"
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
