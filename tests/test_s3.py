"""Shared object storage: masks, Parquet and manifest on s3:// URIs, written and resumed.

The store is moto's S3 server on 127.0.0.1; rayseg finds it through the standard AWS_*
variables (AWS_ENDPOINT_URL, keys, region), as it would find a real bucket or MinIO.
Training data and checkpoints on S3, resumed after a killed worker: tests/test_faults.py
(one training run serves both, to keep the suite short on 2 cores).
"""

from __future__ import annotations

import json
import os

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray

from rayseg.config import MasksConfig
from rayseg.masks import run_masks

BUCKET = "rayseg-test"


@pytest.fixture(scope="module")
def s3(moto_server, ray_tmpdir) -> pafs.S3FileSystem:
    """The bucket, seen through pyarrow's own S3 client (not rayseg's), with Ray started after
    the AWS_* variables are set."""
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=BUCKET)
    ray.shutdown()  # in case an earlier module left a Ray of its own connected
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield pafs.S3FileSystem(
            endpoint_override=moto_server,
            scheme="http",
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            region=os.environ["AWS_DEFAULT_REGION"],
        )
    finally:
        ray.shutdown()


def listing(fs: pafs.S3FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def read_manifest(fs: pafs.S3FileSystem, prefix: str) -> dict:
    with fs.open_input_stream(f"{prefix}/manifest.json") as f:
        return json.loads(f.read())


def image_ids(fs: pafs.S3FileSystem, prefix: str) -> list[int]:
    table = pq.read_table(f"{prefix}/parquet", filesystem=fs, columns=["image_id"])
    return sorted(table.column("image_id").to_pylist())


@pytest.mark.slow
def test_masks_written_to_and_resumed_from_s3(s3, make_synth):
    annotations = make_synth(30)
    prefix = f"{BUCKET}/masks-run"
    cfg = MasksConfig(annotations=str(annotations), out=f"s3://{prefix}", shard_size=5)
    first = run_masks(cfg)
    assert first["counts"]["masks_written"] == 30 and first["counts"]["shards_run"] == 6

    manifest = read_manifest(s3, prefix)
    assert manifest["counts"]["masks_written"] == 30
    assert manifest["counts"]["rendered_total"] == 30
    assert image_ids(s3, prefix) == list(range(1, 31))
    assert listing(s3, f"{prefix}/parquet") == [f"part-{k:05d}.parquet" for k in range(6)]
    assert len(listing(s3, f"{prefix}/masks")) == 30
    assert "config.yaml" in listing(s3, prefix)

    # Two shards lost their commit record (as if their tasks died before writing it), one also
    # its Parquet part: a rerun redoes those two and resumes the other four.
    s3.delete_file(f"{prefix}/_shards/shard-00001.json")
    s3.delete_file(f"{prefix}/_shards/shard-00004.json")
    s3.delete_file(f"{prefix}/parquet/part-00004.parquet")
    second = run_masks(cfg)
    assert second["counts"]["shards_run"] == 2
    assert second["counts"]["masks_written"] == 10 and second["counts"]["resumed"] == 20

    manifest = read_manifest(s3, prefix)
    assert manifest["counts"]["resumed"] == 20 and manifest["counts"]["rendered_total"] == 30
    assert image_ids(s3, prefix) == list(range(1, 31)), "every image exactly once"
    assert len(listing(s3, f"{prefix}/masks")) == 30
    assert not [n for n in listing(s3, f"{prefix}/parquet") if ".tmp-" in n]

    third = run_masks(cfg)
    assert third["counts"]["shards_run"] == 0 and third["counts"]["resumed"] == 30
