"""`ray job submit` of jobs/*.py to a real head node on 127.0.0.1, with token authentication.

The head is `ray start --head --block` in its own process group, ended with SIGTERM (SIGKILL if
it lingers). It runs with its own token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH) so the tests
never depend on, or touch, ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import free_port, stop_process_group

from rayseg.config import PipelineConfig, load_config
from rayseg.pipeline import plan_stages

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
UPLOAD_LIMIT = 100 * 1024 * 1024  # Ray refuses working_dir packages at 100 MiB


class Head:
    def __init__(self, proc: subprocess.Popen, url: str, token: str, env: dict, log: Path):
        self.proc, self.url, self.token, self.env, self.log = proc, url, token, env, log

    def client_env(self, *, auth: bool = True) -> dict[str, str]:
        """What a user's shell needs for `ray job ...` against this head."""
        env = {k: v for k, v in self.env.items() if k not in ("RAY_AUTH_MODE",)}
        if auth:
            env["RAY_AUTH_MODE"] = "token"
        return env

    def get(self, path: str, *, auth: bool = True, token: str | None = None) -> tuple[int, bytes]:
        return self.request(path, auth=auth, token=token)

    def request(
        self,
        path: str,
        body: dict | None = None,
        *,
        auth: bool = True,
        token: str | None = None,
        timeout: float = 5,
    ) -> tuple[int, bytes]:
        """GET `path`, or POST `body` as JSON to it."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def head_command(dashboard: int) -> list[str]:
    """`ray start --head` on 127.0.0.1, 2 CPUs, every port free (the dashboard's given)."""
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--object-store-memory",
        str(200 * 1024 * 1024),
        "--disable-usage-stats",
    ]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    return cmd


