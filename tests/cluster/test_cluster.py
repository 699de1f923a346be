"""A job submitted from a client host to a head and worker hosts that share nothing but S3.

Runs in every `make test`: the whole chain from a separate client, token auth across hosts, and a
worker host lost during masks. The longer fault cases are in test_cluster_faults.py (marker
`cluster_faults`). Hosts and what they hold: tests/cluster/nscluster.py.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from demo_job import (
    api,
    bucket,
    job,
    job_status,
    parquet_ids,
    pipeline_config,
    prepare_data,
    read_json,
    read_jsons,
    submit,
    train_ranks,
    write_config,
)
from nscluster import WORKERS, image_paths

pytestmark = pytest.mark.slow  # `make test` runs it every time; `make test-quick` leaves it out

IMAGES = 40


@pytest.fixture(scope="module")
def annotations(ns):
    return prepare_data(ns, IMAGES)


@pytest.fixture(scope="module")
def pipeline_run(ns, annotations):
    config = write_config(ns, "job.yaml", pipeline_config(ns, annotations, run="run"))
    head_tmp = set(ns.listing("head", "/tmp"))
    result = submit(ns, "pipeline.py", "--config", config, submission_id="pipeline-1")
    return result, bucket(ns, "run/"), head_tmp


def private_files(ns, host: str) -> list[str]:
    """Files on the host's own disk, outside Ray's session folder, caches and the harness's own
    (the auth token it placed, the checkout and Python it binds in as a cluster image would)."""
    files = ns.listing(host, "/tmp") + ns.listing(host, "/root")
    ours = ("/tmp/ray/", "/root/.cache/", *(f"{p}/" for p in image_paths()))
    return [f for f in files if not f.startswith(ours) and f != "/root/.ray/auth_token"]


def test_token_auth_across_hosts(ns):
    # From the client: no token, 401; the token alone is not sent without RAY_AUTH_MODE=token.
    assert api(ns, "/api/jobs/", token=False)[0] == 401
    assert api(ns, "/api/jobs/")[0] == 200
    listed = ns.run(
        "client", ["ray", "job", "list", "--address", ns.dashboard], check=False, timeout=120
    )
    assert listed.returncode != 0
    assert "Authentication required" in listed.stderr, listed.stderr[-2000:]
    listed = ns.run("client", ["ray", "job", "list", "--address", ns.dashboard], env=ns.token_env())
    assert listed.returncode == 0


def test_pipeline_job_completes_from_a_separate_client(ns, pipeline_run):
    result, keys, _ = pipeline_run
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-6000:]
    assert "== done in" in logs

    # Masks: every image once, rendered on at least two worker hosts (Ray's own node addresses).
    masks = [k for k in keys if k.startswith("run/masks/masks/")]
    assert len(masks) == IMAGES
    records = read_jsons(ns, [k for k in keys if k.startswith("run/masks/_shards/shard-")])
    written = Counter(i for r in records for i in r["written"])
    assert sorted(written) == list(range(1, IMAGES + 1)) and set(written.values()) == {1}
    hosts = {r["node_ip"] for r in records}
    assert len(hosts) >= 2 and hosts <= {ns.hosts[w].address for w in WORKERS}, hosts
    manifest = read_json(ns, "run/masks/manifest.json")
    assert manifest["counts"]["masks_written"] == IMAGES
    assert sorted(parquet_ids(ns, "run/masks/parquet")) == list(range(1, IMAGES + 1))

    # Training: 2 ranks on 2 distinct hosts, by Ray Train's own record of the run.
    (attempt,) = train_ranks(ns, "train")
    assert [rank for rank, _ in attempt] == [0, 1]
    assert len({address for _, address in attempt}) == 2, attempt
    for name in ("model.pt", "metrics.jsonl", "summary.json", "split.json"):
        assert f"run/train/{name}" in keys, name
    epochs = sorted({k.split("/")[2] for k in keys if k.startswith("run/train/epoch_")})
    assert epochs == ["epoch_0001", "epoch_0002"]
    metrics = read_json(ns, "run/metrics.json")
    assert metrics["miou"] is not None
    split = read_json(ns, "run/train/split.json")
    val = len(split["val_image_ids"])
    assert len([k for k in keys if k.startswith("run/predict/masks/")]) == val
    assert len([k for k in keys if k.startswith("run/predict/overlays/")]) == val


def test_nothing_is_left_on_a_hosts_own_disk(ns, pipeline_run):
    result, _, head_tmp_before = pipeline_run
    assert result.returncode == 0
    for host in WORKERS:
        assert private_files(ns, host) == [], host
    # The head keeps what the job put there on purpose (the subset file in its home) and no new
    # temporary file (the dashboard's own pymp-* forkserver folder dates from `ray start`).
    new_tmp = set(ns.listing("head", "/tmp")) - head_tmp_before
    assert [f for f in new_tmp if not f.startswith("/tmp/ray/")] == []
    home = {f for f in private_files(ns, "head") if f.startswith("/root/")}
    home = {f for f in home if not f.startswith("/root/data/")}
    # The job's config, the subset and the settings it was made with.
    assert home == {"/root/job.yaml", "/root/run-subset.json", "/root/run-subset.json.config.yaml"}


def test_host_lost_during_masks(ns, annotations):
    out = "s3://rayseg/masks-lost"
    sid = "masks-lost-1"
    result = submit(
        ns, "masks.py", "--annotations", annotations, "--out", out,
        "--images-dir", "s3://rayseg/images", "--shard-size", "1",
        submission_id=sid, wait=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    deadline = time.monotonic() + 240
    while not (done := [k for k in bucket(ns, "masks-lost/") if "_shards/shard-" in k]):
        assert time.monotonic() < deadline, job(ns, "logs", sid)[-4000:]
        time.sleep(1)
    ns.kill_host("worker1")
    assert len(done) < IMAGES, "the run ended before the host was lost"
    try:
        while (status := job_status(ns, sid)) != "SUCCEEDED":
            assert status not in ("FAILED", "STOPPED"), job(ns, "logs", sid)[-4000:]
            assert time.monotonic() < deadline + 240, job(ns, "logs", sid)[-4000:]
            time.sleep(2)
    finally:
        ns.revive("worker1")
    keys = bucket(ns, "masks-lost/")
    assert len([k for k in keys if k.startswith("masks-lost/masks/")]) == IMAGES
    records = read_jsons(ns, [k for k in keys if "/_shards/shard-" in k])
    assert len(records) == IMAGES  # one record per shard of one image
    written = Counter(i for r in records for i in r["written"])
    assert sorted(written) == list(range(1, IMAGES + 1)) and set(written.values()) == {1}
    manifest = read_json(ns, "masks-lost/manifest.json")
    counts = manifest["counts"]
    assert counts["masks_written"] == IMAGES and counts["shards"] == IMAGES
    assert not [k for k in keys if ".tmp" in k], "a temporary object was left"


def test_credentials_reach_no_log_or_command_line(ns, pipeline_run):
    # The head has the AWS_* settings (as an instance profile would give them); workers get them
    # from the job. Ray logs a runtime_env's env_vars on every node and puts them on worker
    # command lines: the secret must travel another way (rayseg.rayconnect.job_env).
    assert pipeline_run[0].returncode == 0
    secret = ns.s3_secret.encode()
    leaks = []
    for name, host in ns.hosts.items():
        for path in (host.folder / "tmp").rglob("*"):
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                leaks.append(f"{name}:{path.relative_to(host.folder)}")
    assert leaks == []
