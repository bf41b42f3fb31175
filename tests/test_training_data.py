"""A worker's batches (pipelines/training/data.py): buckets take turns in an order drawn from (seed,
epoch) alone, the same on every rank; an epoch reads each bucket whole; a cached shard gives the
same rows again."""

from __future__ import annotations

import pytest
import ray
import torch

from pipelines.training.config import TrainConfig
from pipelines.training.data import ShardCache, epoch_batches

PER_WORKER = 2
CONFIG = TrainConfig(steps=10, global_batch_size=PER_WORKER, seed=7)


def _bucket_shards(rows: list[int]) -> list:
    """One data set per bucket, its rows numbered ``bucket * 100 + row``."""
    return [
        ray.data.from_items([{"id": bucket * 100 + row} for row in range(count)]).iterator()
        for bucket, count in enumerate(rows)
    ]


def _epoch(rows: list[int], rank: int, epoch: int, caches=None, batches=None) -> list[list[int]]:
    caches = caches or [None] * len(rows)
    batches = batches or [count // PER_WORKER for count in rows]
    shards = _bucket_shards(rows)
    return [
        batch["id"].tolist()
        for batch in epoch_batches(shards, caches, batches, CONFIG, PER_WORKER, torch.device("cpu"), rank, epoch)
    ]


def test_buckets_take_turns_in_an_order_of_the_seed_and_epoch_alone_and_are_read_whole(local_ray):
    rows = [4, 6, 2]
    first = _epoch(rows, rank=0, epoch=0)
    buckets = [batch[0] // 100 for batch in first]
    assert all(len({row // 100 for row in batch}) == 1 for batch in first), "a batch mixes buckets"
    assert sorted(row for batch in first for row in batch) == [
        b * 100 + r for b, n in enumerate(rows) for r in range(n)
    ]
    assert [batch[0] // 100 for batch in _epoch(rows, rank=1, epoch=0)] == buckets
    assert any([batch[0] // 100 for batch in _epoch(rows, rank=0, epoch=e)] != buckets for e in (1, 2, 3))


def test_a_bucket_with_more_batches_than_declared_fails(local_ray):
    with pytest.raises(AssertionError, match="bucket 1 holds more than its 2 batches"):
        _epoch([4, 6], rank=0, epoch=0, batches=[2, 2])


def test_a_cached_shard_gives_its_rows_again_in_an_order_of_the_seed(local_ray):
    rows = [4, 6]
    caches = [ShardCache(), ShardCache()]
    streamed = _epoch(rows, rank=0, epoch=0, caches=caches)
    assert all(cache.columns is not None for cache in caches), "the first epoch seals the caches"
    cached = _epoch(rows, rank=0, epoch=1, caches=caches)
    assert sorted(map(sorted, cached)) != [] and sorted(r for b in cached for r in b) == sorted(
        r for b in streamed for r in b
    )
    assert cached == _epoch(rows, rank=0, epoch=1, caches=caches)
