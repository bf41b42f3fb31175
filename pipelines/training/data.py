"""A worker's batches, epoch by epoch, read straight from the Parquet shards in an order that follows
from (seed, epoch) alone, so a resumed run starts reading where its checkpoint stopped.

The driver hands every worker each data set (one, or one per aspect-ratio bucket) as its files and
the training rows each row group holds (``count_rows``). An epoch's plan: the files in an order
shuffled by (seed, epoch, data set), their training rows one after another, and rank ``r`` of ``W``
takes the rows ``[r * M, (r + 1) * M)``, ``M`` a whole number of batches that is the same on every
rank (DDP needs the same step count everywhere). A rank reads its rows as pieces of at most one file,
each from the row groups that hold it, its rows shuffled by (seed, epoch, data set, file), the next
piece read on a background thread while the current one trains.

A step's batch is from one data set; the data sets take turns in an order drawn from (seed, epoch),
the same on every rank. The position in an epoch is therefore the number of batches taken: a resumed
rank opens the piece that holds it and skips only the rows before it in that piece.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from pipelines import pre_encode, schema
from pipelines.storage import StorageConfig, filesystem
from pipelines.trainable.base import decode_images
from pipelines.training.config import TrainConfig
from pipelines.training.step import step_seed

TRAIN_DATASET = "train"
Columns = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingRows:
    """A data set to train on: its Parquet files and how to read the training rows of each."""

    files: tuple[str, ...]
    """URLs of the Parquet files, resolved where they are read."""
    columns: tuple[str, ...]
    """The columns a batch holds."""
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    keep: pc.Expression | None = None
    """The rows to train on (None: all); evaluated on ``columns`` and ``keep_columns``."""
    keep_columns: tuple[str, ...] = ()
    """Columns ``keep`` (and ``held_out_below``) read besides ``columns``."""
    ragged_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    """Columns of flat arrays (bucketed latents) -> the shape of each row's array."""
    held_out_below: int | None = None
    """Decoded crops: leave out the keys hashed below this (``pre_encode.held_out``) and decode the
    images the rest hold into squares of ``resolution``."""
    resolution: int = 0
    group_rows: tuple[tuple[int, ...], ...] = ()
    """Per file, the training rows of each of its row groups (``count_rows`` fills it in)."""
    batches: int = 0
    """Batches each worker takes from this data set per epoch."""

    def rows(self) -> int:
        return sum(map(sum, self.group_rows))

    def read(self, file: int, first: int, last: int) -> Columns:
        """The training rows ``[first, last)`` of file ``file``, in file order, reading only the row
        groups that hold them."""
        starts = np.cumsum((0, *self.group_rows[file]))
        groups = [g for g in range(len(self.group_rows[file])) if starts[g] < last and starts[g + 1] > first]
        fs, path = filesystem(self.files[file], self.storage)
        with fs.open(path, "rb") as stream:
            table = pq.ParquetFile(stream).read_row_groups(
                groups, columns=list(dict.fromkeys((*self.columns, *self.keep_columns)))
            )
        table = self._kept(table)
        offset = int(starts[groups[0]])
        assert table.num_rows == starts[groups[-1] + 1] - offset, f"{self.files[file]} changed since it was counted"
        return self._columns(table.slice(first - offset, last - first))

    def _kept(self, table: pa.Table) -> pa.Table:
        if self.keep is not None:
            table = table.filter(self.keep)
        if self.held_out_below is not None:
            table = table.filter(pa.array(~pre_encode.held_out(table[schema.KEY].to_pylist(), self.held_out_below)))
        return table

    def _columns(self, table: pa.Table) -> Columns:
        columns = {}
        for name in self.columns:
            values = table[name].combine_chunks()
            if isinstance(values.type, pa.FixedShapeTensorType):
                columns[name] = values.to_numpy_ndarray()
            elif name in self.ragged_shapes:
                columns[name] = pc.list_flatten(values).to_numpy().reshape(-1, *self.ragged_shapes[name])
            else:
                columns[name] = values.to_numpy(zero_copy_only=False)
        if self.held_out_below is not None:
            columns = decode_images(columns, self.resolution)
        return columns


