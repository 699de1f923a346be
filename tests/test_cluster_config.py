"""cluster.yaml: valid for the installed Ray's launcher, as docs/cluster.md says."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


def test_matches_the_schema_shipped_with_ray(cluster, schema):
    jsonschema.validate(cluster, schema)


def test_passes_rays_own_config_checks(cluster):
    # What `ray up` does before it talks to the cloud: fill in the provider's defaults, then check.
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 4


def test_schema_check_catches_a_misspelt_key(cluster, schema):
    bad = copy.deepcopy(cluster)
    bad["max_worker"] = bad.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(bad, schema)


def test_too_few_max_workers_for_the_minimums_is_rejected(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["cpu_worker"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_config(prepare_config(bad))


def test_node_roles(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "render tasks and training stay off the head"
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    assert 1 <= cpu["min_workers"] < cpu["max_workers"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"], "GPU nodes start only when training asks"
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert gpu["docker"]["worker_image"].endswith("-gpu")
    for worker in (cpu, gpu):
        # Without an instance profile the workers could not reach the s3:// outputs.
        assert worker["node_config"]["IamInstanceProfile"]


def test_nodes_run_the_installed_ray_and_install_rayseg(cluster):
    images = [cluster["docker"]["image"]]
    images += [
        t["docker"]["worker_image"]
        for t in cluster["available_node_types"].values()
        if "docker" in t
    ]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image
    mounted = [remote for remote, local in cluster["file_mounts"].items() if local == "."]
    assert mounted, "the repository is copied to the nodes"
    assert any("pip install" in c and mounted[0] in c for c in cluster["setup_commands"])
    assert {".gitignore", ".rayignore"} <= set(cluster["rsync_filter"])


def test_nodes_start_with_token_authentication(cluster):
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
