"""ray_cluster.yaml passes Ray's own launcher validation, offline, and has the pools the design asks for."""

from __future__ import annotations

import copy
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_passes_rays_validator(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_the_validator_rejects_a_broken_copy(cluster):
    cluster["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(ValidationError):
        validate_config(prepare_config(cluster))


def test_head_cpu_and_gpu_pools(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["node_config"]["InstanceType"] == "p4d.24xlarge"  # 8x A100
    assert not types["cpu_worker"]["node_config"]["InstanceType"].startswith(("p", "g"))
    for pool in ("cpu_worker", "gpu_worker"):
        assert 0 == types[pool]["min_workers"] < types[pool]["max_workers"]


def test_image_matches_the_pinned_ray(cluster):
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{version('ray')}-")
    assert any("pip install" in command and "wuerstchen-ray" in command for command in cluster["setup_commands"])
