"""The pipeline across nodes that share nothing but Ray, S3 and an MLflow server
(``cluster/local_cluster.py``: a head that takes no work and two worker nodes, each with its own
/tmp and ~/.cache and no checkout), the rule that keeps it so (what the driver hands a training
worker or a task names a URL, never a file the driver made on its own node), and a phase that
loses a node."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from safetensors.torch import save

from cluster.local_cluster import BUCKET, S3_KEY, RayNode, local_cluster, ray_state, submit_job
from pipelines import decode, demo_data, generate_phase, pre_encode, schema, train_phase, trained_weights
from pipelines.config import load_config
from pipelines.decode import DECODE_REASONS
from pipelines.ledger import read_manifest
from pipelines.metadata_filter import METADATA_REASONS
from pipelines.phases import PHASES, PhaseContext
from pipelines.storage import StorageConfig, filesystem
from pipelines.train import WorkerArgs
from pipelines.trainable import REGISTRY, training_phases
from pipelines.training.data import TrainingRows
from stages.stage_c import STAGE_C_CONFIGS, StageC

# Ray Data's actor that runs decode's shards, as its process title names it.
DECODE_ACTOR = f"MapWorker(MapBatches({decode.DecodeShard.__name__}))"
TRAINING = ("train_a", "train_semantic", "train_b", "train_c")
STEPS = 20
WORKER_NODE_CPUS = 3
# Small enough for minutes on 2 cores. 2 of a worker node's 3 CPUs per training worker: the two
# workers of every training run cannot share a node, and each node keeps a CPU for Ray Data's tasks
# that feed them.
FAST = [
    "--set=data.demo.num_shards=2",
    "--set=data.demo.samples_per_shard=40",
    *[
        f"--set={section}.{setting}"
        for section in TRAINING
        for setting in (
            f"steps={STEPS}",
            "global_batch_size=8",
            "checkpoint_every=10",
            "warmup_steps=5",
            "cpus_per_worker=2",
        )
    ],
    "--set=generate.prompts=a red circle on a white background,a blue square on a black background",
]


def _local_paths(value) -> list[str]:
    """Every string in ``value`` (dataclasses, dicts, sequences) that is a path of this machine: with
    every location set to a URL, one the driver made (a download, a temporary file)."""
    if isinstance(value, str):
        return [value] if value.startswith(("/", "~", "file:")) else []
    if dataclasses.is_dataclass(value):
        value = [getattr(value, field.name) for field in dataclasses.fields(value)]
    elif isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    elif not isinstance(value, (list, tuple)):
        return []
    return [path for item in value for path in _local_paths(item)]


def test_training_workers_and_render_tasks_get_urls_not_the_drivers_local_copies(s3_server, local_ray):
    storage = StorageConfig(endpoint_url=s3_server, key="test-key", secret="test-secret")
    work = f"s3://{BUCKET}/worker-args"
    fs, _ = filesystem(work, storage)
    fs.mkdir(BUCKET)
    config = load_config(
        "tiny",
        [
            f"work_dir={work}",
            f"train_c.init_weights={work}/init.safetensors",
            "train_a.stage_a_losses.perceptual_weight=1",
            f"train_a.stage_a_losses.perceptual_weights={work}/vgg16.pth",
        ],
    )
    config = dataclasses.replace(config, storage=storage)
    context = PhaseContext(config=config, work_dir=work, shards_url=f"{work}/shards", tracker=None)
    for url in (
        f"{work}/init.safetensors",
        f"{work}/vgg16.pth",
        train_phase.weights_url(context, "stage_a"),
        train_phase.weights_url(context, "stage_b"),
        train_phase.weights_url(context, "stage_c"),
    ):
        fs.pipe(filesystem(url, storage)[1], b"weights")
    text = torch.zeros(1, 77, 32)
    fs.pipe(
        filesystem(f"{work}/{pre_encode.PHASE}/{pre_encode.EMPTY_CAPTION_FILE}", storage)[1],
        save({schema.TEXT_STAGE_C: text, schema.TEXT_STAGE_B: text.clone()}),
    )
    with fs.open(filesystem(f"{work}/sample.parquet", storage)[1], "wb") as stream:
        pq.write_table(pa.table({schema.CAPTION: ["a red circle"] * 8, schema.IMAGE: [b"an image"] * 8}), stream)
    sample = TrainingRows(
        files=(f"{work}/sample.parquet",), columns=(schema.IMAGE,), storage=storage, group_rows=((8,),)
    )

    for stage in (REGISTRY["stage_a"], REGISTRY["stage_b"], REGISTRY["stage_c"]):
        section = getattr(config, stage.config_section)
        spec = train_phase._task_spec(context, stage, section, sample)
        args = WorkerArgs(
            train=section,
            stage=stage,
            task=spec,
            budget=None,
            used_before=0.0,
            tracking_uri="http://mlflow",
            run_id="run",
            data={"train": sample},
        )
        assert not _local_paths(args), f"{stage}: the driver hands its workers paths of its own node"
    assert train_phase._task_spec(context, REGISTRY["stage_c"], config.train_c, sample).partner_weights == {
        "stage_b": f"{work}/train_stage_b/final.safetensors",
        "stage_a": f"{work}/train_stage_a/final.safetensors",
    }

    weights = {stage: train_phase.weights_url(context, stage) for stage in ("stage_c", "stage_b", "stage_a")}
    requests = generate_phase.render_args(config.generate, "tiny", weights, storage)
    assert set(requests) == {"prompted", "empty"}
    assert not _local_paths(requests), "the driver hands its render tasks paths of its own node"


@pytest.mark.slow
def test_the_pipeline_runs_across_nodes_that_share_only_ray_s3_and_mlflow(tmp_path):
    with local_cluster(tmp_path, worker_nodes=2, worker_cpus=WORKER_NODE_CPUS) as cluster:
        storage = StorageConfig(endpoint_url=cluster.s3_endpoint, key=S3_KEY, secret=cluster.s3_secret)
        work = f"s3://{BUCKET}/run"
        fs, _ = filesystem(work, storage)
        # Stage C fine-tunes from weights on S3: every worker reads them itself.
        init = f"{work}/init/stage_c.safetensors"
        torch.manual_seed(1)
        fs.pipe(filesystem(init, storage)[1], save(StageC(STAGE_C_CONFIGS["tiny"]()).state_dict()))
        submitted = submit_job(
            cluster.dashboard,
            cluster.auth,
            [
                "pipelines/full.py",
                f"--set=work_dir={work}",
                *cluster.storage_overrides(),
                *FAST,
                f"--set=train_c.init_weights={init}",
            ],
            env_vars={"MLFLOW_TRACKING_URI": cluster.mlflow_uri},
            timeout=1800,
        )
        output = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, output[-6000:]
        assert "succeeded" in output and f"ran: {', '.join(PHASES)}" in output, output[-6000:]

        # Placed by their resource requests: nothing on the head, the two workers of every training
        # run on two nodes.
        nodes = ray_state(cluster.dashboard, cluster.auth, "nodes")
        head = {node["node_id"] for node in nodes if node["is_head_node"]}
        groups: dict[str, set[str]] = {}
        for actor in ray_state(cluster.dashboard, cluster.auth, "actors", "class_name=RayTrainWorker"):
            groups.setdefault(actor["placement_group_id"], set()).add(actor["node_id"])
        assert len(groups) >= len(TRAINING) and all(len(group) == 2 for group in groups.values()), groups
        assert len(head) == 1 and not set().union(*groups.values()) & head, (head, groups)

        assert_complete(cluster.mlflow_uri, work, storage, steps=STEPS)

        # Weights were read where they were used: the driver's node downloaded none.
        driver_cache = Path(f"/proc/{cluster.nodes[0].process.pid}/root{Path.home()}/.cache/wuerstchen-ray")
        assert not driver_cache.exists() or not list(driver_cache.iterdir()), list(driver_cache.iterdir())


def _kill_a_node_mid_shard(workers: tuple[RayNode, ...], killed: list[RayNode], done: threading.Event) -> None:
    """Waits until a decode actor on one of ``workers`` runs a shard, then SIGKILLs that node's raylet."""
    while not done.is_set():
        for node in workers:
            titles = []
            for process in node.processes():
                with contextlib.suppress(psutil.NoSuchProcess):
                    titles.append(" ".join(process.cmdline()).strip())
            if f"ray::{DECODE_ACTOR}.submit" in titles:
                node.raylet().kill()
                killed.append(node)
                return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_node_lost_mid_phase_leaves_the_phase_to_the_nodes_left_and_each_sample_counted_once(tmp_path):
    with local_cluster(tmp_path, worker_nodes=2, worker_cpus=2) as cluster:
        storage = StorageConfig(endpoint_url=cluster.s3_endpoint, key=S3_KEY, secret=cluster.s3_secret)
        work = f"s3://{BUCKET}/run"
        killed: list[RayNode] = []
        done = threading.Event()
        killer = threading.Thread(target=_kill_a_node_mid_shard, args=(cluster.nodes[1:], killed, done), daemon=True)
        killer.start()
        try:
            submitted = submit_job(
                cluster.dashboard,
                cluster.auth,
                [
                    "pipelines/full.py",
                    "--phases=metadata_filter,decode",
                    f"--set=work_dir={work}",
                    *cluster.storage_overrides(),
                    # Shards enough that decode still has work on both nodes when its first one starts.
                    "--set=data.demo.num_shards=8",
                    "--set=data.demo.samples_per_shard=40",
                ],
                env_vars={"MLFLOW_TRACKING_URI": cluster.mlflow_uri},
            )
        finally:
            done.set()
            killer.join()
        output = submitted.stdout + submitted.stderr
        assert killed, f"no decode actor was seen running a shard on a worker node:\n{output[-3000:]}"
        assert submitted.returncode == 0, output[-6000:]
        assert "ran: metadata_filter, decode" in output, output[-6000:]
        nodes = ray_state(cluster.dashboard, cluster.auth, "nodes")
        assert sorted(node["state"] for node in nodes) == ["ALIVE", "ALIVE", "DEAD"], nodes

        client = MlflowClient(cluster.mlflow_uri)
        runs = client.search_runs([client.get_experiment_by_name("wuerstchen-ray").experiment_id])
        phases = {r.info.run_name: r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags}
        assert phases["decode"].info.status == "FINISHED"
        assert_exact_ledger_through_decode(phases, work, storage)