def count_rows(datasets: dict[str, TrainingRows]) -> dict[str, TrainingRows]:
    """``datasets`` (data sets of the same files: one, or the aspect-ratio buckets) with the training
    rows of each row group counted, a Ray task per file that counts them for every data set at once."""
    first = next(iter(datasets.values()))
    assert all(rows.files == first.files for rows in datasets.values()), "data sets of other files"
    counting = ray.remote(group_counts)
    per_file = ray.get([counting.remote(list(datasets.values()), file) for file in range(len(first.files))])
    return {
        name: dataclasses.replace(rows, group_rows=tuple(counts[index] for counts in per_file))
        for index, (name, rows) in enumerate(datasets.items())
    }


def group_counts(datasets: list[TrainingRows], file: int) -> list[tuple[int, ...]]:
    """Per data set, the training rows of each row group of file ``file`` (which every data set reads),
    reading only the columns that decide them, once for all the data sets."""
    first = datasets[0]
    columns = list(dict.fromkeys(column for rows in datasets for column in rows.keep_columns))
    fs, path = filesystem(first.files[file], first.storage)
    with fs.open(path, "rb") as stream:
        parquet = pq.ParquetFile(stream)
        groups = [parquet.read_row_group(group, columns=columns) for group in range(parquet.num_row_groups)]
    return [tuple(rows._kept(group).num_rows for group in groups) for rows in datasets]


@dataclasses.dataclass(frozen=True)
class Piece:
    """Training rows ``[first, last)`` of one file (numbered after the filters)."""

    file: int
    first: int
    last: int


def rank_pieces(rows: TrainingRows, index: int, seed: int, epoch: int, rank: int, per_worker: int) -> list[Piece]:
    """What rank ``rank`` reads of data set number ``index`` in ``epoch``: its rows of the epoch's file
    order, as pieces of at most one file."""
    order = list(range(len(rows.files)))
    random.Random(step_seed(seed, index, epoch)).shuffle(order)
    share = rows.batches * per_worker
    start, end = rank * share, (rank + 1) * share
    pieces, offset = [], 0
    for file in order:
        count = sum(rows.group_rows[file])
        first, last = max(start, offset), min(end, offset + count)
        if first < last:
            pieces.append(Piece(file, first - offset, last - offset))
        offset += count
    assert sum(p.last - p.first for p in pieces) == share, f"data set {index} holds fewer than {share} rows per rank"
    return pieces


def turns(batches: list[int], seed: int, epoch: int) -> list[int]:
    """The data set of each step of an epoch: as many turns as each has batches, in an order of
    (seed, epoch) alone."""
    order = [index for index, count in enumerate(batches) for _ in range(count)]
    random.Random(step_seed(seed, 0, epoch)).shuffle(order)
    return order


