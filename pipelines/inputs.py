"""Where the pipeline's input comes from: an img2dataset output folder, or the generated demo set."""

from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq

from pipelines import demo_data
from pipelines.demo_data import DemoDataConfig
from pipelines.storage import StorageConfig, exists, filesystem

DEMO = "demo"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The input data set."""

    shards_url: str = DEMO
    """img2dataset output folder ({shard:05d}.tar/.parquet) as an fsspec URL, or "demo" for the generated set."""
    demo: DemoDataConfig = dataclasses.field(default_factory=DemoDataConfig)
    """Size and seed of the demo set, generated into the work dir when shards_url is "demo"."""


def prepare_input(config: DataConfig, work_dir: str, storage: StorageConfig) -> str:
    """The shards URL to read, generating the demo set first when it is asked for and absent."""
    if config.shards_url != DEMO:
        _check_shards_url(config, storage)
        return config.shards_url
    root = f"{work_dir}/demo_data"
    wanted = dataclasses.asdict(config.demo)
    if not demo_data.is_complete(root, storage) or demo_data.load_ground_truth(root, storage)["config"] != wanted:
        fs, path = filesystem(root, storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        demo_data.generate(root, config.demo, storage)
    return demo_data.shards_url(root)


def count_input_rows(config: DataConfig, storage: StorageConfig) -> int:
    """Rows the metadata filter will read, without reading them: the demo's size, or the shards'
    Parquet footers (one small read per shard)."""
    if config.shards_url == DEMO:
        return config.demo.num_shards * config.demo.samples_per_shard
    fs, path = _check_shards_url(config, storage)
    total = 0
    for parquet in sorted(fs.glob(f"{path}/*.parquet")):
        with fs.open(parquet, "rb") as stream:
            total += pq.read_metadata(stream).num_rows
    return total


def _check_shards_url(config: DataConfig, storage: StorageConfig):
    """The filesystem and path of a real (non-demo) input; a clear error when it is unset or absent."""
    if not config.shards_url.strip():
        raise ValueError(
            "data.shards_url is empty: set it to your img2dataset output folder "
            "(--set data.shards_url=s3://bucket/laion/shards) or to 'demo' for the generated demo set"
        )
    if not exists(config.shards_url, "data.shards_url", storage):
        raise FileNotFoundError(f"data.shards_url {config.shards_url!r} does not exist")
    return filesystem(config.shards_url, storage)