def assert_complete(mlflow_uri: str, work: str, storage: StorageConfig, *, steps: int) -> tuple[Run, dict[str, Run]]:
    """That a pipeline job ran every phase to its end: MLflow's runs (the parent and one per phase,
    all finished), a ledger exact against the demo data's ground truth, every training run at its last
    step with checkpoints and final weights in ``work``, sample grids and generate's outputs. Returns
    the parent run and the phase runs by name."""
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("wuerstchen-ray")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    phases = {r.info.run_name: r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags}
    assert set(phases) == set(PHASES) and parent.info.status == "FINISHED"
    assert all(run.info.status == "FINISHED" and run.data.tags["phase.outcome"] == "ran" for run in phases.values())

    # The ledger is exact, as on one machine.
    assert_exact_ledger_through_decode(phases, work, storage)
    truth = demo_data.load_ground_truth(f"{work}/demo_data", storage)["samples"]
    expected = [r["expected"] for r in truth.values()]
    assert phases["pre_encode"].data.metrics["kept"] == expected.count(demo_data.KEEP)

    # Training: every run to its last step, checkpoints on S3, sample grids drawn by workers with
    # the weights of the stages trained before (Stage B's grid decodes with Stage A, Stage C's
    # with Stage B and Stage A).
    fs, root = filesystem(work, storage)
    for phase in training_phases():
        assert phases[phase].data.metrics["final_step"] == steps, phase
        assert fs.glob(f"{root}/{phase}/ray/*/checkpoint_*/state.json"), phase
        assert trained_weights.fingerprint_of(f"{work}/{phase}/{trained_weights.FINAL_FILE}", storage), phase
    for phase in ("train_stage_b", "train_stage_c"):
        assert client.list_artifacts(phases[phase].info.run_id, "samples"), phase
    generated = phases["generate"]
    assert "samples.png" in {a.path for a in client.list_artifacts(generated.info.run_id)}
    assert 0 <= generated.data.metrics["colour_accuracy"] <= 1
    assert fs.exists(f"{root}/{generate_phase.PHASE}/{generate_phase.SUMMARY_FILE}")
    return parent, phases


