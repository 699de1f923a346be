"""rayseg.raycompat: the one home of rayseg's private Ray touches, and what each falls back to.

The first test pins Ray's version (an upgrade is a deliberate act). Then, per touch: with what
it needs taken away (monkeypatched), Ray's own behaviour stays in place and one line says so;
with it present, the touch does its work. The last test starts a real Ray and checks that no
touch falls back on the installed Ray.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from rayseg import raycompat, rayoutput, storage
from rayseg.signals import signals_deferred, stop_on_signals

FELL_BACK = "is not as rayseg expects"


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    """Each test starts with no touch said to have fallen back in this process."""
    monkeypatch.setattr(raycompat, "_SAID", set())


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rayseg.raycompat"]


def test_installed_ray_is_the_one_raycompat_was_checked_on():
    import ray

    assert ray.__version__ == raycompat.CHECKED_RAY, (
        f"Ray {ray.__version__} is installed, but rayseg/raycompat.py was checked on Ray "
        f"{raycompat.CHECKED_RAY}: re-check each private Ray touch listed there against this "
        "Ray (tests/test_raycompat.py exercises each), then set CHECKED_RAY"
    )


def test_a_fallback_is_said_once_naming_both_versions(caplog):
    with caplog.at_level(logging.WARNING):
        raycompat.fell_back("ray.thing", "Ray does it its own way")
        raycompat.fell_back("ray.thing", "Ray does it its own way")
    (line,) = notices(caplog)
    assert line.startswith(f"rayseg: ray.thing {FELL_BACK} (checked on Ray {raycompat.CHECKED_RAY}")
    assert f"running Ray {raycompat.installed_ray()})" in line
    assert line.endswith("Ray's own behaviour stays: Ray does it its own way")


# ---- embedded_init_options ------------------------------------------------------------------


def test_an_embedded_ray_starts_without_its_metrics_exporter():
    assert raycompat.embedded_init_options() == {
        "_system_config": {"enable_metrics_collection": False}
    }


def test_on_another_ray_an_embedded_ray_keeps_ray_s_defaults(monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray, "__version__", "9.0.0")
    with caplog.at_level(logging.WARNING):
        assert raycompat.embedded_init_options() == {}
    (line,) = notices(caplog)
    assert "_system_config" in line and "starts its metrics exporter" in line


# ---- submitted_runtime_env ------------------------------------------------------------------


def test_the_submitted_runtime_env_is_read_where_ray_s_job_supervisor_puts_it():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert raycompat.JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR
    given = {"env_vars": {"AWS_REGION": "y"}}
    environ = {raycompat.JOB_CONFIG_ENV: json.dumps({"runtime_env": given, "metadata": {}})}
    assert raycompat.submitted_runtime_env(environ) == given
    assert raycompat.submitted_runtime_env({}) == {}


def test_a_job_config_of_another_shape_is_read_as_none_and_said(caplog):
    with caplog.at_level(logging.WARNING):
        assert raycompat.submitted_runtime_env({raycompat.JOB_CONFIG_ENV: "[1, 2]"}) == {}
    (line,) = notices(caplog)
    assert raycompat.JOB_CONFIG_ENV in line and "merges the submitted runtime_env" in line


# ---- end_autoscaler_monitor ------------------------------------------------------------------


class FakePopen:
    def __init__(self) -> None:
        self.killed = False

    def poll(self) -> int | None:
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout: float) -> int:
        return -9


def test_the_monitor_is_killed_where_ray_lists_it(monkeypatch, caplog):
    from ray._private import worker

    monitor, other = FakePopen(), FakePopen()
    processes = {
        "monitor": [types.SimpleNamespace(process=monitor)],
        "gcs_server": [types.SimpleNamespace(process=other)],
    }
    monkeypatch.setattr(worker, "_global_node", types.SimpleNamespace(all_processes=processes))
    raycompat.end_autoscaler_monitor()
    assert monitor.killed and not other.killed and notices(caplog) == []


@pytest.mark.parametrize(
    "node",
    [None, types.SimpleNamespace(), types.SimpleNamespace(all_processes={"monitor": []})],
    ids=["no-node", "no-process-table", "no-monitor"],
)
def test_without_ray_s_process_table_the_monitor_is_left_to_ray_shutdown(monkeypatch, caplog, node):
    from ray._private import worker

    monkeypatch.setattr(worker, "_global_node", node)
    with caplog.at_level(logging.WARNING):
        raycompat.end_autoscaler_monitor()
    (line,) = notices(caplog)
    assert "_global_node.all_processes['monitor']" in line and "ray.shutdown stops" in line


# ---- ray_sigterm_handler_held ----------------------------------------------------------------


def ray_default_handler(signum, frame):  # what ray.init installs: sys.exit(signum)
    sys.exit(signum)


def test_ray_init_s_sigterm_handler_is_held_off_then_restored(caplog):
    import ray._private.utils as ray_utils

    original = ray_utils.set_sigterm_handler
    before = signal.getsignal(signal.SIGTERM)
    with raycompat.ray_sigterm_handler_held():
        ray_utils.set_sigterm_handler(ray_default_handler)
        assert signal.getsignal(signal.SIGTERM) is before
    assert ray_utils.set_sigterm_handler is original and notices(caplog) == []


def test_without_set_sigterm_handler_ray_s_handler_stays_and_it_is_said(monkeypatch, caplog):
    import ray._private.utils as ray_utils

    monkeypatch.delattr(ray_utils, "set_sigterm_handler")
    before = signal.getsignal(signal.SIGTERM)
    try:
        with caplog.at_level(logging.WARNING), raycompat.ray_sigterm_handler_held():
            signal.signal(signal.SIGTERM, ray_default_handler)  # Ray's own way, unpatched
            assert signal.getsignal(signal.SIGTERM) is ray_default_handler
        assert not hasattr(ray_utils, "set_sigterm_handler")  # nothing put in its place
    finally:
        signal.signal(signal.SIGTERM, before)
    (line,) = notices(caplog)
    assert "set_sigterm_handler" in line and "SIGTERM while ray.init runs" in line


def test_a_ray_that_sets_sigterm_another_way_is_reported(caplog):
    before = signal.getsignal(signal.SIGTERM)
    try:
        with caplog.at_level(logging.WARNING), raycompat.ray_sigterm_handler_held():
            signal.signal(signal.SIGTERM, ray_default_handler)  # not through the patched call
    finally:
        signal.signal(signal.SIGTERM, before)
    (line,) = notices(caplog)
    assert "ray.init set SIGTERM another way" in line


def test_signals_deferred_still_holds_a_signal_when_the_patch_is_gone(monkeypatch, caplog):
    import ray._private.utils as ray_utils

    from rayseg import signals
    from rayseg.errors import Interrupted

    monkeypatch.delattr(ray_utils, "set_sigterm_handler")
    with caplog.at_level(logging.WARNING), stop_on_signals():
        with pytest.raises(Interrupted):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is signals._on_signal
    assert len(notices(caplog)) == 1


# ---- logs_dir --------------------------------------------------------------------------------


def test_logs_dir_is_ray_s_session_logs(monkeypatch, tmp_path):
    from ray._private import worker

    node = types.SimpleNamespace(get_logs_dir_path=lambda: str(tmp_path))
    monkeypatch.setattr(worker.global_worker, "node", node, raising=False)
    assert raycompat.logs_dir() == str(tmp_path)


def test_without_ray_s_logs_dir_fd_2_stays_on_the_terminal(monkeypatch, caplog):
    from ray._private import worker

    monkeypatch.setattr(worker.global_worker, "node", types.SimpleNamespace(), raising=False)
    monkeypatch.setenv(rayoutput.VERBOSE_ENV, "0")
    stderr, fd2 = sys.stderr, os.fstat(2)
    with caplog.at_level(logging.WARNING):
        rayoutput.native_stderr_to_ray_logs()
    assert sys.stderr is stderr and os.fstat(2) == fd2
    (line,) = notices(caplog)
    assert "get_logs_dir_path" in line and "reach the terminal" in line


# ---- route_worker_output ---------------------------------------------------------------------


@pytest.fixture
def ray_printers(monkeypatch):
    """A fresh stdstream dispatcher holding Ray's handler, as ray.init leaves it."""
    from ray._private import ray_logging
    from ray._private import worker as ray_worker

    dispatcher = type(ray_logging.global_worker_stdstream_dispatcher)()
    monkeypatch.setattr(ray_logging, "global_worker_stdstream_dispatcher", dispatcher)
    printed: list[dict] = []

    def ray_print(data, ignore_prefix=False):
        printed.append(data)

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_print)
    dispatcher.add_handler(raycompat.RAY_PRINT_HANDLER, ray_print)
    return ray_worker, dispatcher, ray_print, printed


