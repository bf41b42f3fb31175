"""The pipeline on object storage: input read from, and every output written to, a real S3 server."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from mlflow.tracking import MlflowClient

from cluster.local_cluster import SeaweedFS, free_port
from pipelines import decode, demo_data, metadata_filter, schema, shard_phase
from pipelines.config import load_config
from pipelines.ledger import ShardCounts
from pipelines.storage import StorageConfig, StorageUnreachable, exists, filesystem

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-never-logged-4242"


@pytest.mark.slow
def test_full_pipeline_on_s3(s3_server, tmp_path):
    fs = s3fs.S3FileSystem(key="test-key", secret=SECRET, endpoint_url=s3_server, use_listings_cache=False)
    fs.mkdir("wuerstchen")
    storage = StorageConfig(endpoint_url=s3_server, key="test-key", secret=SECRET)
    small = demo_data.DemoDataConfig(num_shards=2, samples_per_shard=20)
    truth = demo_data.generate("s3://wuerstchen/input", small, storage)["samples"]

    store = f"sqlite:///{tmp_path}/mlflow.db"
    # Secrets in the environment, under the names credentials go by, must not leak either.
    planted = {
        "MLFLOW_TRACKING_TOKEN": "planted-token-7731",
        "WUERSTCHEN_TEST_API_KEY": "planted-key-7732",
        "SOME_SERVICE_SECRET": "planted-secret-7733",
    }
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}, **planted}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines/full.py"),
            "--set",
            "data.shards_url=s3://wuerstchen/input/shards",
            "--set",
            "work_dir=s3://wuerstchen/runs/tiny",
            "--set",
            f"tracking.tracking_uri={store}",
            "--set",
            f"storage.endpoint_url={s3_server}",
            "--set",
            "storage.key=test-key",
            "--set",
            f"storage.secret={SECRET}",
            # Random encoders (no Stage A or semantic training): the trained ones are test_full's subject.
            "--set=pre_encode.stage_a_weights=",
            "--set=pre_encode.semantic_weights=",
            *[f"--set=train_{stage}.{key}" for stage in ("b", "c") for key in ("steps=10", "global_batch_size=8")],
            "--set=train_c.checkpoint_every=5",
        ],
        # In tmp_path: MLflow puts a SQLite store's artifacts under ./mlruns.
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    for phase in ("metadata_filter", "decode", "embed", "pre_encode"):
        assert fs.exists(f"wuerstchen/runs/tiny/{phase}/manifest.json"), phase
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"wuerstchen/runs/tiny/{phase}/*.parquet")) == [
            "00000.parquet",
            "00001.parquet",
        ], phase
    keys = []
    for shard in ("00000", "00001"):
        with fs.open(f"wuerstchen/runs/tiny/pre_encode/{shard}.parquet", "rb") as stream:
            keys += pq.read_table(stream, columns=["key"])["key"].to_pylist()
    assert sorted(keys) == sorted(k for k, r in truth.items() if r["expected"] == demo_data.KEEP)
    manifest = json.loads(fs.cat("wuerstchen/runs/tiny/pre_encode/manifest.json"))
    assert manifest["totals"]["kept"] == len(keys)
    # Training checkpoints and results live on S3 too; the images came from them.
    for phase in ("train_stage_b", "train_stage_c"):
        assert fs.exists(f"wuerstchen/runs/tiny/{phase}/final.safetensors"), phase
    assert fs.glob("wuerstchen/runs/tiny/train_stage_c/ray/*/checkpoint_*/state.json")
    assert fs.exists("wuerstchen/runs/tiny/generate/summary.json")

    # The secret went in through the config; it shows nowhere but as ***.
    client = MlflowClient(store)
    (parent,) = [r for r in client.search_runs(["1"]) if r.info.run_name == "full-tiny"]
    assert parent.data.params["storage.secret"] == "***" and parent.data.params["storage.key"] == "***"
    with sqlite3.connect(f"{tmp_path}/mlflow.db") as db:
        dump = "\n".join(db.iterdump())
    artifact_root = tmp_path / Path(
        client.get_experiment(parent.info.experiment_id).artifact_location.removeprefix("file://")
    )
    artifacts = b"".join(path.read_bytes() for path in artifact_root.rglob("*") if path.is_file())
    assert artifacts, f"no artifacts found under {artifact_root}"
    for secret in (SECRET, *planted.values()):
        assert secret not in dump and secret not in result.stderr and secret not in result.stdout, secret
        assert secret.encode() not in artifacts, secret


@pytest.fixture
def guarded_s3(tmp_path, monkeypatch):
    """A SeaweedFS server that accepts only one key pair, in a test that may restart it; no AWS
    settings from the environment or the home folder."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    (tmp_path / "seaweedfs").mkdir()
    server = SeaweedFS(tmp_path / "seaweedfs", credentials=("test-key", SECRET))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_missing_or_wrong_credentials_stop_before_work_naming_the_settings(guarded_s3):
    storage = StorageConfig(endpoint_url=guarded_s3.endpoint, key="test-key", secret=SECRET)
    filesystem("s3://wuerstchen", storage)[0].mkdir("wuerstchen")
    assert exists("s3://wuerstchen", "data.shards_url", storage)
    for wrong, error in (
        (dataclasses.replace(storage, secret="not-the-secret"), "PermissionError"),
        (StorageConfig(endpoint_url=guarded_s3.endpoint), "NoCredentialsError"),
    ):
        with pytest.raises(
            ValueError,
            match=rf"cannot reach data.shards_url 's3://wuerstchen' \(storage.endpoint_url="
            rf"'{guarded_s3.endpoint}'; credentials from storage.key/secret.*{error}",
        ):
            exists("s3://wuerstchen", "data.shards_url", wrong)


