"""The way users run it: ``ray job submit --working-dir . -- python pipelines/full.py`` against a Ray
head started with ``ray start``, logging to a real ``mlflow server`` (SQLite backend, local
artifact store behind the server's artifact proxy), all on 127.0.0.1."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _stop(process: subprocess.Popen, what: str) -> None:
    """Stops a process we started, by its PID, and every process it left behind."""
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()
    assert process.returncode is not None, f"{what} did not stop"


def _wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (Ray's dashboard asks for its auth token): it is up
        except OSError:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` with a SQLite backend and served artifacts; yields its URL."""
    port = _free_port()
    log = tmp_path / "mlflow-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow-server.db",
             "--artifacts-destination", str(tmp_path / "mlflow-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{url}/health", server, log, seconds=90)
        yield url
    finally:
        _stop(server, "mlflow server")


@pytest.fixture
def ray_head():
    """A Ray head from ``ray start --head --block`` on loopback, with token authentication (Ray's
    default for local clusters); yields its dashboard (job) address and the environment a client
    needs to reach it."""
    # A short temp dir: Ray's unix sockets live under it and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    ports = {name: _free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "node-manager-port", "object-manager-port", "metrics-export-port",
                                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port")}
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={temp_dir}",
             *[f"--{name}={port}" for name, port in ports.items()]],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0"})
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for(f"{address}/api/version", head, log, seconds=120)
        yield address, auth
    finally:
        _stop(head, "ray start --head")
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline_into_an_mlflow_server(ray_head, mlflow_server, tmp_path):
    address, auth = ray_head
    work = tmp_path / "work"
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env-json", f'{{"env_vars": {{"MLFLOW_TRACKING_URI": "{mlflow_server}"}}}}', "--",
         sys.executable, "pipelines/full.py", "--phases", "metadata_filter,decode", "--set", f"work_dir={work}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **auth})
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output and "ran: metadata_filter, decode" in output, output[-4000:]
    assert f"MLflow:  {mlflow_server}" in output

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("wuerstchen-ray")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"full-tiny", "metadata_filter", "decode"}
    parent = runs["full-tiny"].info.run_id
    for name in ("metadata_filter", "decode"):
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert 0 < run.data.metrics["kept"] <= run.data.metrics["samples_in"]
    # The image grid went through the server's artifact proxy into its artifact store.
    assert "kept_samples.png" in {a.path for a in client.list_artifacts(runs["decode"].info.run_id)}
    assert list((tmp_path / "mlflow-artifacts").rglob("kept_samples.png"))
    assert not (work / "mlflow.db").exists(), "with a tracking server the job must not fall back to SQLite"