def test_worker_output_goes_through_rayseg_s_filter(ray_printers, capsys):
    ray_worker, dispatcher, ray_print, printed = ray_printers
    rayoutput.filter_worker_output(show_ray=False)
    assert ray_worker.print_to_stdstream is not ray_print
    assert ray_worker.print_to_stdstream.ray_print is ray_print
    assert [name for name, _ in dispatcher.handlers] == [raycompat.RAY_PRINT_HANDLER]
    dispatcher.emit({"lines": ["rayseg| epoch 1/2", "(pid=7) a Ray warning"], "pid": 7})
    assert capsys.readouterr().out == "epoch 1/2\n" and printed == []


def test_without_ray_s_print_handler_ray_prints_as_it_did(ray_printers, caplog):
    ray_worker, dispatcher, ray_print, printed = ray_printers
    dispatcher.remove_handler(raycompat.RAY_PRINT_HANDLER)
    dispatcher.add_handler("renamed_by_ray", ray_print)
    with caplog.at_level(logging.WARNING):
        rayoutput.filter_worker_output(show_ray=False)
    assert ray_worker.print_to_stdstream is ray_print  # Ray's printer, untouched
    assert dispatcher.handlers == [("renamed_by_ray", ray_print)]  # no second printer added
    dispatcher.emit({"lines": ["(pid=7) a Ray warning"], "pid": 7})
    assert printed == [{"lines": ["(pid=7) a Ray warning"], "pid": 7}]
    (line,) = notices(caplog)
    assert "'ray_print_logs'" in line and "as Ray prints it" in line


