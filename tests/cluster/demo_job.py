"""The job a user would run on the namespace cluster, and what the tests read back from it.

Data: synthetic images made on the head, uploaded to the bucket (the only shared storage); the
annotation file stays on the head's private disk. The job config lives on the head too, and
`ray job submit --working-dir <checkout>` runs `jobs/pipeline.py` from the client: subset
(a head-local file), then masks, train (2 Ray Train workers), evaluate and predict, all on s3://.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import yaml
from nscluster import ROOT, NsCluster

HEAD_DATA = "~/data"  # on the head's private disk: synth's annotations.json and images/


def head_path(c: NsCluster, relative: str) -> tuple[Path, str]:
    """(where the harness writes it, what the head calls it) for a file in the head's HOME."""
    return c.head.folder / "home" / relative, str(Path("~").expanduser() / relative)


def prepare_data(
    c: NsCluster, num_images: int, *, prefix: str = "images", folder: str = "data"
) -> str:
    """Synthetic images in ~/folder on the head, uploaded to s3://BUCKET/prefix; the annotations
    stay put. Returns the head-local path of the annotation file.
    """
    _, data = head_path(c, folder)
    c.run(
        "head",
        ["rayseg", "synth", "--out", data, "--num-images", str(num_images),
         "--width", "160", "--height", "120"],
        timeout=300,
    )  # fmt: skip
    c.python(
        "head",
        "import boto3, json, os, sys\n"
        "s3 = boto3.client('s3')\n"
        "folder = os.path.join(sys.argv[1], 'images')\n"
        "names = sorted(os.listdir(folder))\n"
        "for n in names:\n"
        "    s3.upload_file(os.path.join(folder, n), sys.argv[2], sys.argv[3] + '/' + n)\n"
        "print(json.dumps(len(names)))",
        data,
        c.bucket,
        prefix,
        env=c.s3_env(),
        timeout=300,
    )
    return f"{data}/annotations.json"


def pipeline_config(c: NsCluster, annotations: str, *, run: str, **train) -> dict:
    """Every shared output on s3://BUCKET/run; the subset file on the head's disk."""
    _, subset = head_path(c, f"{run}-subset.json")
    return {
        "out": f"s3://{c.bucket}/{run}",
        "subset": {"annotations": annotations, "out": subset, "num_images": 10**6, "seed": 0},
        "masks": {"images_dir": f"s3://{c.bucket}/images", "shard_size": 5},
        "train": {
            "model": "lraspp_mobilenet_v3_large",
            "epochs": 2,
            "batch_size": 4,
            "crop_size": 64,
            "num_workers": 2,
            "val_fraction": 0.2,
            "lr": 0.05,
            "max_failures": 2,
            **train,
        },
        "evaluate": {"batch_size": 8},
        "predict": {"batch_size": 8},
    }


def write_config(c: NsCluster, name: str, config: dict) -> str:
    """The config as a file on the head's private disk; returns the head's path for it."""
    local, on_head = head_path(c, name)
    local.write_text(yaml.safe_dump(config, sort_keys=False))
    return on_head


def submit(
    c: NsCluster,
    script: str,
    *args: str,
    submission_id: str | None = None,
    wait: bool = True,
    auth: bool = True,
    timeout: float = 900,
    extra: list[str] | tuple[str, ...] = (),
):
    """`ray job submit` of jobs/<script> from the client host; the CompletedProcess."""
    sid = submission_id or f"rayseg-{uuid.uuid4().hex[:8]}"
    argv = ["ray", "job", "submit", "--address", c.dashboard, "--submission-id", sid,
            "--working-dir", str(ROOT), *([] if wait else ["--no-wait"]), *extra,
            "--", "python", f"jobs/{script}", *args]  # fmt: skip
    return c.run("client", argv, env=c.token_env() if auth else {}, timeout=timeout, check=False)


def job(c: NsCluster, verb: str, sid: str, *, timeout: float = 120) -> str:
    """`ray job status|logs|stop SID` from the client; its output."""
    result = c.run(
        "client",
        ["ray", "job", verb, "--address", c.dashboard, sid],
        env=c.token_env(),
        timeout=timeout,
        check=False,
    )
    return result.stdout + result.stderr


