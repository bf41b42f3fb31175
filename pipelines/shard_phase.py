"""Phases that turn each input shard into one output shard of the same name: decode, embed, pre-encode.

A shard is the unit of work, of resume and of the ledger. Each output shard is written under a
temporary name and moved into place complete, with its ledger (samples in, kept, dropped by
reason) and the phase's fingerprint in the Parquet footer, so the file itself proves what it
holds. A rerun skips every shard whose output is complete for the current fingerprint
(``pipelines/fingerprints.py``), and the whole phase when its manifest is; a run killed at any
moment leaves each shard either finished or absent, never half-written or doubled.

Ray Data schedules the shards over a pool of actors (one shard per call), so the pool's size and
resources say how wide the phase runs and the autoscaler can add nodes for it.

A phase that holds GPUs may run under a GPU-hour budget. The pool holds its GPUs from its start,
so the budget is a wall-clock deadline, and an actor starts a shard only when its longest shard so
far would still end before it; the shards it leaves are done by the next run, whose finished shards
are skipped as always.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from cluster.budget import gpu_hours
from cluster.resources import StepResources
from pipelines import fingerprints, schema
from pipelines.ledger import Manifest, ShardCounts, read_manifest, remove_manifest, write_manifest
from pipelines.storage import (
    StorageConfig,
    StorageUnreachable,
    filesystem,
    remove_orphaned_temporaries,
    temporary_name,
)
from pipelines.tracking import ATTEMPT_GPU_HOURS

_COUNTS = b"wuerstchen.counts"


class ShardOutput:
    """One output shard being written: row groups go to a temporary file, ``commit`` moves it in place."""

    def __init__(self, fs, path: str, table_schema: pa.Schema):
        self.fs, self.path = fs, path
        self.temporary = temporary_name(path)
        self.stream = fs.open(self.temporary, "wb")
        # Dictionaries and min/max statistics of tensor columns cost most of the write time (about 2/3
        # for a v2 latent shard) and buy nothing: real latents take too many distinct values.
        scalar_columns = [f.name for f in table_schema if not isinstance(f.type, pa.FixedShapeTensorType)]
        self.writer = pq.ParquetWriter(
            self.stream, table_schema, use_dictionary=scalar_columns, write_statistics=scalar_columns
        )
        self.committed = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.writer.write_table(rows_to_table(rows, self.writer.schema))

    def write_columns(self, columns: dict[str, Any]) -> None:
        """Rows given column by column (see ``columns_to_table``)."""
        self.write_table(columns_to_table(columns, self.writer.schema))

    def write_table(self, table: pa.Table) -> None:
        """Rows of the shard's schema, as one row group."""
        if table.num_rows:
            self.writer.write_table(table, row_group_size=table.num_rows)

    def commit(self, counts: ShardCounts, fingerprint: dict[str, Any]) -> None:
        self.writer.add_key_value_metadata(
            {_COUNTS: json.dumps(dataclasses.asdict(counts)), **fingerprints.metadata(fingerprint)}
        )
        self.writer.close()
        self.stream.close()
        self.fs.mv(self.temporary, self.path)
        self.committed = True

    def __enter__(self) -> ShardOutput:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            self.writer.close()
            self.stream.close()
            self.fs.rm(self.temporary)


def rows_to_table(rows: list[dict[str, Any]], table_schema: pa.Schema) -> pa.Table:
    """Rows (dicts) as a table; tensor columns take numpy arrays (never null: Parquet cannot round-trip it)."""
    return columns_to_table({field.name: [row[field.name] for row in rows] for field in table_schema}, table_schema)