# ---- keep_sigint_handler ---------------------------------------------------------------------


def test_ray_train_s_sigint_handler_is_kept_out():
    from ray.train.torch import TorchTrainer

    assert callable(TorchTrainer._register_sigint_handler)  # what keep_sigint_handler replaces
    trainer = types.SimpleNamespace(_register_sigint_handler=lambda controller: 1 / 0)
    raycompat.keep_sigint_handler(trainer)
    assert trainer._register_sigint_handler("controller") is None


def test_without_the_sigint_hook_ray_train_s_handler_stays_and_it_is_said(caplog):
    trainer = types.SimpleNamespace()
    with caplog.at_level(logging.WARNING):
        raycompat.keep_sigint_handler(trainer)
    assert vars(trainer) == {}  # no attribute Ray would never call
    (line,) = notices(caplog)
    assert "_register_sigint_handler" in line and "exits 1" in line


# ---- train_worker_env ------------------------------------------------------------------------


def test_ray_train_s_worker_env_vars_are_the_ones_its_controller_gets():
    from ray.train.v2._internal import constants

    env = raycompat.train_worker_env()["env_vars"]
    assert env[constants.RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR] == "0"
    assert constants.get_env_vars_to_propagate().items() <= env.items()


def test_without_ray_train_s_env_constants_the_job_s_env_is_used_and_it_is_said(
    monkeypatch, caplog
):
    from ray.train.v2._internal import constants

    monkeypatch.delattr(constants, "get_env_vars_to_propagate")
    with caplog.at_level(logging.WARNING):
        assert raycompat.train_worker_env() == {}
    (line,) = notices(caplog)
    assert "Ray Train's worker env_vars" in line and "start their own processes" in line


# ---- Ray Train's snapshot --------------------------------------------------------------------


def ray_snapshot(*names: str) -> dict:
    """Ray Train V2's checkpoint_manager_snapshot.json listing `names` (reported in order)."""
    results = [
        {"version": 0, "checkpoint_dir_name": n, "metrics": {"epoch": i + 1, "val_miou": 0.5}}
        for i, n in enumerate(names)
    ]
    return {
        "ray_version": raycompat.CHECKED_RAY,
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(names),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }


def test_dropped_snapshot_is_one_ray_train_loads():
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
    )

    full = ray_snapshot("epoch_0001", "epoch_0002", "epoch_0003")
    full["validated_checkpoint_dir_names"] = ["epoch_0003", "epoch_0001"]
    dropped = raycompat.drop_from_snapshot(full, {"epoch_0001", "epoch_0002"})
    state = _CheckpointManagerState.model_validate(dropped)
    assert [r.checkpoint_dir_name for r in state.checkpoint_results] == ["epoch_0001", "epoch_0002"]
    assert state.checkpoint_report_indices == [0, 1]
    assert state.latest_checkpoint_result.checkpoint_dir_name == "epoch_0002"
    assert state.validated_checkpoint_dir_names == ["epoch_0001"]


