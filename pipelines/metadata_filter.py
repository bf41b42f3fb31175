"""Phase 1: the metadata filter. The cheapest filters run first, before any image is opened.

Reads the img2dataset shard parquet files, gives every sample at most one drop reason (the first
LAION/size/caption check it fails), then drops duplicate hashes, keeping the first occurrence in
(shard, key) order. Writes one parquet per input shard holding every row and its ``drop_reason``
(null when kept), so later phases read only kept rows and the ledger stays complete, then a
manifest with the per-shard counts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from cluster.resources import StepResources
from pipelines import fingerprints, schema
from pipelines.ledger import Manifest, ShardCounts, read_manifest, remove_manifest, write_manifest
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig, filesystem, write_atomically

PHASE = "metadata_filter"
METADATA_REASONS = (
    DropReason.DOWNLOAD_FAILED,
    DropReason.METADATA_INVALID,
    DropReason.METADATA_MISSING,
    DropReason.TOO_SMALL,
    DropReason.TOO_LARGE,
    DropReason.ASPECT_RATIO,
    DropReason.CAPTION_TOO_SHORT,
    DropReason.WATERMARK,
    DropReason.UNSAFE,
    DropReason.AESTHETIC,
    DropReason.DUPLICATE,
)
_DEDUP_KEY = "_dedup_key"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetadataFilterConfig:
    """Thresholds of the metadata filter; a threshold set to none is not checked."""

    min_side: int | None = 512
    """Both original sides must be at least this many pixels (512 in the public training code: docs/design.md)."""
    max_side: int | None = 4096
    """Both original sides must be at most this many pixels."""
    max_aspect_ratio: float | None = 3.0
    """Long side / short side at most this (extreme panoramas lose their subject to the crop)."""
    min_caption_chars: int = 1
    """Captions shorter than this after stripping whitespace are dropped."""
    max_pwatermark: float | None = 0.5
    """LAION watermark probability at most this."""
    max_punsafe: float | None = 0.99
    """LAION unsafe probability at most this."""
    min_aesthetic: float | None = 5.0
    """LAION aesthetic score at least this (5.1 for Würstchen v2)."""
    drop_duplicates: bool = True
    """Keep only the first sample of each LAION ``hash``."""
    resources: StepResources = dataclasses.field(default_factory=StepResources)
    """Actors that run the filter, duplicate marking and shard writing."""

    def __post_init__(self):
        for name in ("min_side", "max_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {value}")
        if self.min_side is not None and self.max_side is not None and self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side}) must be >= min_side ({self.min_side})")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1 or none, got {self.max_aspect_ratio}")
        if self.min_caption_chars < 0:
            raise ValueError(f"min_caption_chars must be >= 0, got {self.min_caption_chars}")
        for name in ("max_pwatermark", "max_punsafe"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} is a probability: must be in [0, 1] or none, got {value}")

    def outcome(self) -> dict[str, Any]:
        """The settings that decide which samples are kept (resources do not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "resources"}

    def required_columns(self) -> list[str]:
        """Columns the enabled checks read; a null in any of them drops the sample."""
        columns = [schema.KEY, schema.STATUS, schema.CAPTION]
        if (self.min_side, self.max_side, self.max_aspect_ratio) != (None, None, None):
            columns += [schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT]
        for threshold, column in (
            (self.max_pwatermark, schema.PWATERMARK),
            (self.max_punsafe, schema.PUNSAFE),
            (self.min_aesthetic, schema.AESTHETIC),
        ):
            if threshold is not None:
                columns.append(column)
        return columns


def canonical_names(names: list[str]) -> list[str]:
    """Column names with the sources' spellings replaced (see ``schema.COLUMN_ALIASES``)."""
    return [
        schema.COLUMN_ALIASES[name]
        if name in schema.COLUMN_ALIASES and schema.COLUMN_ALIASES[name] not in names
        else name
        for name in names
    ]