@pytest.mark.slow
def test_a_server_restarted_during_writes_loses_nothing(guarded_s3, tmp_path, local_ray):
    storage = StorageConfig(endpoint_url=guarded_s3.endpoint, key="test-key", secret=SECRET)
    fs = filesystem("s3://wuerstchen", storage)[0]
    fs.mkdir("wuerstchen")
    truth = demo_data.generate(
        "s3://wuerstchen/input", demo_data.DemoDataConfig(num_shards=10, samples_per_shard=10), storage
    )["samples"]
    config, shards_url = load_config("tiny"), "s3://wuerstchen/input/shards"
    filtered, _ = metadata_filter.run(shards_url, "s3://wuerstchen/filtered", config.filter, storage)
    # The input's fingerprint, from the bucket's listing, is the same on a second look: the rerun skips.
    assert metadata_filter.run(shards_url, "s3://wuerstchen/filtered", config.filter, storage) == (filtered, {})
    decode_config = dataclasses.replace(
        config.decode, resources=dataclasses.replace(config.decode.resources, max_actors=1)
    )
    phase = decode.phase(
        shards_url=shards_url,
        filtered_url="s3://wuerstchen/filtered",
        output_url="s3://wuerstchen/decode",
        filtered_fingerprint=filtered.config,
        config=decode_config,
        storage=storage,
    )

    # The server dies (SIGKILL) once the first shard is written and comes back 2 s later; the
    # shards still to come are written through the outage by retrying.
    restarted = []

    def restart_after_the_first_shard():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not fs.glob("wuerstchen/decode/*.parquet"):
            time.sleep(0.05)
        guarded_s3.stop()
        restarted.append(time.monotonic())
        time.sleep(2)
        guarded_s3.start()

    restarter = threading.Thread(target=restart_after_the_first_shard, daemon=True)
    restarter.start()
    decoded, metrics = shard_phase.run(phase, sorted(filtered.shards), "s3://wuerstchen/decode", storage)
    finished = time.monotonic()
    restarter.join()
    assert restarted and restarted[0] < finished and metrics["shards_skipped"] == 0
    keys = []
    for shard in sorted(decoded.shards):
        with fs.open(f"wuerstchen/decode/{shard}.parquet", "rb") as stream:
            table = pq.read_table(stream)
        keys += [k for k, r in zip(table[schema.KEY].to_pylist(), table[schema.DROP_REASON].to_pylist()) if r is None]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(k for k, r in truth.items() if r["expected"] == demo_data.KEEP)
    assert not fs.glob("wuerstchen/decode/*.tmp-*")

    # A server that stays down past the retries: a clear failure, and no shard where the commit failed.
    impatient = dataclasses.replace(storage, max_attempts=2)
    out_fs, _ = filesystem("s3://wuerstchen/failed", impatient)
    table_schema = pa.schema([pa.field(schema.KEY, pa.string())])
    with pytest.raises(Exception, match="Could not connect to the endpoint URL"):
        with shard_phase.ShardOutput(out_fs, "wuerstchen/failed/00000.parquet", table_schema) as output:
            output.write([{schema.KEY: "000000001"}])
            guarded_s3.stop()
            output.commit(ShardCounts(samples_in=1, kept=1, dropped={}), {"phase": "test"})
    guarded_s3.start()
    assert shard_phase.read_shard_ledger(fs, "wuerstchen/failed/00000.parquet") is None


def test_a_node_that_cannot_reach_the_storage_fails_the_phase_at_once_naming_the_setting(tmp_path, local_ray):
    """The driver reaches everything it reads (here local folders); the phase's actors cannot reach
    the S3 endpoint the tars are on. Each actor asks before its first shard, with two tries and a
    short connect timeout, so the phase fails with one message naming the setting, not after every
    request's retries."""
    demo_data.generate(
        str(tmp_path / "demo"), demo_data.DemoDataConfig(num_shards=2, samples_per_shard=4, plant_defects=False)
    )
    config = load_config("tiny")
    filtered, _ = metadata_filter.run(
        demo_data.shards_url(str(tmp_path / "demo")), str(tmp_path / "filtered"), config.filter, StorageConfig()
    )
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = StorageConfig(endpoint_url=closed, key="test-key", secret=SECRET)
    phase = decode.phase(
        shards_url="s3://wuerstchen/shards",
        filtered_url=str(tmp_path / "filtered"),
        output_url=str(tmp_path / "decode"),
        filtered_fingerprint=filtered.config,
        config=config.decode,
        storage=unreachable,
    )
    with pytest.raises(StorageUnreachable) as failed:
        shard_phase.run(phase, sorted(filtered.shards), str(tmp_path / "decode"), unreachable)
    assert str(failed.value).startswith(
        f"cannot reach data.shards_url 's3://wuerstchen/shards' (storage.endpoint_url='{closed}'"
    ), str(failed.value)
    assert not list((tmp_path / "decode").glob("*.parquet"))
