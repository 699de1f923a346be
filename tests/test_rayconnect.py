"""rayseg.rayconnect: a joined cluster's job environment, an embedded Ray's temp folder."""

from __future__ import annotations

import json
import os
import sys

from rayseg import rayconnect


def test_job_env_forwards_aws_and_the_socket_hook_but_not_what_the_job_sets():
    from rayseg.netif import SETUP_HOOK

    environ = {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "x", "HOME": "/root"}
    assert rayconnect.job_env(environ) == {
        "env_vars": {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "x"},
        "worker_process_setup_hook": SETUP_HOOK,
    }
    # A submitted job's own runtime_env: Ray refuses to merge a key given twice.
    submitted = {
        "runtime_env": {"env_vars": {"AWS_REGION": "y"}, "worker_process_setup_hook": "m.f"}
    }
    environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(submitted)
    assert rayconnect.job_env(environ) == {"env_vars": {"AWS_ENDPOINT_URL": "http://s3"}}
    assert rayconnect.job_env({"PATH": "/bin"}) == {"worker_process_setup_hook": SETUP_HOOK}


def test_job_env_carries_credentials_in_the_hook_not_in_env_vars(monkeypatch):
    import ray.cloudpickle

    environ = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "id", "AWS_REGION": "x"}
    job = rayconnect.job_env(environ)
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
    assert rayconnect.job_env(environ) == {
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
        "from rayseg import rayconnect\n"
        "rayconnect.connect_ray(num_cpus=1, dashboard=True)\n"
        "import ray, os\n"
        "print(os.environ['TMPDIR'])\n"
        "print(ray.get(ray.remote(lambda: os.environ['TMPDIR']).remote()))\n"
        "rayconnect.stop_ray()\n"
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