def start_head(tmp: Path, ray_tmpdir: str) -> Head:
    token = uuid.uuid4().hex
    token_file = tmp / "auth_token"
    token_file.write_text(token)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_HEADERS")
    }
    env.update(
        RAY_TMPDIR=ray_tmpdir,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        # The job's `python` is the one on the head's PATH: this environment's.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    dashboard = free_port()
    cmd = head_command(dashboard)
    log = tmp / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    head = Head(proc, f"http://127.0.0.1:{dashboard}", token, env, log)
    try:
        wait_until_jobs_run(head, time.monotonic() + 120)
    except BaseException:
        stop_head(head)
        raise
    return head


def wait_until_jobs_run(head: Head, deadline: float) -> None:
    """Return once a no-op job has been accepted and has succeeded.

    The dashboard answers /api/jobs/ before the head's job agent has registered; a submission in
    that gap fails with "No available agent to submit job" after 10 s (Ray's own wait), which a
    busy 2-core machine can exceed.
    """
    submission = f"rayseg-ready-{uuid.uuid4().hex[:8]}"
    status, body = 0, b""
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray start exited {head.proc.returncode}:\n{tail(head)}")
        try:
            job = {"entrypoint": "true", "submission_id": submission}
            status, body = head.request("/api/jobs/", job, timeout=30)
            if status == 200:
                break
            status, body = head.get(f"/api/jobs/{submission}")
            if status == 200:  # an earlier POST was accepted after its answer timed out
                break
        except OSError as e:
            status, body = 0, str(e).encode()
        time.sleep(1)
    else:
        answer = f"{status}: {body[-500:]!r}"
        raise RuntimeError(f"the head took no job in time ({answer}):\n{tail(head)}")
    while time.monotonic() < deadline:
        state = json.loads(head.get(f"/api/jobs/{submission}")[1])["status"]
        if state == "SUCCEEDED":
            return
        if state in ("FAILED", "STOPPED"):
            raise RuntimeError(f"the no-op job ended {state}:\n{tail(head)}")
        time.sleep(0.5)
    raise RuntimeError(f"the no-op job did not finish in time:\n{tail(head)}")


def tail(head: Head) -> str:
    return head.log.read_text(errors="replace")[-3000:]


def stop_head(head: Head) -> None:
    stop_process_group(head.proc)


@pytest.fixture(scope="module")
def head(tmp_path_factory, ray_tmpdir):
    head = start_head(tmp_path_factory.mktemp("head"), ray_tmpdir)
    yield head
    stop_head(head)


def ray_job(
    head: Head, *args: str, auth: bool = True, timeout: float = 240
) -> subprocess.CompletedProcess:
    command, *rest = args
    return subprocess.run(
        [RAY, "job", command, "--address", head.url, *rest],
        cwd=ROOT,
        env=head.client_env(auth=auth),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stages(name: str):
    return plan_stages(load_config(PipelineConfig, str(ROOT / "jobs" / "configs" / name)))


def test_demo_config_keeps_everything_under_out():
    s = stages("demo.yaml")
    assert s.synth is not None and s.subset is not None
    for path in (s.masks.out, s.train.out, s.evaluate.out, s.predict.out, s.val_masks):
        assert path.startswith(f"{s.out}/"), path


def test_coco8k_config_puts_every_output_on_shared_storage():
    s = stages("coco8k.yaml")
    # Read only by the driver: may be a local file on the head node.
    assert s.masks.annotations.endswith(".json") and "://" not in s.masks.annotations
    # Read or written by tasks and workers on any node: object storage.
    for path in (
        s.masks.out,
        s.masks.images_dir,
        s.train.out,
        s.evaluate.data,
        s.evaluate.out,
        s.predict.out,
    ):
        assert path.startswith("s3://"), path
    assert s.train.use_gpu and s.train.num_workers > 1 and s.train.max_failures > 0


def test_every_job_script_reaches_its_cli_command(tmp_path):
    # Run from elsewhere, as a job would run from its unpacked working dir.
    for command in ("subset", "masks", "train", "evaluate", "predict", "pipeline"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / f"{command}.py"), "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: rayseg {command} "), result.stdout


def test_job_script_fails_with_the_clis_one_line_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "masks.py"),
            "--annotations",
            str(tmp_path / "missing.json"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("rayseg masks: error: ") and "missing.json" in lines[-1]
    assert "Traceback" not in result.stderr


def test_job_script_runs_the_uploaded_rayseg(tmp_path):
    # An unpacked upload whose rayseg differs from the installed one: the upload's must run,
    # with the script's arguments, and its status must be the job's.
    upload = tmp_path / "upload"
    shutil.copytree(ROOT / "jobs", upload / "jobs")
    (upload / "rayseg").mkdir()
    (upload / "rayseg" / "__init__.py").write_text("")
    (upload / "rayseg" / "cli.py").write_text(
        "def main(argv):\n    print(__file__, argv)\n    return 3\n"
    )
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--epochs", "2"],
        cwd=upload,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == f"{upload / 'rayseg' / 'cli.py'} ['train', '--epochs', '2']"


def test_rayignore_keeps_the_upload_small(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    package = tmp_path / "upload.zip"
    # include_gitignore=False: .rayignore alone must do it (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
    _zip_files(str(ROOT), [], str(package), include_gitignore=False)
    names = zipfile.ZipFile(package).namelist()
    assert package.stat().st_size < UPLOAD_LIMIT // 10
    assert {"jobs/masks.py", "jobs/_common.py", "rayseg/cli.py", "jobs/configs/coco8k.yaml"} <= set(
        names
    )
    for name in names:
        assert not name.startswith((".git/", ".venv/")), name
        assert "__pycache__" not in name and not name.endswith((".parquet", ".png", ".jpg")), name


def test_head_refuses_clients_without_the_token(head):
    status, body = head.get("/api/jobs/", auth=False)
    assert status == 401, body
    assert head.get("/api/jobs/", token=uuid.uuid4().hex)[0] == 403, "a wrong token is refused"
    # The token is available to the CLI (RAY_AUTH_TOKEN_PATH), but without RAY_AUTH_MODE=token
    # `ray job` does not send it: the user sees the 401.
    result = ray_job(head, "list", auth=False, timeout=120)
    assert result.returncode != 0
    assert "Authentication required: Unauthorized" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_submit_masks_job(head, make_synth, tmp_path):
    annotations = make_synth(24)
    out = tmp_path / "masks"
    submission = f"rayseg-masks-{uuid.uuid4().hex[:8]}"
    result = ray_job(
        head,
        "submit",
        "--submission-id",
        submission,
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/masks.py",
        "--annotations",
        str(annotations),
        "--out",
        str(out),
        "--shard-size",
        "5",
    )
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    status, body = head.get(f"/api/jobs/{submission}")
    assert status == 200 and json.loads(body)["status"] == "SUCCEEDED", body
    assert "masks: 24 images -> 24 written" in logs

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["masks_written"] == 24
    assert manifest["counts"]["shards"] == manifest["counts"]["shards_run"] == 5
    ids = pq.read_table(out / "parquet", columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == list(range(1, 25))
    assert len(list((out / "masks").glob("*.png"))) == 24
