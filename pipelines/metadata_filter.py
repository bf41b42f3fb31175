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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from cluster.resources import StepResources
from pipelines import schema
from pipelines.ledger import Manifest, ShardCounts, read_manifest, remove_manifest, write_manifest
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig, filesystem, write_atomically

PHASE = "metadata_filter"
METADATA_REASONS = (
    DropReason.DOWNLOAD_FAILED,
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
# The types every later step can rely on, whatever integer or float widths a source used.
_COLUMN_TYPES = {
    **{field.name: field.type for field in schema.SAMPLE_METADATA_FIELDS},
    schema.CAPTION: pa.string(),
    schema.STATUS: pa.string(),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetadataFilterConfig:
    """Thresholds of the metadata filter; a threshold set to none is not checked."""

    min_side: int | None = 512
    """Both original sides must be at least this many pixels (DESIGN.md: 512 in the public code)."""
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
        for threshold, column in ((self.max_pwatermark, schema.PWATERMARK), (self.max_punsafe, schema.PUNSAFE),
                                  (self.min_aesthetic, schema.AESTHETIC)):
            if threshold is not None:
                columns.append(column)
        return columns


def normalise_columns(table: pa.Table) -> pa.Table:
    """Canonical column names and types (see ``schema.COLUMN_ALIASES``)."""
    names = [
        schema.COLUMN_ALIASES[name]
        if name in schema.COLUMN_ALIASES and schema.COLUMN_ALIASES[name] not in table.column_names
        else name
        for name in table.column_names
    ]
    table = table.rename_columns(names)
    for name, type_ in _COLUMN_TYPES.items():
        if name in table.column_names and table.schema.field(name).type != type_:
            table = table.set_column(table.column_names.index(name), name, pc.cast(table[name], type_))
    return table


class MetadataFilter:
    """Ray Data step: canonical columns, the shard name, and each row's first failed check."""

    def __init__(self, config: MetadataFilterConfig):
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = normalise_columns(batch)
        shard = pc.replace_substring_regex(batch["path"], r"^.*/|\.parquet$", "")
        batch = batch.drop_columns(["path"]).append_column(schema.SHARD, shard)
        reason = pa.nulls(len(batch), pa.string())
        for name, failed in self._checks(batch):
            reason = pc.if_else(pc.and_(pc.is_null(reason), pc.fill_null(failed, False)), str(name), reason)
        batch = batch.append_column(schema.DROP_REASON, reason)
        return batch.append_column(_DEDUP_KEY, self._dedup_key(batch))

    @staticmethod
    def _dedup_key(batch: pa.Table) -> pa.ChunkedArray:
        """``h:<hash>``, or the unique ``k/<shard>/<key>`` for a sample without a hash."""
        unique = pc.binary_join_element_wise("k", batch[schema.SHARD], batch[schema.KEY], "/")
        if schema.HASH not in batch.column_names:
            return unique
        return pc.coalesce(pc.binary_join_element_wise("h", pc.cast(batch[schema.HASH], pa.string()), ":"), unique)

    def _checks(self, batch: pa.Table) -> Iterator[tuple[DropReason, pa.ChunkedArray]]:
        c = self.config
        yield DropReason.DOWNLOAD_FAILED, pc.invert(pc.fill_null(pc.equal(batch[schema.STATUS], schema.STATUS_SUCCESS), False))
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
            order = sorted((row[schema.SHARD], row[schema.KEY], i) for i, row in enumerate(group.to_pylist()) if kept[i])
            reasons = group[schema.DROP_REASON].to_pylist()
            for _, _, i in order[1:]:
                reasons[i] = str(DropReason.DUPLICATE)
            group = group.set_column(group.column_names.index(schema.DROP_REASON), schema.DROP_REASON,
                                     pa.array(reasons, pa.string()))
        return group


class WriteFilteredShard:
    """Ray Data step over one input shard's rows: writes ``{shard}.parquet`` and returns its counts."""

    def __init__(self, output_url: str, storage: StorageConfig):
        self.fs, self.folder = filesystem(output_url, storage)

    def __call__(self, rows: pa.Table) -> pa.Table:
        rows = rows.drop_columns([_DEDUP_KEY]).sort_by(schema.KEY)
        (shard,) = pc.unique(rows[schema.SHARD]).to_pylist()
        write_atomically(self.fs, f"{self.folder}/{schema.shard_parquet(shard)}",
                         lambda stream: pq.write_table(rows, stream))
        reasons = [r for r in rows[schema.DROP_REASON].to_pylist() if r is not None]
        dropped = {r: reasons.count(r) for r in sorted(set(reasons))}
        return pa.table({
            schema.SHARD: [shard],
            "samples_in": [len(rows)],
            "kept": [len(rows) - len(reasons)],
            "dropped": [json.dumps(dropped)],
        })


def list_shards(shards_url: str, storage: StorageConfig) -> list[str]:
    """The shard names (``00000``, ...) of an img2dataset output folder, sorted."""
    fs, folder = filesystem(shards_url, storage)
    if not fs.isdir(folder):
        raise FileNotFoundError(f"data.shards_url {shards_url!r} is not a folder: point it at img2dataset's output")
    names = [path.rsplit("/", 1)[-1][:-len(".parquet")] for path in fs.glob(f"{folder}/*.parquet")]
    shards = sorted(name for name in names if name.isdigit())
    if not shards:
        raise FileNotFoundError(f"data.shards_url {shards_url!r} holds no img2dataset shard (00000.parquet, ...)")
    return shards


def check_columns(fs, first_shard: str, config: MetadataFilterConfig) -> None:
    """Fails before any work starts when an enabled check needs a column the shards lack."""
    with fs.open(first_shard, "rb") as stream:
        names = normalise_columns(pq.read_schema(stream).empty_table()).column_names
    thresholds = {schema.PWATERMARK: "max_pwatermark", schema.PUNSAFE: "max_punsafe", schema.AESTHETIC: "min_aesthetic",
                  schema.ORIGINAL_WIDTH: "min_side", schema.ORIGINAL_HEIGHT: "min_side"}
    for column in config.required_columns():
        if column not in names:
            setting = thresholds.get(column)
            hint = f"; set filter.{setting}=none to skip that check" if setting else ""
            raise ValueError(f"shard {first_shard} has no {column!r} column (has: {', '.join(names)}){hint}")


def run(shards_url: str, output_url: str, config: MetadataFilterConfig,
        storage: StorageConfig) -> tuple[Manifest, dict[str, float]]:
    """Runs the phase unless ``output_url`` already holds its result for this input and config.

    Returns the manifest and the run's metrics (empty when the phase was already complete).
    """
    recorded = {"shards_url": shards_url, **config.outcome()}
    previous = read_manifest(output_url, storage)
    if previous is not None and previous.config == recorded:
        return previous, {}
    input_fs, input_folder = filesystem(shards_url, storage)
    shard_files = [f"{input_folder}/{schema.shard_parquet(shard)}" for shard in list_shards(shards_url, storage)]
    check_columns(input_fs, shard_files[0], config)
    fs, folder = filesystem(output_url, storage)
    if previous is not None:
        remove_manifest(output_url, storage)  # a stale manifest must not vouch for the new outputs
    fs.makedirs(folder, exist_ok=True)

    started = time.monotonic()
    resources = config.resources
    dataset = ray.data.read_parquet(shard_files, filesystem=input_fs, include_paths=True, num_cpus=resources.num_cpus)
    dataset = dataset.map_batches(MetadataFilter, fn_constructor_kwargs={"config": config}, batch_format="pyarrow",
                                  **resources.map_batches_args())
    if config.drop_duplicates:
        dataset = dataset.groupby(_DEDUP_KEY, num_partitions=len(shard_files)).map_groups(
            MarkDuplicates, batch_format="pyarrow", **resources.actor_args())
    counts = dataset.groupby(schema.SHARD, num_partitions=len(shard_files)).map_groups(
        WriteFilteredShard, fn_constructor_kwargs={"output_url": output_url, "storage": storage}, batch_format="pyarrow",
        **resources.actor_args()).take_all()
    seconds = time.monotonic() - started

    manifest = Manifest(
        phase=PHASE,
        config=recorded,
        shards={row[schema.SHARD]: ShardCounts(samples_in=row["samples_in"], kept=row["kept"],
                                               dropped=json.loads(row["dropped"])) for row in counts},
    )
    assert len(manifest.shards) == len(shard_files), "every input shard must produce one output shard"
    write_manifest(output_url, manifest, storage)
    return manifest, {"seconds": seconds, "samples_per_second": manifest.samples_in / seconds}
