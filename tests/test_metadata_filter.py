"""The metadata filter: each check on its own, then the Ray Data phase against the demo ground truth."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import metadata_filter, schema
from pipelines.config import load_config
from pipelines.ledger import read_manifest
from pipelines.metadata_filter import MarkDuplicates, MetadataFilterConfig
from pipelines.schema import DropReason
from pipelines.storage import StorageConfig

CONFIG = MetadataFilterConfig(
    min_side=64,
    max_side=1000,
    max_aspect_ratio=3.0,
    min_caption_chars=1,
    max_pwatermark=0.5,
    max_punsafe=0.99,
    min_aesthetic=5.0,
)
GOOD = {
    "key": "000000001",
    "status": "success",
    "caption": "a red circle",
    "WIDTH": 100,
    "HEIGHT": 80,
    "pwatermark": 0.1,
    "punsafe": 0.1,
    "AESTHETIC_SCORE": 6.0,
    "hash": 1,
}


def _reasons(rows: list[dict], config: MetadataFilterConfig = CONFIG) -> list[str | None]:
    out = metadata_filter.filter_rows(pa.Table.from_pylist([{**GOOD, **row} for row in rows]), "00007", config)
    return out[schema.DROP_REASON].to_pylist()


@pytest.mark.parametrize(
    "change, reason",
    [
        ({}, None),
        ({"status": "failed_to_download"}, DropReason.DOWNLOAD_FAILED),
        ({"status": None}, DropReason.DOWNLOAD_FAILED),
        ({"pwatermark": None}, DropReason.METADATA_MISSING),
        ({"WIDTH": None}, DropReason.METADATA_MISSING),
        ({"caption": None}, DropReason.METADATA_MISSING),
        # A value of the wrong type: read when it converts, dropped when it does not.
        ({"WIDTH": "100", "AESTHETIC_SCORE": "6.0", "caption": 42}, None),
        ({"WIDTH": "wide"}, DropReason.METADATA_INVALID),
        ({"WIDTH": 100.5}, DropReason.METADATA_INVALID),
        ({"caption": b"a red \xff circle"}, DropReason.METADATA_INVALID),
        ({"exif": {"Orientation": 6}}, DropReason.METADATA_INVALID),
        ({"WIDTH": 63}, DropReason.TOO_SMALL),
        ({"HEIGHT": 1001, "WIDTH": 900}, DropReason.TOO_LARGE),
        ({"WIDTH": 301, "HEIGHT": 100}, DropReason.ASPECT_RATIO),
        ({"WIDTH": 300, "HEIGHT": 100}, None),
        ({"caption": "   "}, DropReason.CAPTION_TOO_SHORT),
        ({"pwatermark": 0.51}, DropReason.WATERMARK),
        ({"punsafe": 0.995}, DropReason.UNSAFE),
        ({"AESTHETIC_SCORE": 4.99}, DropReason.AESTHETIC),
        ({"AESTHETIC_SCORE": 5.0}, None),
    ],
)
def test_each_check(change, reason):
    assert _reasons([change]) == [reason]


def test_first_failed_check_wins():
    assert _reasons([{"WIDTH": 10, "pwatermark": 0.9, "caption": ""}]) == [DropReason.TOO_SMALL]


def test_disabled_thresholds_are_not_checked():
    loose = dataclasses.replace(
        CONFIG,
        min_side=None,
        max_side=None,
        max_aspect_ratio=None,
        max_pwatermark=None,
        max_punsafe=None,
        min_aesthetic=None,
    )
    rows = [{"WIDTH": 1, "HEIGHT": 5000, "pwatermark": None, "punsafe": 1.0, "AESTHETIC_SCORE": 0.0}]
    assert _reasons(rows, loose) == [None]


def test_columns_are_canonical_whatever_the_source_has():
    out = metadata_filter.filter_rows(pa.Table.from_pylist([{**GOOD, "extra": [1, 2]}]), "00007", CONFIG)
    assert out.schema.field(schema.ORIGINAL_WIDTH).type == pa.int64() and out[schema.AESTHETIC].to_pylist() == [6.0]
    assert "AESTHETIC_SCORE" not in out.column_names and "extra" not in out.column_names
    assert out[schema.EXIF].to_pylist() == [None]  # absent in the source: null, so every shard has one schema
    assert out[schema.SHARD].to_pylist() == ["00007"]


def test_duplicates_keep_the_first_kept_sample():
    group = pa.Table.from_pylist(
        [
            {schema.SHARD: "00001", schema.KEY: "000010000", schema.DROP_REASON: None},
            {schema.SHARD: "00000", schema.KEY: "000000005", schema.DROP_REASON: "watermark"},
            {schema.SHARD: "00000", schema.KEY: "000000009", schema.DROP_REASON: None},
            {schema.SHARD: "00002", schema.KEY: "000020000", schema.DROP_REASON: None},
        ]
    )
    assert MarkDuplicates()(group)[schema.DROP_REASON].to_pylist() == ["duplicate", "watermark", None, "duplicate"]


def test_a_check_without_its_column_fails_before_work(demo_set, tmp_path):
    root, _ = demo_set
    table = pq.read_table(f"{root}/shards/00000.parquet").drop_columns(["pwatermark"])
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "00000.parquet")
    with pytest.raises(ValueError, match="no 'pwatermark' column.*filter.max_pwatermark=none"):
        metadata_filter.run(str(tmp_path / "shards"), str(tmp_path / "out"), CONFIG, StorageConfig())


def test_missing_input_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.shards_url"):
        metadata_filter.run(str(tmp_path / "nowhere"), str(tmp_path / "out"), CONFIG, StorageConfig())


def test_phase_drops_exactly_the_planted_metadata_defects(demo_set, tmp_path, local_ray):
    root, truth = demo_set
    config = load_config("tiny").filter
    output = str(tmp_path / "metadata_filter")
    manifest, metrics = metadata_filter.run(f"{root}/shards", output, config, StorageConfig())
    assert metrics["samples_per_second"] > 0

    rows = [r for shard in sorted(manifest.shards) for r in pq.read_table(f"{output}/{shard}.parquet").to_pylist()]
    assert len(rows) == len(truth["samples"])
    expected = {key: (r["expected"] if r["phase"] == "metadata" else None) for key, r in truth["samples"].items()}
    assert {r[schema.KEY]: r[schema.DROP_REASON] for r in rows} == expected
    assert manifest.samples_in == len(truth["samples"])
    assert manifest.kept == sum(v is None for v in expected.values())
    assert manifest.dropped() == {reason: 1 for reason in expected.values() if reason is not None}
    for shard, counts in manifest.shards.items():
        in_shard = [k for k, r in truth["samples"].items() if r["shard"] == shard]
        assert counts.samples_in == len(in_shard)

    # The same input and config again: the manifest proves the phase complete, no work is done.
    again, metrics = metadata_filter.run(f"{root}/shards", output, config, StorageConfig())
    assert metrics == {} and again.to_json() == manifest.to_json()

    # A changed threshold reruns the phase and replaces the result.
    stricter = dataclasses.replace(config, min_aesthetic=6.5)
    rerun, metrics = metadata_filter.run(f"{root}/shards", output, stricter, StorageConfig())
    assert metrics and rerun.dropped()[DropReason.AESTHETIC] > 1
    assert read_manifest(output).config["min_aesthetic"] == 6.5
