"""pipelines/cluster_nodes.py: what the cluster did, per phase, in MLflow and on the console. On the
local Ray of the tests (one node, started by ``ray.init``: no node type); the autoscaler's node
types and their launches and removals are shown by tests/test_autoscaling.py."""

from __future__ import annotations

import pytest
import ray

from pipelines.cluster_nodes import HEAD, NodeRecorder, PhaseNodes
from pipelines.tracking import Tracker, TrackingConfig


@pytest.fixture
def tracker(tmp_path, monkeypatch) -> Tracker:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded SQLite store in the work dir
    return Tracker(TrackingConfig(), str(tmp_path / "work"))


def test_a_local_ray_is_one_head_node_in_every_phase_and_in_the_series(local_ray, tracker: Tracker) -> None:
    with tracker.run("full") as parent, NodeRecorder(parent, poll_seconds=0.1) as nodes:
        for name in ("decode", "embed"):
            with tracker.run(name, parent=parent) as run, nodes.phase(name, run):
                assert ray.get(ray.remote(lambda: 1).remote()) == 1
            assert tracker.client.get_run(run.run_id).data.metrics == {
                "nodes_start/head": 1,
                "nodes_end/head": 1,
                "nodes_peak/head": 1,
                "nodes_launched/head": 0,
                "nodes_removed/head": 0,
            }
    series = tracker.client.get_metric_history(parent.run_id, f"nodes/{HEAD}")
    assert series and {point.value for point in series} == {1}
    assert [p.phase for p in nodes.phases] == ["decode", "embed"]
    assert nodes.summary().splitlines()[1:] == ["  decode  head 1→1", "  embed   head 1→1"]


def test_a_phase_line_shows_launches_removals_and_a_peak_between_its_ends() -> None:
    nodes = PhaseNodes(
        "train_stage_b",
        start={"cpu_worker": 1, "gpu_worker": 0, "head": 1},
        end={"cpu_worker": 0, "gpu_worker": 0, "head": 1},
        peak={"cpu_worker": 1, "gpu_worker": 1, "head": 1},
        launched={"cpu_worker": 0, "gpu_worker": 1, "head": 0},
        removed={"cpu_worker": 1, "gpu_worker": 1, "head": 0},
    )
    assert nodes.line() == "cpu_worker 1→0 -1; gpu_worker 0→0 (peak 1) +1 -1; head 1→1"
    assert nodes.metrics()["nodes_launched/gpu_worker"] == 1 and nodes.metrics()["nodes_removed/cpu_worker"] == 1