def columns_to_table(columns: dict[str, Any], table_schema: pa.Schema) -> pa.Table:
    """The schema's columns as a table. A column is a list of values, or for tensor and list fields
    also one array whose first axis runs over the rows; columns the schema lacks are left out."""
    arrays = {}
    for field in table_schema:
        values = columns[field.name]
        if isinstance(field.type, pa.FixedShapeTensorType):
            arrays[field.name] = _tensor_column(field.type, values)
        elif pa.types.is_list(field.type) and len(values) and isinstance(values[0], np.ndarray):
            arrays[field.name] = _ragged_column(field.type, values)
        else:
            arrays[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(arrays, schema=table_schema)


def _tensor_column(tensor_type: pa.FixedShapeTensorType, values: list | np.ndarray) -> pa.ExtensionArray:
    size = int(np.prod(tensor_type.shape))
    dtype = tensor_type.value_type.to_pandas_dtype()
    if isinstance(values, np.ndarray):
        flat = np.asarray(values, dtype=dtype).reshape(len(values), size)
    else:
        assert all(value is not None for value in values), "tensor columns hold a value in every row"
        flat = np.stack([np.asarray(value, dtype=dtype).reshape(size) for value in values])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=tensor_type.value_type), size)
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def _ragged_column(list_type: pa.ListType, values: list[np.ndarray] | np.ndarray) -> pa.ListArray:
    """Arrays of differing sizes as one list column, each flattened, without a Python loop over elements."""
    flat = [np.asarray(value, dtype=list_type.value_type.to_pandas_dtype()).reshape(-1) for value in values]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in flat])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat), type=list_type.value_type))


