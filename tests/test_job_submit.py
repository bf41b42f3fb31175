"""The way users run it: ``ray job submit --working-dir . -- python pipelines/full.py`` against a Ray
head started with ``ray start``, logging to a real ``mlflow server`` (SQLite backend, local
artifact store behind the server's artifact proxy), all on 127.0.0.1."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, stop_session
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            pass
    except urllib.error.HTTPError:
        return True  # it answers (Ray's dashboard asks for its auth token): it is up
    except OSError:
        return False
    return True


def _wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float,
              ready_line: str = "", session_logs: Path | None = None) -> None:
    """Waits for a server we started to answer at ``url`` and to print ``ready_line``; a failure shows
    its log and, for Ray, the error lines of its session logs (``ray start`` itself only says that
    the node timed out)."""
    def report() -> str:
        text = log.read_text()[-3000:]
        if session_logs is not None and session_logs.is_dir():
            errors = [f"{file.name}: {line}" for file in sorted(session_logs.iterdir()) if file.is_file()
                      for line in file.read_text(errors="replace").splitlines() if "rror" in line]
            text += "\nerror lines of Ray's session logs:\n" + "\n".join(errors[-30:])
        return text

    deadline = time.monotonic() + seconds
    while not (_answers(url) and ready_line in log.read_text()):
        assert process.poll() is None, f"{process.args[:3]} exited with code {process.returncode}:\n{report()}"
        assert time.monotonic() < deadline, f"{url} did not answer in {seconds:.0f} s:\n{report()}"
        time.sleep(0.5)


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` with a SQLite backend and served artifacts; yields its URL."""
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow-server.db",
             "--artifacts-destination", str(tmp_path / "mlflow-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # No job-runner processes: the pipeline logs runs and artifacts, it runs no MLflow jobs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{url}/health", server, log, seconds=90)
        yield url
    finally:
        stopped = stop_session(server.pid)
        server.wait()
        assert stopped, "mlflow server's processes outlived SIGKILL"


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
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
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
            # Unbuffered: the fixture waits for a line it prints.
            env={**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        # The dashboard answers before the node is up; ray start prints its line once it is.
        _wait_for(f"{address}/api/version", head, log, seconds=120, ready_line="Ray runtime started.",
                  session_logs=Path(temp_dir) / "session_latest" / "logs")
        yield address, auth
    finally:
        # Ten seconds of grace: the test's outputs are read already, and a graceful Ray shutdown
        # can take half a minute.
        stopped = stop_session(head.pid, grace=10)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert stopped, "the Ray head's processes outlived SIGKILL"


def test_ray_job_submit_runs_the_pipeline_into_an_mlflow_server(ray_head, mlflow_server, tmp_path):
    address, auth = ray_head
    work = tmp_path / "work"
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env-json", f'{{"env_vars": {{"MLFLOW_TRACKING_URI": "{mlflow_server}"}}}}', "--",
         sys.executable, "pipelines/full.py", "--phases", "metadata_filter", "--set", f"work_dir={work}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **auth})
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output and "ran: metadata_filter" in output, output[-4000:]
    assert f"MLflow:  {mlflow_server}" in output

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("wuerstchen-ray")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"full-tiny", "metadata_filter"}
    phase = runs["metadata_filter"]
    assert phase.info.status == runs["full-tiny"].info.status == "FINISHED"
    assert phase.data.tags["mlflow.parentRunId"] == runs["full-tiny"].info.run_id
    assert 0 < phase.data.metrics["kept"] < phase.data.metrics["samples_in"]
    # The phase's manifest went through the server's artifact proxy into its artifact store.
    assert "manifest.json" in {a.path for a in client.list_artifacts(phase.info.run_id)}
    assert list((tmp_path / "mlflow-artifacts").rglob("manifest.json"))
    assert not (work / "mlflow.db").exists(), "with a tracking server the job must not fall back to SQLite"
