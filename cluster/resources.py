"""What a Ray Data step asks the cluster for.

Every step states its resources explicitly, so the autoscaler brings up CPU nodes for decode and
filtering and GPU nodes for the encoders, and a reader can see what each step costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray.data import ActorPoolStrategy

GPU = "GPU"
# Resources Ray defines itself, which cannot stand for GPUs.
_RAY_RESOURCES = ("CPU", "memory", "object_store_memory")


def check_gpu_resource(name: str) -> None:
    """A ValueError unless ``name`` can be what GPU work asks Ray for: ``GPU``, or a custom resource
    that a node type offers in place of GPUs."""
    if name != GPU and (not name or name != name.strip() or name in _RAY_RESOURCES or name.startswith("node:")):
        raise ValueError(
            f"gpu_resource must be {GPU} or the name of a custom resource that node types offer in place "
            f"of GPUs, got {name!r}"
        )


def gpu_request(gpus: float, resource: str) -> dict[str, Any]:
    """Ray's remote arguments for ``gpus`` GPUs asked for as ``resource``: with a custom resource in
    place of GPUs (to try placement and autoscaling without GPUs) the work holds that and runs on CPU."""
    if resource == GPU:
        return {"num_gpus": gpus}
    return {"num_gpus": 0, **({"resources": {resource: gpus}} if gpus else {})}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepResources:
    """Resources of one Ray Data step run as a pool of actors."""

    num_cpus: float = 1.0
    """CPUs each actor holds (fractions let several small actors share a core)."""
    num_gpus: float = 0.0
    """GPUs each actor holds; 0 runs the step on CPU."""
    gpu_resource: str = GPU
    """The Ray resource ``num_gpus`` asks for: GPU, or a custom resource that a node type offers in
    place of GPUs (the step then runs on CPU there)."""
    min_actors: int = 1
    """Actors kept alive while the step runs."""
    max_actors: int = 1
    """Upper bound the pool may scale to when the cluster has room."""
    batch_size: int = 1024
    """Rows handed to one call of the step."""
    calls_per_actor: int = 1
    """Calls one actor runs at once, each on a thread of its own (the steps keep no per-call state on
    the actor). With 2, a GPU actor of a shard phase starts its next shard (reading, decoding the
    first batch) while it still writes and commits the last one, so the device does not wait
    between shards."""

    def __post_init__(self):
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        check_gpu_resource(self.gpu_resource)
        if self.min_actors < 1:
            raise ValueError(f"min_actors must be >= 1, got {self.min_actors}")
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calls_per_actor < 1:
            raise ValueError(f"calls_per_actor must be >= 1, got {self.calls_per_actor}")

    def actor_args(self) -> dict[str, Any]:
        """Keyword arguments of ``map_batches``/``map_groups`` that place a callable-class step."""
        return {
            "compute": ActorPoolStrategy(
                min_size=self.min_actors,
                max_size=self.max_actors,
                max_concurrent_calls_per_actor=self.calls_per_actor,
                enable_true_multi_threading=self.calls_per_actor > 1,
            ),
            "num_cpus": self.num_cpus,
            **gpu_request(self.num_gpus, self.gpu_resource),
        }

    @property
    def on_gpu(self) -> bool:
        """Whether each actor holds real GPUs."""
        return self.num_gpus > 0 and self.gpu_resource == GPU

    def map_batches_args(self) -> dict[str, Any]:
        """Keyword arguments for ``Dataset.map_batches`` with a callable-class step."""
        return {**self.actor_args(), "batch_size": self.batch_size}
