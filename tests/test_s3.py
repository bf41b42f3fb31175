"""The pipeline on object storage: input read from, and every output written to, a real S3 server."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import s3fs
from mlflow.tracking import MlflowClient

from pipelines import demo_data
from pipelines.storage import StorageConfig

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-never-logged-4242"


def test_full_pipeline_on_s3(s3_server, tmp_path):
    fs = s3fs.S3FileSystem(key="test-key", secret=SECRET, endpoint_url=s3_server, use_listings_cache=False)
    fs.mkdir("wuerstchen")
    storage = StorageConfig(endpoint_url=s3_server, key="test-key", secret=SECRET)
    small = demo_data.DemoDataConfig(num_shards=2, samples_per_shard=20)
    truth = demo_data.generate("s3://wuerstchen/input", small, storage)["samples"]

    store = f"sqlite:///{tmp_path}/mlflow.db"
    # Secrets in the environment, under the names credentials go by, must not leak either.
    planted = {"MLFLOW_TRACKING_TOKEN": "planted-token-7731", "WUERSTCHEN_TEST_API_KEY": "planted-key-7732",
               "SOME_SERVICE_SECRET": "planted-secret-7733"}
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}, **planted}
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipelines/full.py"), "--set", "data.shards_url=s3://wuerstchen/input/shards",
         "--set", "work_dir=s3://wuerstchen/runs/tiny", "--set", f"tracking.tracking_uri={store}",
         "--set", f"storage.endpoint_url={s3_server}", "--set", "storage.key=test-key", "--set", f"storage.secret={SECRET}",
         # Random encoders (no Stage A or semantic training): the trained ones are test_full's subject.
         "--set=pre_encode.stage_a_weights=", "--set=pre_encode.semantic_weights=",
         *[f"--set=train_{stage}.{key}" for stage in ("b", "c") for key in ("steps=10", "global_batch_size=8")],
         "--set=train_c.checkpoint_every=5"],
        # In tmp_path: MLflow puts a SQLite store's artifacts under ./mlruns.
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    for phase in ("metadata_filter", "decode", "embed", "pre_encode"):
        assert fs.exists(f"wuerstchen/runs/tiny/{phase}/manifest.json"), phase
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"wuerstchen/runs/tiny/{phase}/*.parquet")) == \
            ["00000.parquet", "00001.parquet"], phase
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
    assert fs.glob("wuerstchen/runs/tiny/train_stage_c/ray/*/checkpoint_*/model.safetensors")
    assert fs.exists("wuerstchen/runs/tiny/generate/summary.json")

    # The secret went in through the config; it shows nowhere but as ***.
    client = MlflowClient(store)
    (parent,) = [r for r in client.search_runs(["1"]) if r.info.run_name == "full-tiny"]
    assert parent.data.params["storage.secret"] == "***" and parent.data.params["storage.key"] == "***"
    with sqlite3.connect(f"{tmp_path}/mlflow.db") as db:
        dump = "\n".join(db.iterdump())
    artifact_root = tmp_path / Path(client.get_experiment(parent.info.experiment_id).artifact_location.removeprefix("file://"))
    artifacts = b"".join(path.read_bytes() for path in artifact_root.rglob("*") if path.is_file())
    assert artifacts, f"no artifacts found under {artifact_root}"
    for secret in (SECRET, *planted.values()):
        assert secret not in dump and secret not in result.stderr and secret not in result.stdout, secret
        assert secret.encode() not in artifacts, secret
