"""rayseg.runtime's output plumbing without Ray: Progress lines, worker lines and progress."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time

import pytest

from rayseg import runtime
from rayseg.errors import Interrupted


class NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_prints_periodic_lines_with_eta_and_postfix():
    out = NotATerminal()
    progress = runtime.Progress(10, "predict", interval=0.0, stream=out)
    progress.update(4, postfix={"loss": "0.5000"})
    progress.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("predict: 4/10 images (")
    assert "ETA " in line and line.endswith(", loss 0.5000)")


def test_progress_rate_ignores_the_start_up_before_the_first_update(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    out = NotATerminal()
    progress = runtime.Progress(30, "predict", interval=0.0, stream=out)
    now[0] = 100.0  # start-up: Ray, model loading
    progress.update(1)
    now[0] = 110.0
    progress.update(10)
    first, second = out.getvalue().splitlines()
    assert "ETA ?" in first  # one update: no rate yet
    # 10 images in the 10 s since the first update: 1/s, 19 left (not 11 images in 110 s)
    assert second == "predict: 11/30 images (1.0/s, ETA 19s)"


def test_progress_waits_for_its_interval():
    out = NotATerminal()
    progress = runtime.Progress(10, "evaluate", interval=3600.0, stream=out)
    progress.update(5)
    assert out.getvalue() == "" and progress.done == 5


def test_step_reporter_throttles_but_always_reports_the_last_step(monkeypatch):
    stdout = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", stdout)
    reporter = runtime.StepReporter("epoch 1/2", 3, interval=3600.0)
    due = [reporter.due(done) for done in (1, 2, 3)]
    assert due == [True, True, True]  # nothing reported yet; the last step is always due
    reporter.report(1, loss="1.0")
    assert [reporter.due(done) for done in (2, 3)] == [False, True]
    (line,) = stdout.getvalue().splitlines()
    assert line.startswith(runtime.WORKER_PROGRESS)
    message = json.loads(line[len(runtime.WORKER_PROGRESS) :])
    assert message == {
        "label": "epoch 1/2",
        "total": 3,
        "unit": "steps",
        "done": 1,
        "postfix": {"loss": "1.0"},
    }


def progress_line(label: str, done: int, total: int) -> str:
    message = {"label": label, "total": total, "unit": "steps", "done": done, "postfix": {}}
    return runtime.WORKER_PROGRESS + json.dumps(message)


def test_worker_lines_rayseg_shown_bare_ray_only_when_verbose(capsys):
    data = {
        "lines": [
            runtime.WORKER_LINE + "epoch 1/2  loss 0.5",
            "[2026-01-01 E 1 1] core_worker.cc:2465: Actor ...",
            "RayDeprecationWarning: something",
        ],
        "pid": 7,
        "is_err": False,
    }
    printed = []
    for show_ray in (False, True):
        runtime.forward_worker_lines(
            data,
            show_ray=show_ray,
            bars=runtime.WorkerBars(),
            ray_print=lambda d, ignore_prefix: printed.append(d),
        )
    assert capsys.readouterr().out.splitlines() == ["epoch 1/2  loss 0.5"] * 2
    assert len(printed) == 1 and printed[0]["lines"] == data["lines"][1:]


def test_worker_bars_one_progress_per_label():
    out = NotATerminal()
    bars = runtime.WorkerBars(stream=out)
    bars.show(json.loads(progress_line("epoch 1/2", 2, 4)[len(runtime.WORKER_PROGRESS) :]))
    first = bars.progress
    assert first is not None and first.done == 2 and first.label == "epoch 1/2"
    bars.show(json.loads(progress_line("epoch 1/2", 3, 4)[len(runtime.WORKER_PROGRESS) :]))
    assert bars.progress is first and first.done == 3
    bars.show(json.loads(progress_line("epoch 2/2", 1, 4)[len(runtime.WORKER_PROGRESS) :]))
    assert bars.progress is not first and bars.progress.done == 1
    bars.show(json.loads(progress_line("epoch 2/2", 4, 4)[len(runtime.WORKER_PROGRESS) :]))
    assert bars.progress is None  # the epoch's last step closes its bar


# ---- signals (in this process: SIGINT / SIGTERM sent to ourselves) ----------------------------


def test_a_signal_raises_interrupted_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with runtime.stop_on_signals():
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
        assert caught.value.exit_code == 143 and runtime.stop_signal() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # already stopping: ignored, not raised again
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_inside_ray_init_waits_until_it_returns():
    import ray._private.utils as ray_utils

    ran_on = []
    with runtime.stop_on_signals():
        with pytest.raises(Interrupted) as caught:
            with runtime.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                # What ray.init does first: its own SIGTERM handler, sys.exit(15).
                ray_utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
                os.kill(os.getpid(), signal.SIGTERM)
                ran_on.append("the rest of ray.init")
        assert caught.value.signum == signal.SIGINT and ran_on == ["the rest of ray.init"]
        assert signal.getsignal(signal.SIGTERM) is runtime._on_signal


def test_job_env_forwards_aws_and_the_socket_hook_but_not_what_the_job_sets():
    from rayseg.netif import SETUP_HOOK

    environ = {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "x", "HOME": "/root"}
    assert runtime.job_env(environ) == {
        "env_vars": {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "x"},
        "worker_process_setup_hook": SETUP_HOOK,
    }
    # A submitted job's own runtime_env: Ray refuses to merge a key given twice.
    submitted = {
        "runtime_env": {"env_vars": {"AWS_REGION": "y"}, "worker_process_setup_hook": "m.f"}
    }
    environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(submitted)
    assert runtime.job_env(environ) == {"env_vars": {"AWS_ENDPOINT_URL": "http://s3"}}
    assert runtime.job_env({"PATH": "/bin"}) == {"worker_process_setup_hook": SETUP_HOOK}


def test_job_env_carries_credentials_in_the_hook_not_in_env_vars(monkeypatch):
    import ray.cloudpickle

    environ = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "id", "AWS_REGION": "x"}
    job = runtime.job_env(environ)
    assert job["env_vars"] == {"AWS_REGION": "x"}  # Ray logs these on every node
    assert "s3cr3t" not in json.dumps(job["env_vars"])
    pinned = []
    monkeypatch.setattr("rayseg.netif.pin_socket_interface", lambda: pinned.append(True))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    hook = ray.cloudpickle.loads(ray.cloudpickle.dumps(job["worker_process_setup_hook"]))
    hook()  # as Ray runs it in a worker process
    assert (
        os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and os.environ["AWS_ACCESS_KEY_ID"] == "id"
    )
    assert pinned == [True]
    # A job that brings its own hook: everything stays in env_vars, where it always worked.
    submitted = {"runtime_env": {"worker_process_setup_hook": "m.f"}}
    environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(submitted)
    assert runtime.job_env(environ) == {
        "env_vars": {
            "AWS_SECRET_ACCESS_KEY": "s3cr3t",
            "AWS_ACCESS_KEY_ID": "id",
            "AWS_REGION": "x",
        }
    }


def test_an_embedded_ray_leaves_no_temp_folder(tmp_path):
    # The dashboard's forkserver makes a pymp-* folder that outlives a killed dashboard: Ray's
    # processes get a temp folder of their own, removed when rayseg stops its Ray.
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # Ray's socket paths stay short
    code = (
        "from rayseg import runtime\n"
        "runtime.connect_ray(num_cpus=1, dashboard=True)\n"
        "import ray, os\n"
        "print(os.environ['TMPDIR'])\n"
        "print(ray.get(ray.remote(lambda: os.environ['TMPDIR']).remote()))\n"
        "runtime.stop_ray()\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    driver, worker = result.stdout.split()[-2:]
    assert driver == str(tmp)  # the driver's own is untouched
    assert worker.startswith(str(ray_tmp / "rayseg-tmp-"))
    assert sorted(p.name for p in ray_tmp.iterdir()) == ["ray"]  # Ray's logs stay
    assert [p.name for p in tmp.iterdir() if p.name.startswith("pymp-")] == []
    shutil.rmtree(ray_tmp, ignore_errors=True)