def assert_exact_ledger_through_decode(phases: dict[str, Run], work: str, storage: StorageConfig) -> None:
    """That the metadata filter and decode counted every sample of the demo data once, each drop
    under the reason its ground truth names, and that decode's shards hold each sample's row once."""
    truth = demo_data.load_ground_truth(f"{work}/demo_data", storage)["samples"]
    metadata = phases["metadata_filter"].data.metrics
    dropped = [r["expected"] for r in truth.values() if r["phase"] == "metadata"]
    assert metadata["samples_in"] == len(truth) and metadata["kept"] == len(truth) - len(dropped)
    for reason in METADATA_REASONS:
        assert metadata[f"dropped/{reason}"] == dropped.count(reason), reason
    decoded = phases["decode"].data.metrics
    dropped = [r["expected"] for r in truth.values() if r["phase"] == "decode" and r["expected"] != demo_data.KEEP]
    assert decoded["samples_in"] == metadata["kept"] and decoded["kept"] == metadata["kept"] - len(dropped)
    for reason in DECODE_REASONS:
        assert decoded[f"dropped/{reason}"] == dropped.count(reason), reason

    manifest = read_manifest(f"{work}/{decode.PHASE}", storage)
    fs, folder = filesystem(f"{work}/{decode.PHASE}", storage)
    keys = [
        key
        for shard in sorted(manifest.shards)
        for key in pq.read_table(f"{folder}/{schema.shard_parquet(shard)}", filesystem=fs)[schema.KEY].to_pylist()
    ]
    assert len(keys) == len(set(keys)) == decoded["samples_in"], "a sample is missing from decode's shards or doubled"
    assert not fs.glob(f"{folder}/*.tmp-*"), "a writer's temporary is left"
