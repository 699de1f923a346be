"""`rayseg masks` on a simulated 2-node cluster: shards spread over the nodes, output complete.

Two Ray nodes on this machine (ray.cluster_utils.Cluster), 1 CPU each, each with its own custom
resource so the test can tell them apart; the shard records name the node that rendered them.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from rayseg.config import MasksConfig
from rayseg.layout import part_name
from rayseg.masks import run_masks

NODES = ("node_a", "node_b")


@pytest.fixture(scope="module")
def cluster(ray_tmpdir):
    ray.shutdown()  # in case an earlier module left a Ray of its own connected
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {NODES[0]: 1},
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=1, resources={NODES[1]: 1})
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def node_names(cluster) -> dict[str, str]:
    """Ray node id -> our name for it, from each node's custom resource."""
    ray.init(address=cluster.address, ignore_reinit_error=True)
    names = {}
    for node in ray.nodes():
        if node["Alive"]:
            (name,) = [n for n in NODES if n in node["Resources"]]
            names[node["NodeID"]] = name
    return names


@pytest.mark.slow
def test_shards_spread_over_both_nodes(cluster, make_synth, tmp_path):
    annotations = make_synth(40)
    out = tmp_path / "masks"
    manifest = run_masks(
        MasksConfig(
            annotations=str(annotations), out=str(out), shard_size=4, address=cluster.address
        )
    )
    assert manifest["counts"]["masks_written"] == 40
    assert manifest["counts"]["shards_run"] == manifest["counts"]["shards"] == 10

    names = node_names(cluster)
    assert sorted(names.values()) == sorted(NODES)
    records = [json.loads(p.read_text()) for p in sorted((out / "_shards").glob("shard-*.json"))]
    assert len(records) == 10
    # Every record names a live node of the cluster, and both nodes rendered shards.
    per_node = Counter(names.get(r["node_id"]) for r in records)
    assert set(per_node) == set(NODES), per_node
    # Across both nodes, every image was rendered by exactly one shard, and each shard's
    # Parquet part holds exactly the images its record says it wrote.
    written = [i for r in records for i in r["written"]]
    assert sorted(written) == list(range(1, 41))
    parts = sorted(p.name for p in (out / "parquet").iterdir())
    assert parts == [part_name(r["shard"]) for r in records]
    for r in records:
        part = out / "parquet" / part_name(r["shard"])
        ids = pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()
        assert ids == r["written"], (r["shard"], names.get(r["node_id"]))
    assert len(list((out / "masks").glob("*.png"))) == 40