def test_a_snapshot_of_another_shape_is_removed_and_said(tmp_path, caplog):
    run = storage.locate(str(tmp_path))
    other = ray_snapshot("epoch_0001")
    other["checkpoints"] = other.pop("checkpoint_results")  # a field Ray renamed
    storage.write_json(run.join(raycompat.TRAIN_SNAPSHOT), other)
    with caplog.at_level(logging.WARNING):
        raycompat.sync_train_snapshot(run, {"epoch_0001"})
    assert not Path(tmp_path, raycompat.TRAIN_SNAPSHOT).exists()  # Ray Train: a run without one
    (line,) = notices(caplog)
    assert raycompat.TRAIN_SNAPSHOT in line and "starts without its list" in line


# ---- in_chunks / joined ---------------------------------------------------------------------


def out_of_band(value) -> tuple[bytes, list[memoryview]]:
    """pickle protocol 5 as Ray uses it: the in-band bytes and each out-of-band buffer."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return data, [b.raw() for b in buffers]


def test_a_large_array_goes_in_chunks_ray_copies_on_one_thread_and_joins_as_a_view():
    array = np.random.default_rng(0).integers(0, 256, (3, 700, 600, 3), dtype=np.uint8)
    data, buffers = out_of_band(raycompat.in_chunks(array))
    last = array.nbytes - 3 * raycompat.CHUNK
    assert [b.nbytes for b in buffers] == [raycompat.CHUNK] * 3 + [last]
    # Laid back to back, as Ray's object store holds them: one read-only view of that memory.
    store = np.frombuffer(b"".join(buffers), np.uint8)
    got = pickle.loads(data, buffers=np.split(store, np.cumsum([b.nbytes for b in buffers[:-1]])))
    assert got.shape == array.shape and got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)
    assert np.shares_memory(got, store) and not got.flags.writeable


def test_chunks_apart_are_copied_into_one_array_and_it_is_said(caplog):
    array = np.arange(600_000, dtype=np.int64).reshape(1000, 600)  # 4.8 MB, not bytes
    data, buffers = out_of_band(raycompat.in_chunks(array))
    with caplog.at_level(logging.WARNING):
        got = pickle.loads(data, buffers=[bytes(b) for b in buffers])  # each its own memory
    np.testing.assert_array_equal(got, array)
    assert got.dtype == np.int64 and not got.flags.writeable
    (line,) = notices(caplog)
    assert FELL_BACK in line and "copied into one" in line


def test_small_arrays_and_old_pickle_protocols_hand_over_the_array_itself():
    small = np.zeros((16, 480, 480), np.uint8)[:4]  # 0.9 MB
    assert raycompat.in_chunks(small) is small
    big = np.ones((16, 480, 480), np.uint8)
    got = pickle.loads(pickle.dumps(raycompat.InChunks(big), protocol=4))
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, big)


# ---- on the installed Ray: nothing falls back ------------------------------------------------

_CONNECT = """
import numpy as np, ray
from rayseg import raycompat, rayconnect, signals
with signals.stop_on_signals():
    rayconnect.connect_ray(None, 1)
    array = np.arange(5 * raycompat.CHUNK, dtype=np.uint8).reshape(5, -1)
    (got,) = ray.get(ray.remote(lambda: [raycompat.in_chunks(array)]).remote())
    assert np.array_equal(got, array) and not got.flags.owndata
    rayconnect.stop_ray()
print("done")
"""


def test_no_touch_falls_back_on_the_installed_ray(ray_tmpdir):
    # A real ray.init and shutdown under rayseg's signal handling and quiet output: every touch
    # on that path finds what it needs (the SIGTERM patch holds, Ray's printers and logs dir and
    # the monitor are where they were checked), and an array a task hands over in chunks comes
    # back as a view of them, back to back in Ray's object store.
    env = {**os.environ, rayoutput.VERBOSE_ENV: "0"}
    done = subprocess.run(
        [sys.executable, "-c", _CONNECT], capture_output=True, text=True, timeout=180, env=env
    )
    assert done.returncode == 0 and done.stdout.split() == ["done"], done.stderr[-3000:]
    assert FELL_BACK not in done.stderr, done.stderr[-3000:]