def job_status(c: NsCluster, sid: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED: the job API's word, from the client."""
    status, body = api(c, f"/api/jobs/{sid}")
    if status != 200:
        raise RuntimeError(f"job {sid}: HTTP {status}: {str(body)[:300]}")
    return body["status"]


def bucket(c: NsCluster, prefix: str = "") -> dict[str, int]:
    """Every object under s3://BUCKET/prefix with its size (no folder markers), from the client."""
    return c.python(
        "client",
        "import boto3, json, sys\n"
        "pages = boto3.client('s3').get_paginator('list_objects_v2')\n"
        "keys = {}\n"
        "for page in pages.paginate(Bucket=sys.argv[1], Prefix=sys.argv[2]):\n"
        "    keys.update({o['Key']: o['Size'] for o in page.get('Contents', [])\n"
        "                 if not o['Key'].endswith('/')})\n"
        "print(json.dumps(keys))",
        c.bucket,
        prefix,
        env=c.s3_env(),
    )


def read_json(c: NsCluster, key: str):
    return read_jsons(c, [key])[0]


def read_jsons(c: NsCluster, keys: list[str]) -> list:
    """The JSON objects at s3://BUCKET/key for each key, read in one process on the client."""
    return c.python(
        "client",
        "import boto3, json, sys\n"
        "s3 = boto3.client('s3')\n"
        "print(json.dumps([json.loads(s3.get_object(Bucket=sys.argv[1], Key=k)['Body'].read())"
        " for k in sys.argv[2:]]))",
        c.bucket,
        *keys,
        env=c.s3_env(),
    )


def run_demo_job(c: NsCluster, *, num_images: int = 60) -> int:
    """`nscluster.py try`: the whole chain, as a user would submit it; prints where things are."""
    print(f"making {num_images} synthetic images on the head and uploading them to S3 ...")
    annotations = prepare_data(c, num_images)
    config = write_config(c, "job.yaml", pipeline_config(c, annotations, run="run"))
    print(f"submitting jobs/pipeline.py --config {config} (on the head) from the client ...")
    result = submit(c, "pipeline.py", "--config", config)
    print(result.stdout[-6000:], result.stderr[-3000:], sep="\n")
    keys = bucket(c, "run/")
    print(f"{len(keys)} objects under s3://{c.bucket}/run/")
    return result.returncode


def api(c: NsCluster, path: str, *, token: bool = True) -> tuple[int, object]:
    """GET the head's dashboard `path` from the client host: (HTTP status, parsed JSON or text)."""
    return tuple(
        c.python(
            "client",
            "import json, sys, urllib.error, urllib.request\n"
            "request = urllib.request.Request(sys.argv[1])\n"
            "if sys.argv[2]:\n"
            "    request.add_header('Authorization', 'Bearer ' + sys.argv[2])\n"
            "try:\n"
            "    with urllib.request.urlopen(request, timeout=30) as r:\n"
            "        status, body = r.status, r.read().decode()\n"
            "except urllib.error.HTTPError as e:\n"
            "    status, body = e.code, e.read().decode()\n"
            "try:\n"
            "    body = json.loads(body)\n"
            "except ValueError:\n"
            "    pass\n"
            "print(json.dumps([status, body]))",
            c.dashboard + path,
            c.token if token else "",
        )
    )


def train_ranks(c: NsCluster, run: str) -> list[list[tuple[int, str]]]:
    """Ray Train's own record of the run named `run` (the run folder's name): for each attempt,
    [(world rank, node address), ...] (the dashboard's /api/train/v2/runs/v1)."""
    status, body = api(c, "/api/train/v2/runs/v1")
    if status != 200:
        raise RuntimeError(f"Ray Train state: HTTP {status}: {str(body)[:500]}")
    attempts = []
    for found in body["train_runs"]:
        if found["name"] != run:
            continue
        for attempt in sorted(found.get("attempts", []), key=lambda a: a["start_time_ns"]):
            attempts.append(sorted((w["world_rank"], w["node_ip"]) for w in attempt["workers"]))
    return attempts


def running_on(c: NsCluster, name: str, address: str) -> int:
    """How many tasks called `name` Ray's state API lists as RUNNING on the node at `address`."""
    return c.python(
        "client",
        "import json, sys\n"
        "from ray.util.state import list_nodes, list_tasks\n"
        "ids = {n.node_id for n in list_nodes(address=sys.argv[1]) if n.node_ip == sys.argv[3]}\n"
        "tasks = list_tasks(address=sys.argv[1], filters=[('name', '=', sys.argv[2]),"
        " ('state', '=', 'RUNNING')], raise_on_missing_output=False)\n"
        "print(json.dumps(sum(t.node_id in ids for t in tasks)))",
        c.dashboard,
        name,
        address,
        env=c.token_env(),
    )


def parquet_ids(c: NsCluster, prefix: str) -> list[int]:
    """The image_id column of every Parquet part under s3://BUCKET/prefix, read with pyarrow."""
    return c.python(
        "client",
        "import json, sys\n"
        "import pyarrow.dataset as ds\n"
        "from pyarrow import fs\n"
        "s3 = fs.S3FileSystem(endpoint_override=sys.argv[1], region='us-east-1')\n"
        "table = ds.dataset(sys.argv[2], filesystem=s3, format='parquet').to_table(['image_id'])\n"
        "print(json.dumps(table.column('image_id').to_pylist()))",
        c.s3_endpoint,
        f"{c.bucket}/{prefix}",
        env=c.s3_env(),
    )
