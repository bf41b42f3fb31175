"""The autoscaler, shown: the pipeline submitted to a cluster that starts as its head alone (which
takes no work), whose autoscaler (Ray's fake multi-node provider with ``ray_cluster.yaml``'s node
types, ``cluster/local_cluster.py``) launches a CPU node and a GPU-standing node when the phases ask
for them and removes them once they are idle."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient
from test_multinode import assert_complete

from cluster.local_cluster import (
    BUCKET,
    GPU_STAND_IN,
    S3_KEY,
    autoscaling_cluster,
    gpu_stand_in_overrides,
    ray_state,
    submit_job,
)
from cluster.nodes import worker_node_types
from pipelines.phases import PHASES
from pipelines.storage import StorageConfig

IDLE_TIMEOUT_S = 30
STEPS = 10
TRAINING = ("train_a", "train_semantic", "train_b", "train_c")
# The phases that ask for GPUs, here for the stand-in (gpu_stand_in_overrides).
GPU_PHASES = ("embed", "train_stage_a", "train_semantic", "pre_encode", "train_stage_b", "train_stage_c", "generate")
# Small enough for minutes on 2 cores.
FAST = [
    "--set=data.demo.num_shards=2",
    "--set=data.demo.samples_per_shard=40",
    *[
        f"--set={section}.{setting}"
        for section in TRAINING
        for setting in (f"steps={STEPS}", "global_batch_size=8", "checkpoint_every=5", "warmup_steps=2")
    ],
    "--set=generate.prompts=a red circle on a white background,a blue square on a black background",
]


def _pools() -> tuple[str, str]:
    """The CPU node type and the GPU one of ray_cluster.yaml."""
    types = worker_node_types()
    (cpu,) = [name for name, resources in types.items() if not resources.get("GPU")]
    (gpu,) = [name for name, resources in types.items() if resources.get("GPU")]
    return cpu, gpu


@pytest.mark.slow
def test_the_autoscaler_launches_each_pool_when_a_phase_asks_and_removes_it_when_idle(tmp_path):
    cpu, gpu = _pools()
    with autoscaling_cluster(tmp_path, idle_timeout_s=IDLE_TIMEOUT_S, worker_cpus=2) as cluster:
        # At submission the head is alone: no node of either pool.
        nodes = ray_state(cluster.dashboard, cluster.auth, "nodes")
        assert [node["is_head_node"] for node in nodes] == [True], nodes

        storage = StorageConfig(endpoint_url=cluster.s3_endpoint, key=S3_KEY, secret=cluster.s3_secret)
        work = f"s3://{BUCKET}/run"
        submitted = submit_job(
            cluster.dashboard,
            cluster.auth,
            [
                "pipelines/full.py",
                f"--set=work_dir={work}",
                *cluster.storage_overrides(),
                *FAST,
                *gpu_stand_in_overrides(),
            ],
            env_vars={"MLFLOW_TRACKING_URI": cluster.mlflow_uri},
            timeout=1800,
        )
        output = submitted.stdout + submitted.stderr
        (tmp_path / "job.log").write_text(output)  # beside the cluster's logs
        assert submitted.returncode == 0, output[-6000:]
        assert "succeeded" in output and f"ran: {', '.join(PHASES)}" in output, output[-6000:]
        parent, phases = assert_complete(cluster.mlflow_uri, work, storage, steps=STEPS)

        # What the pipeline recorded from the autoscaler's view: each pool came up in the first
        # phase that asked for it, none before; every phase that asked for the stand-in had a
        # GPU-standing node, and the phases before the first of them had none.
        def nodes_of(phase: str, what: str, node_type: str) -> float:
            return phases[phase].data.metrics.get(f"nodes_{what}/{node_type}", 0)

        first_gpu_phase = next(phase for phase in PHASES if phase in GPU_PHASES)
        assert nodes_of("metadata_filter", "start", cpu) == 0 and nodes_of("metadata_filter", "launched", cpu) >= 1
        assert nodes_of(first_gpu_phase, "start", gpu) == 0 and nodes_of(first_gpu_phase, "launched", gpu) >= 1
        for phase in list(PHASES)[: list(PHASES).index(first_gpu_phase)]:
            assert nodes_of(phase, "peak", gpu) == 0, phase
        for phase in GPU_PHASES:
            assert nodes_of(phase, "peak", gpu) >= 1, phase
        assert "nodes per type in each phase" in output and f"{gpu} 0→" in output, output[-3000:]
        series = {
            point.value
            for point in MlflowClient(cluster.mlflow_uri).get_metric_history(parent.info.run_id, f"nodes/{gpu}")
        }
        assert series >= {0, 1}, series

        # Idle, both pools go: the autoscaler removes every worker node, which the GCS's node table
        # keeps as dead, each of its type (by the resources it offered).
        deadline = time.monotonic() + IDLE_TIMEOUT_S + 300
        while len(ray_state(cluster.dashboard, cluster.auth, "nodes", "state=ALIVE")) > 1:
            assert time.monotonic() < deadline, ray_state(cluster.dashboard, cluster.auth, "nodes")
            time.sleep(5)
        nodes = ray_state(cluster.dashboard, cluster.auth, "nodes")
        workers = [node for node in nodes if not node["is_head_node"]]
        assert all(node["state"] == "DEAD" for node in workers), workers
        launched = {pool: sum(nodes_of(phase, "launched", pool) for phase in PHASES) for pool in (cpu, gpu)}
        by_pool = {
            pool: [n for n in workers if (GPU_STAND_IN in n["resources_total"]) == (pool == gpu)] for pool in (cpu, gpu)
        }
        assert {pool: len(found) for pool, found in by_pool.items()} == launched, (launched, workers)
        assert all("idle" in node["state_message"].lower() for node in workers), workers
