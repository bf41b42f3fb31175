"""Where the pipeline's input comes from: the demo set, generated into the work dir once and again
when its settings change, or an img2dataset folder, whose rows are counted from Parquet footers."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.demo_data import DemoDataConfig
from pipelines.inputs import DEMO, DataConfig, count_input_rows, prepare_input
from pipelines.storage import StorageConfig

STORAGE = StorageConfig()
SMALL = DemoDataConfig(num_shards=2, samples_per_shard=20)


def test_the_demo_is_generated_once_and_again_when_its_settings_change(tmp_path):
    url = prepare_input(DataConfig(shards_url=DEMO, demo=SMALL), str(tmp_path), STORAGE)
    parquets = sorted(Path(url).glob("*.parquet"))
    written = {path: path.stat().st_mtime_ns for path in parquets}
    assert prepare_input(DataConfig(shards_url=DEMO, demo=SMALL), str(tmp_path), STORAGE) == url
    assert {path: path.stat().st_mtime_ns for path in parquets} == written, "a second run regenerated the demo"

    bigger = DemoDataConfig(num_shards=3, samples_per_shard=20)
    prepare_input(DataConfig(shards_url=DEMO, demo=bigger), str(tmp_path), STORAGE)
    assert len(sorted(Path(url).glob("*.parquet"))) == 3


def test_rows_are_counted_as_the_metadata_filter_will_read_them(tmp_path):
    url = prepare_input(DataConfig(shards_url=DEMO, demo=SMALL), str(tmp_path), STORAGE)
    rows = sum(pq.read_table(path).num_rows for path in sorted(Path(url).glob("*.parquet")))
    # From the footers of an img2dataset folder, and from the demo's settings before it exists.
    assert count_input_rows(DataConfig(shards_url=url), STORAGE) == rows
    assert count_input_rows(DataConfig(shards_url=DEMO, demo=SMALL), STORAGE) == rows


@pytest.mark.parametrize(
    "url, error, message",
    [
        ("", ValueError, "data.shards_url is empty"),
        ("/no/such/folder", FileNotFoundError, "'/no/such/folder' does not"),
    ],
)
def test_an_input_that_is_not_there_names_the_setting(url, error, message):
    with pytest.raises(error, match=message):
        count_input_rows(DataConfig(shards_url=url), STORAGE)