def unflatten_ragged(batch: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Ray Data step, the reader's side of ``_ragged_column``: rows whose arrays share one shape (one
    aspect-ratio bucket) -> a (rows, *shape) array per column. Here, not beside the models, because
    each Ray worker that runs it imports its module."""
    for name, shape in shapes.items():
        if name in batch:
            values = list(batch[name])
            batch[name] = np.stack(values).reshape(-1, *shape) if values else np.empty((0, *shape), np.float16)
    return batch


def read_shard_ledger(fs, path: str) -> tuple[ShardCounts, dict[str, Any]] | None:
    """The ledger and fingerprint of a finished output shard, or None when there is none."""
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as stream:
        metadata = pq.read_metadata(stream).metadata or {}
    if _COUNTS not in metadata:
        return None
    return ShardCounts(**json.loads(metadata[_COUNTS])), fingerprints.from_metadata(metadata)


def iter_rows(fs, path: str, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[list[dict]]:
    """Rows of a Parquet file in batches, without holding the whole shard in memory."""
    with fs.open(path, "rb") as stream:
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=batch_size, columns=columns):
            yield batch.to_pylist()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardPhase:
    """What a per-shard phase is: its name, its step and how wide it runs."""

    name: str
    step: type
    """Callable class; built once per actor with ``step_kwargs``; called with ``{"shard": [name]}``."""
    step_kwargs: dict[str, Any]
    resources: StepResources
    fingerprint: dict[str, Any]
    """Everything that decides the phase's output (``fingerprints.of`` its settings and its input's)."""


class WithinDeadline:
    """Ray Data step: ``step`` built as the phase builds it, called on a shard only while the shard can
    end before ``deadline`` (seconds of ``clock``), judged by the actor's longest shard so far. A
    shard left out returns no output; the phase then has no manifest until a later run does it."""

    def __init__(
        self, *, step: type, step_kwargs: dict[str, Any], deadline: float, clock: Callable[[], float] = time.time
    ):
        self.step, self.deadline, self.clock = step(**step_kwargs), deadline, clock
        self.longest = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = self.clock()
        if started + self.longest > self.deadline:
            return {schema.SHARD: batch[schema.SHARD], "samples_in": np.zeros(1, np.int64)}
        result = self.step(batch)
        self.longest = max(self.longest, self.clock() - started)
        return result


def run(
    phase: ShardPhase,
    shards: list[str],
    output_url: str,
    storage: StorageConfig,
    *,
    budget_gpu_hours: float | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[Manifest | None, dict[str, float]]:
    """Runs ``phase`` over the shards whose output is missing or stale; returns the manifest and metrics.

    Metrics are empty when every shard was already finished. ``budget_gpu_hours``: what this run may
    hold (a phase without GPUs holds none); the manifest is None when it stopped shards short of it.
    """
    previous = read_manifest(output_url, storage)
    if (
        previous is not None
        and fingerprints.is_complete(previous.config, phase.fingerprint)
        and set(previous.shards) == set(shards)
    ):
        return previous, {}
    fs, folder = filesystem(output_url, storage)
    if previous is not None:
        remove_manifest(output_url, storage)  # a stale manifest must not vouch for new outputs
    fs.makedirs(folder, exist_ok=True)

    def finished(shard: str) -> bool:
        ledger = read_shard_ledger(fs, f"{folder}/{schema.shard_parquet(shard)}")
        return ledger is not None and fingerprints.is_complete(ledger[1], phase.fingerprint)

    todo = [shard for shard in shards if not finished(shard)]
    actors = min(len(todo), phase.resources.max_actors)
    gpus = actors * phase.resources.num_gpus
    step, step_kwargs = phase.step, phase.step_kwargs
    if budget_gpu_hours is not None and gpus:
        step, step_kwargs = (
            WithinDeadline,
            {
                "step": phase.step,
                "step_kwargs": phase.step_kwargs,
                "clock": clock,
                "deadline": clock() + budget_gpu_hours * 3600 / gpus,
            },
        )
    started = time.monotonic()
    if todo:
        try:
            ray.data.from_items([{schema.SHARD: shard} for shard in todo], override_num_blocks=len(todo)).map_batches(
                step,
                fn_constructor_kwargs=step_kwargs,
                batch_size=1,
                **phase.resources.actor_args(),
            ).materialize()
        except ray.exceptions.RayActorError as died:
            # An actor whose node cannot reach the storage stops in its __init__ (each step asks
            # first); Ray hands that on as text within the node's traceback: one message here.
            unreachable = StorageUnreachable.named_in(str(died))
            if unreachable is None:
                raise
            raise unreachable from None
    seconds = time.monotonic() - started

    fs.invalidate_cache()  # object-store listings cached before the actors wrote
    remove_orphaned_temporaries(fs, folder)  # of actors that died mid-shard (Ray redid those shards)
    ledgers = {shard: read_shard_ledger(fs, f"{folder}/{schema.shard_parquet(shard)}") for shard in shards}
    done = [
        shard
        for shard in todo
        if ledgers[shard] is not None and fingerprints.is_complete(ledgers[shard][1], phase.fingerprint)
    ]
    metrics = throughput_metrics(
        samples=sum(ledgers[s][0].samples_in for s in done),
        seconds=seconds,
        resources=phase.resources,
        actors=actors,
        shards_done=len(done),
        shards_skipped=len(shards) - len(todo),
    )
    if len(done) < len(todo):
        assert step is WithinDeadline, f"{phase.name}: a shard step returned without committing its output"
        return None, {**metrics, "shards_left": len(todo) - len(done)}
    manifest = Manifest(
        phase=phase.name, config=phase.fingerprint, shards={s: ledger[0] for s, ledger in ledgers.items()}
    )
    write_manifest(output_url, manifest, storage)
    return manifest, metrics


def throughput_metrics(
    *, samples: int, seconds: float, resources: StepResources, actors: int, shards_done: int, shards_skipped: int
) -> dict[str, float]:
    """Speed and cost of a run, per CPU and per GPU held (pool size × resources per actor)."""
    cpus, gpus = actors * resources.num_cpus, actors * resources.num_gpus
    per_second = samples / seconds if seconds > 0 else 0.0
    metrics = {
        "seconds": seconds,
        "samples_processed": samples,
        "samples_per_second": per_second,
        "shards_processed": shards_done,
        "shards_skipped": shards_skipped,
        "cpus_held": cpus,
        "gpus_held": gpus,
        ATTEMPT_GPU_HOURS: gpu_hours(gpus, seconds),
    }
    if cpus:
        metrics["samples_per_second_per_cpu"] = per_second / cpus
    if gpus:
        metrics["samples_per_second_per_gpu"] = per_second / gpus
    return metrics
