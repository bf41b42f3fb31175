"""ray_cluster.yaml passes Ray's own launcher validation, offline, and has the pools the design asks for."""

from __future__ import annotations

import copy
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray._private.label_utils import validate_node_label_syntax, validate_node_labels
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster import nodes

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
    assert types["gpu_worker"]["node_config"]["InstanceType"] == "p4de.24xlarge"  # 8x A100 80 GB
    assert not types["cpu_worker"]["node_config"]["InstanceType"].startswith(("p", "g"))
    for pool in ("cpu_worker", "gpu_worker"):
        assert 0 == types[pool]["min_workers"] < types[pool]["max_workers"]


def test_the_spot_gpu_pool_is_the_on_demand_node_on_spot_capacity_and_opens_with_one_edit(cluster, tmp_path):
    types = cluster["available_node_types"]
    on_demand, spot = types["gpu_worker"], types["gpu_worker_spot"]
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in on_demand["node_config"]
    without_market = {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"}
    assert without_market == on_demand["node_config"]
    assert (spot["resources"], spot["labels"]) == (on_demand["resources"], on_demand["labels"])
    # Closed until opened: GPU requests land on the on-demand pool, as the planner assumes.
    assert spot["max_workers"] == 0 and set(nodes.worker_node_types()) == {"cpu_worker", "gpu_worker"}
    # A node type's own setup commands replace the common ones: the same install, then the watcher
    # that turns AWS's interruption notice into Ray's drain.
    *install, watcher = spot["worker_setup_commands"]
    assert install == cluster["setup_commands"] and "python -m cluster.spot_notice" in watcher

    spot["max_workers"], on_demand["max_workers"] = on_demand["max_workers"], 0
    validate_config(prepare_config(copy.deepcopy(cluster)))
    opened = tmp_path / "ray_cluster.yaml"
    opened.write_text(yaml.safe_dump(cluster))
    types = nodes.worker_node_types(opened)
    assert set(types) == {"cpu_worker", "gpu_worker_spot"}
    assert nodes.node_type_for(8, 1, types) == "gpu_worker_spot"
    assert nodes.gpu_memory_gib(opened)["gpu_worker_spot"] == 80


def test_image_matches_the_pinned_ray(cluster):
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{version('ray')}-")
    assert any("pip install" in command and "wuerstchen-ray" in command for command in cluster["setup_commands"])


def test_gpu_node_types_give_their_gpu_memory_in_a_label_ray_start_accepts(cluster):
    types = cluster["available_node_types"]
    gpu_types = [name for name, node in types.items() if node["resources"].get("GPU", 0) > 0]
    assert gpu_types and set(nodes.gpu_memory_gib()) == set(gpu_types)
    assert nodes.gpu_memory_gib()["gpu_worker"] == 80  # p4de.24xlarge: A100 80 GB (81,920 MiB)
    for name in gpu_types:
        # What `ray start --labels` checks; the launcher's schema above only asks for strings.
        validate_node_labels(types[name]["labels"])
        validate_node_label_syntax(types[name]["labels"])
