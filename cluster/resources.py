"""What a Ray Data step asks the cluster for.

Every step states its resources explicitly, so the autoscaler brings up CPU nodes for decode and
filtering and GPU nodes for the encoders, and a reader can see what each step costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray.data import ActorPoolStrategy


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepResources:
    """Resources of one Ray Data step run as a pool of actors."""

    num_cpus: float = 1.0
    """CPUs each actor holds (fractions let several small actors share a core)."""
    num_gpus: float = 0.0
    """GPUs each actor holds; 0 runs the step on CPU."""
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
            "compute": ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                         max_concurrent_calls_per_actor=self.calls_per_actor,
                                         enable_true_multi_threading=self.calls_per_actor > 1),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
        }

    def map_batches_args(self) -> dict[str, Any]:
        """Keyword arguments for ``Dataset.map_batches`` with a callable-class step."""
        return {**self.actor_args(), "batch_size": self.batch_size}