def normalise_columns(table: pa.Table) -> tuple[pa.Table, pa.Array]:
    """The canonical columns (``schema.SHARD_METADATA_FIELDS``) in their canonical types, and which
    rows held a value that cannot be read as its column's type (that value becomes null).

    A column the source lacks is all null, so every shard gives the same schema.
    """
    table = table.rename_columns(canonical_names(table.column_names))
    invalid = pa.array(np.zeros(len(table), dtype=bool))
    columns = {}
    for field in schema.SHARD_METADATA_FIELDS:
        if field.name not in table.column_names:
            columns[field.name] = pa.nulls(len(table), field.type)
            continue
        column = table[field.name].combine_chunks()
        try:
            columns[field.name] = pc.cast(column, field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            columns[field.name], unreadable = _cast_each(column, field.type)
            invalid = pc.or_(invalid, unreadable)
    return pa.table(columns, schema=pa.schema(schema.SHARD_METADATA_FIELDS)), invalid


def _cast_each(column: pa.Array, type_: pa.DataType) -> tuple[pa.Array, pa.Array]:
    """Value by value, for a column whose cast failed: readable values cast, the others null and flagged."""
    values, unreadable = [], []
    for value in column:
        try:
            values.append(value.cast(type_).as_py() if value.is_valid else None)
            unreadable.append(False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            values.append(None)
            unreadable.append(True)
    return pa.array(values, type_), pa.array(unreadable)


def filter_rows(table: pa.Table, shard: str, config: MetadataFilterConfig) -> pa.Table:
    """One shard's metadata in canonical columns, its name, each row's first failed check, the dedup key."""
    table, invalid = normalise_columns(table)
    table = table.append_column(schema.SHARD, pa.array([shard] * len(table), pa.string()))
    reason = pa.nulls(len(table), pa.string())
    for name, failed in _checks(table, invalid, config):
        reason = pc.if_else(pc.and_(pc.is_null(reason), pc.fill_null(failed, False)), str(name), reason)
    table = table.append_column(schema.DROP_REASON, reason)
    return table.append_column(_DEDUP_KEY, _dedup_key(table))


class MetadataFilter:
    """Ray Data step over shard files: reads each one's parquet and filters its rows."""

    def __init__(self, config: MetadataFilterConfig, shards_url: str, storage: StorageConfig):
        self.config = config
        self.fs, self.folder = filesystem(shards_url, storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # One file at a time: shards written with different column types cannot be read as one data set.
        tables = []
        for shard in batch[schema.SHARD]:
            with self.fs.open(f"{self.folder}/{schema.shard_parquet(shard)}", "rb") as stream:
                tables.append(filter_rows(pq.read_table(stream), str(shard), self.config))
        return pa.concat_tables(tables)


def _dedup_key(batch: pa.Table) -> pa.ChunkedArray:
    """``h:<hash>``, or the unique ``k/<shard>/<key>`` for a sample without a hash."""
    unique = pc.binary_join_element_wise("k", batch[schema.SHARD], batch[schema.KEY], "/")
    return pc.coalesce(pc.binary_join_element_wise("h", pc.cast(batch[schema.HASH], pa.string()), ":"), unique)


def _checks(batch: pa.Table, invalid: pa.Array, c: MetadataFilterConfig) -> Iterator[tuple[DropReason, pa.Array]]:
    yield (
        DropReason.DOWNLOAD_FAILED,
        pc.invert(pc.fill_null(pc.equal(batch[schema.STATUS], schema.STATUS_SUCCESS), False)),
    )
    yield DropReason.METADATA_INVALID, invalid
    missing = pa.array([False] * len(batch))
    for column in c.required_columns():
        missing = pc.or_(missing, pc.is_null(batch[column]))
    yield DropReason.METADATA_MISSING, missing
    if (c.min_side, c.max_side, c.max_aspect_ratio) != (None, None, None):
        width, height = batch[schema.ORIGINAL_WIDTH], batch[schema.ORIGINAL_HEIGHT]
        short, long = pc.min_element_wise(width, height), pc.max_element_wise(width, height)
        if c.min_side is not None:
            yield DropReason.TOO_SMALL, pc.less(short, c.min_side)
        if c.max_side is not None:
            yield DropReason.TOO_LARGE, pc.greater(long, c.max_side)
        if c.max_aspect_ratio is not None:
            ratio = pc.divide(pc.cast(long, pa.float64()), pc.max_element_wise(short, 1))
            yield DropReason.ASPECT_RATIO, pc.greater(ratio, c.max_aspect_ratio)
    caption_chars = pc.utf8_length(pc.utf8_trim_whitespace(batch[schema.CAPTION]))
    yield DropReason.CAPTION_TOO_SHORT, pc.less(caption_chars, c.min_caption_chars)
    if c.max_pwatermark is not None:
        yield DropReason.WATERMARK, pc.greater(batch[schema.PWATERMARK], c.max_pwatermark)
    if c.max_punsafe is not None:
        yield DropReason.UNSAFE, pc.greater(batch[schema.PUNSAFE], c.max_punsafe)
    if c.min_aesthetic is not None:
        yield DropReason.AESTHETIC, pc.less(batch[schema.AESTHETIC], c.min_aesthetic)


class MarkDuplicates:
    """Ray Data step over one group of equal hashes: all kept rows but the first become duplicates."""

    def __call__(self, group: pa.Table) -> pa.Table:
        kept = pc.is_null(group[schema.DROP_REASON]).to_pylist()
        if sum(kept) > 1:
            order = sorted(
                (row[schema.SHARD], row[schema.KEY], i) for i, row in enumerate(group.to_pylist()) if kept[i]
            )
            reasons = group[schema.DROP_REASON].to_pylist()
            for _, _, i in order[1:]:
                reasons[i] = str(DropReason.DUPLICATE)
            group = group.set_column(
                group.column_names.index(schema.DROP_REASON), schema.DROP_REASON, pa.array(reasons, pa.string())
            )
        return group


class WriteFilteredShard:
    """Ray Data step over one input shard's rows: writes ``{shard}.parquet`` and returns its counts."""

    def __init__(self, output_url: str, storage: StorageConfig):
        self.fs, self.folder = filesystem(output_url, storage)

    def __call__(self, rows: pa.Table) -> pa.Table:
        rows = rows.drop_columns([_DEDUP_KEY]).sort_by(schema.KEY)
        (shard,) = pc.unique(rows[schema.SHARD]).to_pylist()
        write_atomically(
            self.fs, f"{self.folder}/{schema.shard_parquet(shard)}", lambda stream: pq.write_table(rows, stream)
        )
        reasons = [r for r in rows[schema.DROP_REASON].to_pylist() if r is not None]
        dropped = {r: reasons.count(r) for r in sorted(set(reasons))}
        return pa.table(
            {
                schema.SHARD: [shard],
                "samples_in": [len(rows)],
                "kept": [len(rows) - len(reasons)],
                "dropped": [json.dumps(dropped)],
            }
        )


def list_shards(shards_url: str, storage: StorageConfig) -> list[str]:
    """The shard names (``00000``, ...) of an img2dataset output folder, sorted."""
    fs, folder = filesystem(shards_url, storage)
    if not fs.isdir(folder):
        raise FileNotFoundError(f"data.shards_url {shards_url!r} is not a folder: point it at img2dataset's output")
    names = [path.rsplit("/", 1)[-1][: -len(".parquet")] for path in fs.glob(f"{folder}/*.parquet")]
    shards = sorted(name for name in names if name.isdigit())
    if not shards:
        raise FileNotFoundError(f"data.shards_url {shards_url!r} holds no img2dataset shard (00000.parquet, ...)")
    return shards


def check_columns(fs, first_shard: str, config: MetadataFilterConfig) -> None:
    """Fails before any work starts when an enabled check needs a column the shards lack."""
    with fs.open(first_shard, "rb") as stream:
        names = canonical_names(pq.read_schema(stream).names)
    thresholds = {
        schema.PWATERMARK: "max_pwatermark",
        schema.PUNSAFE: "max_punsafe",
        schema.AESTHETIC: "min_aesthetic",
        schema.ORIGINAL_WIDTH: "min_side",
        schema.ORIGINAL_HEIGHT: "min_side",
    }
    for column in config.required_columns():
        if column not in names:
            setting = thresholds.get(column)
            hint = f"; set filter.{setting}=none to skip that check" if setting else ""
            raise ValueError(f"shard {first_shard} has no {column!r} column (has: {', '.join(names)}){hint}")


def fingerprint(shards: dict[str, str], config: MetadataFilterConfig) -> dict[str, Any]:
    """What decides the filter's output: the input shards (``fingerprints.folder_fingerprint``) and the checks."""
    return fingerprints.of(input=shards, settings=config.outcome())


def run(
    shards_url: str, output_url: str, config: MetadataFilterConfig, storage: StorageConfig
) -> tuple[Manifest, dict[str, float]]:
    """Runs the phase unless ``output_url`` already holds its result for this input and config.

    Returns the manifest and the run's metrics (empty when the phase was already complete).
    """
    shards = list_shards(shards_url, storage)
    current = fingerprint(fingerprints.folder_fingerprint(shards_url, storage), config)
    previous = read_manifest(output_url, storage)
    if previous is not None and fingerprints.is_complete(previous.config, current):
        return previous, {}
    input_fs, input_folder = filesystem(shards_url, storage)
    check_columns(input_fs, f"{input_folder}/{schema.shard_parquet(shards[0])}", config)
    fs, folder = filesystem(output_url, storage)
    if previous is not None:
        remove_manifest(output_url, storage)  # a stale manifest must not vouch for the new outputs
    fs.makedirs(folder, exist_ok=True)

    started = time.monotonic()
    resources = config.resources
    dataset = ray.data.from_items([{schema.SHARD: shard} for shard in shards], override_num_blocks=len(shards))
    dataset = dataset.map_batches(
        MetadataFilter,
        fn_constructor_kwargs={"config": config, "shards_url": shards_url, "storage": storage},
        batch_size=1,
        **resources.actor_args(),
    )
    if config.drop_duplicates:
        dataset = dataset.groupby(_DEDUP_KEY, num_partitions=len(shards)).map_groups(
            MarkDuplicates, batch_format="pyarrow", **resources.actor_args()
        )
    counts = (
        dataset.groupby(schema.SHARD, num_partitions=len(shards))
        .map_groups(
            WriteFilteredShard,
            fn_constructor_kwargs={"output_url": output_url, "storage": storage},
            batch_format="pyarrow",
            **resources.actor_args(),
        )
        .take_all()
    )
    seconds = time.monotonic() - started

    manifest = Manifest(
        phase=PHASE,
        config=current,
        shards={
            row[schema.SHARD]: ShardCounts(
                samples_in=row["samples_in"], kept=row["kept"], dropped=json.loads(row["dropped"])
            )
            for row in counts
        },
    )
    assert len(manifest.shards) == len(shards), "every input shard must produce one output shard"
    write_manifest(output_url, manifest, storage)
    return manifest, {"seconds": seconds, "samples_per_second": manifest.samples_in / seconds}