class EpochReader:
    """One worker's batches, from any position of any epoch; counts the rows it reads and keeps the
    files it read in memory with ``cache_data``."""

    def __init__(self, datasets: list[TrainingRows], config: TrainConfig, rank: int, device: torch.device):
        self.datasets, self.config, self.rank, self.device = datasets, config, rank, device
        self.per_worker = config.global_batch_size // config.workers
        self.rows_read = 0
        """Training rows read from storage."""
        self.rows_reread = 0
        """Rows read and dropped because they came before the position this reader started from:
        those a resumed run reads again."""
        self._cache: dict[tuple[int, int], Columns] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-reader")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def batches(self, epoch: int, taken: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` after the first ``taken``."""
        order = turns([rows.batches for rows in self.datasets], self.config.seed, epoch)
        streams = [self._stream(index, epoch, consumed) for index, consumed in enumerate(self._consumed(order, taken))]
        for index in order[taken:]:
            # A copy: the batch must not share memory with the piece (a step on CPU could write to it).
            yield {
                name: torch.from_numpy(values.copy()).to(self.device) for name, values in next(streams[index]).items()
            }

    def positions(self, epoch: int, taken: int) -> list[list[dict[str, Any]]]:
        """Per data set, per rank: the file the position after ``taken`` batches of ``epoch`` lies in, and
        the rows of the file (after the filters) before it, the rows of the rank's piece counted as read
        from its start."""
        order = turns([rows.batches for rows in self.datasets], self.config.seed, epoch)
        found = []
        for (index, rows), consumed in zip(enumerate(self.datasets), self._consumed(order, taken), strict=True):
            ranks = []
            for rank in range(self.config.workers):
                piece, skip = _piece_at(
                    rank_pieces(rows, index, self.config.seed, epoch, rank, self.per_worker), consumed
                )
                ranks.append({"file": rows.files[piece.file], "row": piece.first + skip})
            found.append(ranks)
        return found

    def _consumed(self, order: list[int], taken: int) -> list[int]:
        """Per data set, the rows of this rank's share taken in the first ``taken`` turns of ``order``."""
        return [order[:taken].count(index) * self.per_worker for index in range(len(self.datasets))]

    def _stream(self, index: int, epoch: int, consumed: int) -> Iterator[Columns]:
        """Data set ``index``'s batches of ``epoch`` from row ``consumed`` of this rank's share on."""
        pieces = rank_pieces(self.datasets[index], index, self.config.seed, epoch, self.rank, self.per_worker)
        if consumed == self.datasets[index].batches * self.per_worker:
            return
        first, skip = _piece_at(pieces, consumed)
        pieces = pieces[pieces.index(first) :]
        pending = self._pool.submit(self._piece, index, epoch, pieces[0])
        carried: Columns = {}  # the rows of the pieces before, short of a batch
        for number in range(len(pieces)):
            columns = pending.result()
            if number + 1 < len(pieces):
                pending = self._pool.submit(self._piece, index, epoch, pieces[number + 1])
            if number == 0 and skip:
                self.rows_reread += skip
                columns = {name: values[skip:] for name, values in columns.items()}
            if carried:
                columns = {name: np.concatenate([carried[name], values]) for name, values in columns.items()}
            rows = len(next(iter(columns.values())))
            start = 0
            while rows - start >= self.per_worker:
                yield {name: values[start : start + self.per_worker] for name, values in columns.items()}
                start += self.per_worker
            carried = {name: values[start:] for name, values in columns.items()} if start < rows else {}
        assert not carried, "a rank's share is a whole number of batches"

    def _piece(self, index: int, epoch: int, piece: Piece) -> Columns:
        """A piece's rows, shuffled by (seed, epoch, data set, file)."""
        rows = self.datasets[index]
        if self.config.cache_data:
            if (index, piece.file) not in self._cache:
                self._cache[index, piece.file] = rows.read(piece.file, 0, sum(rows.group_rows[piece.file]))
                self.rows_read += sum(rows.group_rows[piece.file])
            columns = {
                name: values[piece.first : piece.last] for name, values in self._cache[index, piece.file].items()
            }
        else:
            columns = rows.read(piece.file, piece.first, piece.last)
            self.rows_read += piece.last - piece.first
        order = np.random.default_rng((self.config.seed, epoch, index, piece.file)).permutation(
            piece.last - piece.first
        )
        return {name: values[order] for name, values in columns.items()}


def _piece_at(pieces: list[Piece], consumed: int) -> tuple[Piece, int]:
    """The piece that holds row ``consumed`` of a rank's share, and the rows of it before that row (the
    last piece, whole, once the share is consumed)."""
    for piece in pieces:
        if consumed < piece.last - piece.first:
            return piece, consumed
        consumed -= piece.last - piece.first
    assert consumed == 0, "a position beyond the rank's share"
    return pieces[-1], pieces[-1].last - pieces[-1].first
