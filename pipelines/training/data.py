"""A worker's batches, epoch by epoch, in an order that follows from the seed alone.

Ray Data hands out the training set in a fixed order (``preserve_order``), so each epoch gives every
rank the same batches: a seeded run repeats, and a resumed run skips exactly the batches its
checkpoint had consumed. Latents in aspect-ratio buckets come as one data set per bucket; a step's
batch is from one bucket, and the buckets take turns in an order drawn from (seed, epoch), the
same on every rank (each holds as many batches of each bucket).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from pipelines.training.config import TrainConfig
from pipelines.training.step import step_seed

TRAIN_DATASET = "train"


class ShardCache:
    """A worker's shard in memory, collected during its first epoch."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []
        self.columns: dict[str, torch.Tensor] | None = None

    def seal(self) -> None:
        self.columns = {name: torch.cat([b[name] for b in self.batches]) for name in self.batches[0]}
        self.batches = []


def epoch_batches(
    shards: list,
    caches: list[ShardCache | None],
    batches_per_bucket: list[int],
    config: TrainConfig,
    per_worker: int,
    device: torch.device,
    rank: int,
    epoch: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of this worker's batches. Buckets take turns in an order shuffled by (seed, epoch) alone:
    every rank holds as many batches of each bucket, so all ranks step through the same order."""
    if not batches_per_bucket:
        yield from _shard_batches(shards[0], caches[0], config, per_worker, device, rank, epoch)
        return
    order = [bucket for bucket, batches in enumerate(batches_per_bucket) for _ in range(batches)]
    random.Random(step_seed(config.seed, 0, epoch)).shuffle(order)
    iterators = [
        _shard_batches(shard, cache, config, per_worker, device, rank, epoch) for shard, cache in zip(shards, caches)
    ]
    for bucket in order:
        yield next(iterators[bucket])
    for bucket, iterator in enumerate(iterators):  # read to the end: a cache seals, Ray Data's pass finishes
        assert next(iterator, None) is None, f"bucket {bucket} holds more than its {batches_per_bucket[bucket]} batches"


def _shard_batches(
    shard, cache: ShardCache | None, config: TrainConfig, per_worker: int, device: torch.device, rank: int, epoch: int
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of a data set's batches: from Ray Data, or from the cache once it holds the shard."""
    if cache is not None and cache.columns is None and epoch > 0:
        # A run resumed after its first epoch fills the cache first, in the order the first epoch streams
        # (the local shuffle is seeded per epoch), and takes this epoch from it: the batches the run
        # would have had without the interruption, and the ones its checkpoint counted as consumed.
        cache.batches.extend(_streamed_batches(shard, config, per_worker, device, epoch=0))
        if cache.batches:
            cache.seal()
    if cache is not None and cache.columns is not None:
        rows = next(iter(cache.columns.values())).shape[0]
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(step_seed(config.seed, rank, epoch)))
        for start in range(0, rows - per_worker + 1, per_worker):
            chosen = order[start : start + per_worker].to(device)
            yield {name: values[chosen] for name, values in cache.columns.items()}
        return
    for batch in _streamed_batches(shard, config, per_worker, device, epoch):
        if cache is not None:
            cache.batches.append(batch)
        yield batch
    if cache is not None and cache.batches:
        cache.seal()


def _streamed_batches(
    shard, config: TrainConfig, per_worker: int, device: torch.device, epoch: int
) -> Iterator[dict[str, torch.Tensor]]:
    return shard.iter_torch_batches(
        batch_size=per_worker,
        drop_last=True,
        device=device,
        local_shuffle_buffer_size=4 * per_worker,
        local_shuffle_seed=config.seed * 1000 + epoch,
    )
