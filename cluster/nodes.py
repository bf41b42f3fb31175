"""The node types of the cluster file (``ray_cluster.yaml``): what each worker type offers, and
which one an actor or worker asking for some CPUs and GPUs lands on.

The file lives at the repository root, where ``ray up ray_cluster.yaml`` takes it;
``cluster/ray_cluster.yaml`` is a link to it, so the package ships the same file and an installed
planner reads it too.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

import yaml

CLUSTER_FILE = resources.files("cluster") / "ray_cluster.yaml"
# The node label that gives a GPU node type's memory per GPU (Ray has no resource for it; labels
# pass Ray's validator and reach `ray start --labels`).
GPU_MEMORY_LABEL = "gpu-memory-gib"


def worker_node_types(path: Traversable = CLUSTER_FILE) -> dict[str, dict[str, float]]:
    """The resources of each worker node type of the cluster file that the autoscaler may launch (the
    head runs no tasks; a type whose max_workers is 0, such as the spot GPU pool until it is opened,
    gets no node)."""
    cluster = yaml.safe_load(path.read_text())
    return {
        name: node.get("resources", {})
        for name, node in cluster["available_node_types"].items()
        if name != cluster["head_node_type"] and node.get("max_workers", cluster["max_workers"]) > 0
    }


def gpu_memory_gib(path: Traversable = CLUSTER_FILE) -> dict[str, float]:
    """Memory per GPU of each worker node type that gives it (its GPU_MEMORY_LABEL), GiB."""
    cluster = yaml.safe_load(path.read_text())
    return {
        name: float(node["labels"][GPU_MEMORY_LABEL])
        for name, node in cluster["available_node_types"].items()
        if GPU_MEMORY_LABEL in node.get("labels", {})
    }


def node_type_for(cpus: float, gpus: float, types: dict[str, dict[str, float]]) -> str | None:
    """The node type one actor or worker asking for ``cpus`` and ``gpus`` lands on: a CPU-only
    request on a node without GPUs where one fits (GPU nodes are the expensive ones)."""
    fitting = [name for name, r in types.items() if cpus <= r.get("CPU", 0) and gpus <= r.get("GPU", 0)]
    return min(fitting, key=lambda name: gpus == 0 and types[name].get("GPU", 0) > 0, default=None)
