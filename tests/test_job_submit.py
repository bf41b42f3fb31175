"""The way users run it: ``ray job submit --working-dir . -- python pipelines/full.py`` against a Ray
head started with ``ray start``, logging to a real ``mlflow server`` (SQLite backend, local
artifact store behind the server's artifact proxy), all on 127.0.0.1."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from cluster.local_cluster import mlflow_server, ray_auth, ray_node, submit_job


@pytest.fixture
def tracking_server(tmp_path):
    """``mlflow server`` with a SQLite backend and served artifacts; yields its URL."""
    with mlflow_server(tmp_path) as url:
        yield url


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head from ``ray start --head --block`` on loopback, with token authentication (Ray's
    default for local clusters); yields its dashboard (job) address and the environment a client
    needs to reach it."""
    auth = ray_auth()
    with ray_node(tmp_path / "head", auth, num_cpus=2) as head:
        yield head.dashboard, auth


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_into_an_mlflow_server(ray_head, tracking_server, tmp_path):
    address, auth = ray_head
    work = tmp_path / "work"
    submitted = submit_job(
        address,
        auth,
        ["pipelines/full.py", "--phases", "metadata_filter", "--set", f"work_dir={work}"],
        env_vars={"MLFLOW_TRACKING_URI": tracking_server},
        timeout=600,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output and "ran: metadata_filter" in output, output[-4000:]
    assert f"MLflow:  {tracking_server}" in output

    client = MlflowClient(tracking_server)
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
