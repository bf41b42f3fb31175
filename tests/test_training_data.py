"""A worker's batches (pipelines/training/data.py), read from Parquet files: an epoch's plan follows
from (seed, epoch) alone, gives every training row to one rank at most and as many batches to each,
the buckets take turns in the same order on every rank, and a reader started from a position in an
epoch gives the batches that follow it, reading again only rows of the piece that holds it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.training.config import TrainConfig
from pipelines.training.data import EpochReader, TrainingRows, count_rows

WORKERS, PER_WORKER = 2, 3
CONFIG = TrainConfig(steps=10, global_batch_size=WORKERS * PER_WORKER, workers=WORKERS, seed=7)
FILES, ROWS_PER_FILE, ROWS_PER_GROUP = 4, 20, 5


@pytest.fixture(scope="module")
def buckets(tmp_path_factory, local_ray) -> list[TrainingRows]:
    """Two buckets over four files of row groups of 5 rows; rows numbered ``file * 100 + row``, every
    fourth a validation row, the bucket ``id % 3 == 0`` or not."""
    folder = tmp_path_factory.mktemp("shards")
    files = []
    for file in range(FILES):
        ids = np.arange(ROWS_PER_FILE) + file * 100
        table = pa.table(
            {
                "id": ids,
                "vector": pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack([ids, -ids], axis=1).astype(np.float32)),
                "split": ["validation" if i % 4 == 3 else "train" for i in ids],
                "third": ids % 3 == 0,
            }
        )
        pq.write_table(table, folder / f"{file}.parquet", row_group_size=ROWS_PER_GROUP)
        files.append(str(folder / f"{file}.parquet"))
    training = pc.field("split") == "train"
    counted = count_rows(
        {
            name: TrainingRows(
                files=tuple(files),
                columns=("id", "vector"),
                keep=training & (pc.field("third") == (name == "third")),
                keep_columns=("split", "third"),
            )
            for name in ("third", "rest")
        }
    )
    return [dataclasses.replace(rows, batches=rows.rows() // WORKERS // PER_WORKER) for rows in counted.values()]


def _ids(buckets, rank: int, epoch: int, taken: int = 0, config: TrainConfig = CONFIG) -> list[list[int]]:
    reader = EpochReader(buckets, config, rank, torch.device("cpu"))
    try:
        batches = [batch for batch in reader.batches(epoch, taken)]
    finally:
        reader.close()
    assert all(torch.equal(batch["vector"][:, 0], batch["id"].float()) for batch in batches), "columns out of step"
    return [batch["id"].tolist() for batch in batches]


def test_the_counts_are_of_the_training_rows_of_each_row_group(buckets):
    third, rest = buckets
    for file, groups in enumerate(third.group_rows):
        ids = [file * 100 + row for row in range(ROWS_PER_FILE)]
        assert sum(groups) == sum(i % 4 != 3 and i % 3 == 0 for i in ids)
        assert len(groups) == ROWS_PER_FILE // ROWS_PER_GROUP
    assert third.rows() + rest.rows() == FILES * ROWS_PER_FILE * 3 // 4


def test_an_epoch_gives_each_rank_as_many_batches_of_training_rows_each_row_once(buckets):
    epoch = [_ids(buckets, rank, epoch=0) for rank in range(WORKERS)]
    assert len(epoch[0]) == len(epoch[1]) == sum(rows.batches for rows in buckets)
    read = [row for batches in epoch for batch in batches for row in batch]
    assert len(read) == len(set(read)), "a row read twice in one epoch"
    assert all(row % 4 != 3 for row in read), "a validation row read"
    assert all(len(batch) == PER_WORKER for batches in epoch for batch in batches)
    # Each bucket leaves out less than a global batch, its rows that do not make whole batches.
    for index, rows in enumerate(buckets):
        in_bucket = [row for row in read if (row % 3 == 0) == (index == 0)]
        assert len(in_bucket) == rows.batches * WORKERS * PER_WORKER
        assert rows.rows() - len(in_bucket) < WORKERS * PER_WORKER


def test_buckets_take_turns_in_an_order_of_the_seed_and_epoch_alone(buckets):
    def turns(rank: int, epoch: int) -> list[bool]:
        return [batch[0] % 3 == 0 for batch in _ids(buckets, rank, epoch)]

    first = _ids(buckets, rank=0, epoch=0)
    assert all(len({row % 3 == 0 for row in batch}) == 1 for batch in first), "a batch mixes buckets"
    assert turns(1, 0) == turns(0, 0)
    assert any(turns(0, epoch) != turns(0, 0) for epoch in (1, 2, 3))


def test_an_epoch_repeats_from_the_seed_and_the_next_one_reshuffles(buckets):
    first = _ids(buckets, rank=0, epoch=0)
    assert _ids(buckets, rank=0, epoch=0) == first
    assert _ids(buckets, rank=0, epoch=1) != first
    assert _ids(buckets, rank=0, epoch=0, config=dataclasses.replace(CONFIG, seed=8)) != first


@pytest.mark.parametrize("cache_data", [False, True])
def test_a_reader_started_mid_epoch_gives_the_rest_and_reads_again_one_piece_at_most(buckets, cache_data):
    config = dataclasses.replace(CONFIG, cache_data=cache_data)
    whole = _ids(buckets, rank=1, epoch=2, config=config)
    reread = []
    for taken in range(1, len(whole)):
        reader = EpochReader(buckets, config, 1, torch.device("cpu"))
        try:
            rest = [batch["id"].tolist() for batch in reader.batches(2, taken)]
        finally:
            reader.close()
        assert rest == whole[taken:], taken
        # What it read again is rows of the one piece (of one file) that holds its position per bucket.
        assert reader.rows_reread <= len(buckets) * ROWS_PER_FILE, taken
        reread.append(reader.rows_reread)
        if not cache_data:
            assert reader.rows_read == len(rest) * PER_WORKER + reader.rows_reread, taken
    assert any(reread), "every position at the start of a piece: the skip within one is not shown"
    assert any(
        EpochReader(buckets, config, 1, torch.device("cpu")).positions(2, taken)
        != EpochReader(buckets, config, 1, torch.device("cpu")).positions(2, 0)
        for taken in range(1, len(whole))
    )


def test_the_cache_gives_the_batches_of_the_files_and_reads_each_file_once(buckets):
    cached = dataclasses.replace(CONFIG, cache_data=True)
    reader = EpochReader(buckets, cached, 0, torch.device("cpu"))
    try:
        epochs = [[batch["id"].tolist() for batch in reader.batches(epoch, 0)] for epoch in range(3)]
    finally:
        reader.close()
    assert epochs == [_ids(buckets, rank=0, epoch=epoch) for epoch in range(3)]
    assert reader.rows_read <= sum(rows.rows() for rows in buckets)


def test_the_recorded_position_names_the_file_and_row_of_each_rank(buckets):
    reader = EpochReader(buckets, CONFIG, 0, torch.device("cpu"))
    try:
        start, later = reader.positions(0, 0), reader.positions(0, 3)
    finally:
        reader.close()
    assert len(start) == len(buckets) and all(len(ranks) == WORKERS for ranks in start)
    assert {position["file"] for ranks in start for position in ranks} <= set(buckets[0].files)
    assert later != start
