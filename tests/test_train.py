"""Training on Ray Train (2 CPU workers, tiny configs): resume, budgets, a killed job, all on
latents in aspect-ratio buckets (the batches of a step come from one bucket, the buckets take turns).

Learning, checkpoints and logged weights of every stage, on centre crops, are checked on the
end-to-end run (test_full).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import io
import itertools
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import ray.train
import torch
import torch.distributed.checkpoint as dcp
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image
from torch.distributed.checkpoint import CheckpointException

from cluster.local_cluster import kill_session, ray_auth, ray_node, ray_state
from pipelines import evaluate, full, schema, train_phase, trained_weights
from pipelines.chain_evaluation import ChainEvaluation, ChainScorer, held_out_captions, real_images
from pipelines.config import load_config
from pipelines.ledger import read_manifest
from pipelines.phases import PhaseContext
from pipelines.pre_encode import latent_shapes, semantic_input_size
from pipelines.storage import StorageConfig
from pipelines.tracking import Tracker
from pipelines.train import WorkerArgs
from pipelines.trainable import REGISTRY, build_task
from pipelines.trainable.base import TaskSpec, decode_images
from pipelines.training.checkpoint import file_record, load_parts, verify_files
from pipelines.training.config import TrainConfig
from pipelines.training.data import TrainingRows
from pipelines.training.parallel import full_state
from pipelines.training.step import swapped_in, train_step
from stages.generate import Wuerstchen, build_models
from stages.semantic import SEMANTIC_CONFIGS, SemanticCompressor
from stages.stage_a import STAGE_A_CONFIGS, StageA
from stages.stage_c import STAGE_C_CONFIGS, StageC
from tests.instance_metadata import instance_metadata

ROOT = Path(__file__).resolve().parents[1]
# Enough samples for a global batch (32) in the landscape and in the portrait bucket.
SMALL_DATA = [
    "--set",
    "data.demo.num_shards=2",
    "--set",
    "data.demo.samples_per_shard=64",
    "--set",
    "decode.crop=buckets",
    "--set",
    "decode.bucket_multiple=16",
]
# Random encoders: trained ones are test_full's subject, and their training would double the set-up.
RANDOM_ENCODERS = ["--set", "pre_encode.stage_a_weights=", "--set", "pre_encode.semantic_weights="]


def _main(work_dir: Path, *args: str) -> None:
    full.main(["--set", f"work_dir={work_dir}", *SMALL_DATA, *RANDOM_ENCODERS, *args])


def _client(work_dir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{work_dir}/mlflow.db")


def _phase_runs(work_dir: Path, phase: str):
    client = _client(work_dir)
    runs = client.search_runs(
        ["1"], filter_string=f"attributes.run_name = '{phase}'", order_by=["attributes.start_time ASC"]
    )
    return client, runs


def _loss_history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


@pytest.fixture(scope="module")
def latents(tmp_path_factory, local_ray):
    """A work dir whose data phases and latents are done."""
    work_dir = tmp_path_factory.mktemp("train") / "work"
    _main(work_dir, "--phases", "metadata_filter,decode,embed,pre_encode")
    return work_dir


def _fresh_copy(latents: Path, tmp_path: Path) -> Path:
    """A copy of the prepared work dir, so each test trains from its own state."""
    work_dir = tmp_path / "work"
    subprocess.run(["cp", "-r", str(latents), str(work_dir)], check=True)
    return work_dir


def test_each_bucket_holds_the_latents_the_encoders_compute_for_its_crop(latents):
    config = load_config("tiny", SMALL_DATA[1::2])
    decoded = {row[schema.KEY]: row for row in pq.read_table(latents / "decode" / "00000.parquet").to_pylist()}
    # The random encoders of the pre-encode actors: seeded by pre_encode.seed, Stage A first.
    torch.manual_seed(config.pre_encode.seed)
    stage_a, semantic = StageA(STAGE_A_CONFIGS["tiny"]()).eval(), SemanticCompressor(SEMANTIC_CONFIGS["tiny"]()).eval()
    crops = set()
    for row in pq.read_table(latents / "pre_encode" / "00000.parquet").to_pylist():
        crop = (row[schema.CROP_WIDTH], row[schema.CROP_HEIGHT])
        crops.add(crop)
        image = Image.open(io.BytesIO(decoded[row[schema.KEY]][schema.IMAGE]))
        assert image.size == crop
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            expected = {
                schema.STAGE_B_LATENT: stage_a.encode_stage_b_latents(pixels),
                schema.STAGE_C_LATENT: semantic.encode_stage_c_latents(
                    pixels, semantic_input_size(config.pre_encode, crop, config.decode.resolution)
                ),
            }
        for name, shape in latent_shapes(config.pre_encode, crop, config.decode.resolution).items():
            assert expected[name].shape[1:] == shape
            stored = np.asarray(row[name], np.float32).reshape(shape)
            np.testing.assert_allclose(
                stored, expected[name][0].numpy(), atol=2e-2, rtol=1e-2, err_msg=f"{name} {crop}"
            )
    assert {(64, 64), (80, 48), (48, 80)} <= crops, crops
    # Each row group holds one crop, with min/max statistics on the crop columns: the per-bucket filter
    # that Ray Data pushes into the Parquet read skips the other buckets' row groups.
    metadata = pq.ParquetFile(latents / "pre_encode" / "00000.parquet").metadata
    names = metadata.schema.to_arrow_schema().names
    assert metadata.num_row_groups >= len(crops)
    for group in range(metadata.num_row_groups):
        for column in (schema.CROP_WIDTH, schema.CROP_HEIGHT):
            statistics = metadata.row_group(group).column(names.index(column)).statistics
            assert statistics.has_min_max and statistics.min == statistics.max, (group, column)


def _every_row(rows: TrainingRows) -> dict[str, np.ndarray]:
    """The training rows of every file of a data set, in file order."""
    files = [rows.read(file, 0, sum(groups)) for file, groups in enumerate(rows.group_rows)]
    return {name: np.concatenate([columns[name] for columns in files]) for name in rows.columns}


def test_training_reads_every_train_sample_of_its_buckets_and_no_validation_sample(latents, tmp_path):
    config = load_config("tiny", [*SMALL_DATA[1::2], *RANDOM_ENCODERS[1::2], f"work_dir={latents}"])
    shards = sorted(read_manifest(str(latents / "pre_encode")).shards)
    rows = [row for shard in shards for row in pq.read_table(latents / "pre_encode" / f"{shard}.parquet").to_pylist()]
    # The rows training yields carry no key; each sample's Stage C latent is its own and names it.
    key_of = {np.asarray(row[schema.STAGE_C_LATENT], np.float16).tobytes(): row[schema.KEY] for row in rows}
    assert len(key_of) == len(rows)
    validation = {row[schema.KEY] for row in rows if row[schema.SPLIT] == "validation"}
    assert len(validation) == config.pre_encode.validation_min

    tracker = Tracker(config.tracking, str(tmp_path))
    context = PhaseContext(config=config, work_dir=str(latents), shards_url="", tracker=tracker)
    with tracker.run("datasets") as run:
        buckets = train_phase._datasets(context, REGISTRY["stage_c"], shards, config.train_c, run)
    assert set(buckets) == {"train_48x80", "train_80x48"}, buckets  # the square bucket is too small
    read = [
        key_of[np.asarray(latent, np.float16).tobytes()]
        for bucket in buckets.values()
        for latent in _every_row(bucket)[schema.STAGE_C_LATENT]
    ]
    in_buckets = {
        row[schema.KEY] for row in rows if f"train_{row[schema.CROP_WIDTH]}x{row[schema.CROP_HEIGHT]}" in buckets
    }
    assert len(read) == len(set(read)) and set(read) == in_buckets - validation
    assert in_buckets & validation, "no validation sample in the buckets read: the test shows nothing"
    # The batches per epoch count the train rows alone (2 workers, 16 samples each a step).
    for name, bucket in buckets.items():
        assert (
            bucket.batches
            == sum(
                f"train_{row[schema.CROP_WIDTH]}x{row[schema.CROP_HEIGHT]}" == name and row[schema.SPLIT] == "train"
                for row in rows
            )
            // 32
        ), name

    # Evaluation's rows: validation rows only, shared among the buckets, the same on every call.
    held_out = train_phase._validation_batches(context, REGISTRY["stage_c"], shards, config.train_c)
    evaluated = [
        key_of[np.asarray(latent, np.float16).tobytes()]
        for group in held_out
        for latent in group[schema.STAGE_C_LATENT]
    ]
    assert set(evaluated) <= validation and len(evaluated) == len(set(evaluated)) <= config.train_c.eval_samples
    assert len(held_out) > 1, "the validation rows of one bucket only: sharing among buckets is not shown"
    again = train_phase._validation_batches(context, REGISTRY["stage_c"], shards, config.train_c)
    assert all(np.array_equal(a[name], b[name]) for a, b in zip(held_out, again, strict=True) for name in a)


@pytest.mark.parametrize("stage_name", ["stage_a", "semantic"])
def test_the_image_stages_train_on_no_held_out_crop_and_evaluate_on_the_validation_split(latents, tmp_path, stage_name):
    """Stage A and the semantic compressor learn from the decoded crops before pre-encode marks the split:
    they leave out the keys it marks ``validation``, and their held-out loss is taken on those rows."""
    config = load_config("tiny", [*SMALL_DATA[1::2], *RANDOM_ENCODERS[1::2], f"work_dir={latents}"])
    shards = sorted(read_manifest(str(latents / "decode")).shards)
    latent_rows = [
        row
        for shard in shards
        for row in pq.read_table(
            latents / "pre_encode" / f"{shard}.parquet", columns=[schema.KEY, schema.SPLIT]
        ).to_pylist()
    ]
    validation = {row[schema.KEY] for row in latent_rows if row[schema.SPLIT] == "validation"}
    assert len(validation) == config.pre_encode.validation_min
    decoded = {
        row[schema.KEY]: row[schema.IMAGE]
        for shard in shards
        for row in pq.read_table(latents / "decode" / f"{shard}.parquet").to_pylist()
        if row[schema.DROP_REASON] is None
    }

    tracker = Tracker(config.tracking, str(tmp_path))
    context = PhaseContext(config=config, work_dir=str(latents), shards_url="", tracker=tracker)
    threshold = context.validation_threshold()
    stage = REGISTRY[stage_name]
    section = getattr(config, stage.config_section)
    with tracker.run("datasets") as run:
        datasets = train_phase._datasets(context, stage, shards, section, run, held_out_below=threshold)
    assert list(datasets) == ["train"]  # the image stages learn from every crop's centre square
    keyed = dataclasses.replace(datasets["train"], columns=(schema.KEY, *datasets["train"].columns))
    read = list(_every_row(keyed)[schema.KEY])
    assert len(read) == len(set(read))
    assert not set(read) & validation
    # Every other decoded crop is read: those held out are the split's keys (embed dropped none here).
    assert set(read) == set(decoded) - validation

    held_out = train_phase._validation_batches(context, stage, shards, section, held_out_below=threshold)
    (group,) = held_out
    assert set(group) == set(
        stage.columns(
            TaskSpec(
                stage=stage_name,
                models="tiny",
                caption_dropout=0,
                semantic_dropout=0,
                semantic_noise=0,
                text_from_tokens=False,
            )
        )
    )
    crops = {
        key: decode_images({schema.IMAGE: [image]}, config.decode.resolution)[schema.IMAGE][0]
        for key, image in decoded.items()
        if key in validation
    }
    evaluated = [
        next(key for key, crop in crops.items() if np.array_equal(crop, image)) for image in group[schema.IMAGE]
    ]
    assert len(evaluated) == len(set(evaluated)) == min(section.eval_samples, len(validation))
    again = train_phase._validation_batches(context, stage, shards, section, held_out_below=threshold)
    assert np.array_equal(again[0][schema.IMAGE], group[schema.IMAGE])


@pytest.mark.slow
def test_budgets_stop_a_run_with_a_checkpoint_and_refuse_one_that_cannot_fit(latents, tmp_path, capsys, monkeypatch):
    work_dir = _fresh_copy(latents, tmp_path)
    # Each worker's meter reads a clock that advances 1.8 s a read (once at the start, once a step): a
    # step of the 2 workers costs 0.001 worker-hours whatever the machine's load, so the run stops at
    # step 20, after the loss's first drop (step ~14); earlier, resumed and fresh losses look alike.
    clock = functools.partial(next, itertools.count(1.8, 1.8))
    monkeypatch.setattr(train_phase, "WorkerArgs", functools.partial(WorkerArgs, clock=clock))
    budget = 0.0205
    _main(
        work_dir,
        "--phases",
        "train_stage_c,generate",
        "--set",
        "train_c.steps=100000",
        "--set",
        f"train_c.budget_gpu_hours={budget}",
        "--set",
        "train_c.log_every_seconds=0",
    )
    assert "stopped before: generate" in capsys.readouterr().err
    client, (run,) = _phase_runs(work_dir, "train_stage_c")
    # The square bucket (1 in 7 demo images) holds less than a global batch and sits out.
    assert json.loads(run.data.params["bucket_batches_per_worker"]) == {"train_48x80": 1, "train_80x48": 1}, (
        run.data.params
    )
    assert "GPU-hour budget reached" in run.data.tags["stop_reason"]
    assert run.data.params["budget_gpu_hours"] == str(budget)
    used = run.data.metrics["gpu_hours"]
    assert 0.5 * budget < used < 1.5 * budget
    assert run.data.metrics["gpu_hours_remaining"] == pytest.approx(max(budget - used, 0), abs=1e-9)
    stopped_at = int(run.data.metrics["final_step"])
    assert stopped_at == 20, stopped_at
    assert list((work_dir / "train_stage_c" / "ray").glob("*/checkpoint_*/state.json"))
    assert not (work_dir / "train_stage_c" / trained_weights.FINAL_FILE).exists()

    # Resubmitted with a larger budget and a reachable length: continues the step count and the
    # loss curve (the resumed losses are those of a trained model, not of a fresh one).
    _main(
        work_dir,
        "--phases",
        "train_stage_c",
        "--set",
        f"train_c.steps={stopped_at + 20}",
        "--set",
        "train_c.budget_gpu_hours=1",
        "--set",
        "train_c.log_every_seconds=0",
    )
    client, (stopped, resumed) = _phase_runs(work_dir, "train_stage_c")
    before, after = _loss_history(client, stopped.info.run_id), _loss_history(client, resumed.info.run_id)
    assert after[0][0] == stopped_at + 1 and after[-1][0] == stopped_at + 20
    assert resumed.data.tags["resume.step"] == str(stopped_at)
    assert np.mean([loss for _, loss in after[:5]]) < 0.5 * np.mean([loss for _, loss in before[:5]])
    assert (work_dir / "train_stage_c" / trained_weights.FINAL_FILE).is_file()

    # The experiment's budget counts both attempts, each once; a new run that cannot fit refuses to start.
    used = sum(r.data.metrics.get("gpu_hours_attempt", 0) for r in client.search_runs(["1"]))
    assert resumed.data.metrics["gpu_hours"] == pytest.approx(used)  # the data phases held no GPU
    with pytest.raises(SystemExit, match="nothing is left"):
        _main(work_dir, "--phases", "train_stage_b", "--set", f"tracking.experiment_budget_gpu_hours={used / 2}")
    with pytest.raises(
        SystemExit,
        match=r"train_b.budget_gpu_hours \(5 GPU-hours, 0 of them used by the run's "
        r"earlier attempts\) does not fit",
    ):
        _main(
            work_dir,
            "--phases",
            "train_stage_b",
            "--set",
            f"tracking.experiment_budget_gpu_hours={used + 1}",
            "--set",
            "train_b.budget_gpu_hours=5",
        )
    assert not list((work_dir / "train_stage_b").glob("ray/*/checkpoint_*/state.json"))


def test_a_budget_stops_at_the_step_it_allows_and_a_resume_counts_each_attempt_once(
    latents, tmp_path, capsys, monkeypatch
):
    # Each worker's budget meter reads its clock once at the start and once after every step, 1.8 s a
    # read: a step of the 2 workers costs 0.001 worker-hours, whatever this machine's speed.
    clock = functools.partial(next, itertools.count(1.8, 1.8))
    monkeypatch.setattr(train_phase, "WorkerArgs", functools.partial(WorkerArgs, clock=clock))
    work_dir = _fresh_copy(latents, tmp_path)
    _main(
        work_dir,
        "--phases",
        "train_stage_c",
        "--set",
        "train_c.steps=100000",
        "--set",
        "train_c.budget_gpu_hours=0.0055",
        "--set",
        "train_c.log_every_seconds=0",
    )
    assert "stopped before:  (train_stage_c stopped at step 5 of 100000" in capsys.readouterr().err
    client, (stopped,) = _phase_runs(work_dir, "train_stage_c")
    # 5 steps, then the final samples (one more read): the tail after the last step counts too.
    assert stopped.data.metrics["final_step"] == 5
    assert stopped.data.metrics["gpu_hours_attempt"] == stopped.data.metrics["gpu_hours"] == pytest.approx(0.006)
    # Logged at the steps they were reached, the driver's final figures too: the chart never goes back to 0.
    history = client.get_metric_history(stopped.info.run_id, "gpu_hours")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 5], history
    assert max(history, key=lambda m: m.timestamp).value == pytest.approx(0.006)

    # Resumed under an experiment budget of 0.0105 and no budget of its own: the run may go to 0.0105 in
    # all, its earlier attempt counted once, so 4 more steps, and the experiment counts 0.006 + 0.005.
    _main(
        work_dir,
        "--phases",
        "train_stage_c",
        "--set",
        "train_c.steps=100000",
        "--set",
        "tracking.experiment_budget_gpu_hours=0.0105",
        "--set",
        "train_c.log_every_seconds=0",
    )
    assert "raise tracking.experiment_budget_gpu_hours and run again" in capsys.readouterr().err
    client, (_, resumed) = _phase_runs(work_dir, "train_stage_c")
    assert resumed.data.tags["resume.step"] == "5" and resumed.data.metrics["final_step"] == 9
    assert resumed.data.metrics["gpu_hours_attempt"] == pytest.approx(0.005)
    assert resumed.data.metrics["gpu_hours"] == pytest.approx(0.011)
    with pytest.raises(SystemExit, match="has used 0.011 of its 0.0105 GPU-hours; nothing is left"):
        _main(work_dir, "--phases", "train_stage_c", "--set", "tracking.experiment_budget_gpu_hours=0.0105")


@pytest.mark.slow
def test_a_run_whose_every_checkpoint_is_unreadable_fails_and_never_starts_over(latents, tmp_path):
    work_dir = _fresh_copy(latents, tmp_path)
    _main(work_dir, "--phases", "train_stage_c", "--set", "train_c.steps=2", "--set", "train_c.checkpoint_every=1")
    checkpoints = sorted(path for path in (work_dir / "train_stage_c" / "ray").glob("*/checkpoint_*") if path.is_dir())
    assert len(checkpoints) == 2, checkpoints
    for shard in [shard for checkpoint in checkpoints for shard in checkpoint.glob("*.distcp")]:
        with open(shard, "r+b") as stream:
            stream.truncate(100)
    with pytest.raises(
        Exception,
        match=r"none of the 2 checkpoints beside .* can be read; delete them to train "
        "from the start",
    ):
        _main(work_dir, "--phases", "train_stage_c", "--set", "train_c.steps=4", "--set", "train_c.max_failures=0")
    client, (_, failed) = _phase_runs(work_dir, "train_stage_c")
    assert failed.info.status == "FAILED"
    assert _loss_history(client, failed.info.run_id) == []  # not a step from scratch


def test_a_batch_larger_than_the_training_set_refuses_to_start(latents, tmp_path):
    work_dir = _fresh_copy(latents, tmp_path)
    with pytest.raises(SystemExit, match=r"train_b.global_batch_size \(1000\) is larger than the training set"):
        _main(work_dir, "--phases", "train_stage_b", "--set", "train_b.global_batch_size=1000")


def test_crops_whose_latents_stage_b_cannot_take_refuse_to_start(latents, tmp_path):
    # SMALL_DATA's buckets (multiples of 16 px) give 48x80 crops: 12x20 latents, and the tiny Stage B
    # takes multiples of 8 (the rest of this file trains Stage C on them).
    work_dir = _fresh_copy(latents, tmp_path)
    with pytest.raises(SystemExit, match=r"48x80 crops have 12x20 Stage A latents.*multiples of 8.*multiple of 32"):
        _main(work_dir, "--phases", "train_stage_b")
    assert not (work_dir / "train_stage_b" / "ray").exists()


@pytest.mark.slow
def test_evaluate_gives_the_final_weights_the_held_out_loss_training_logged_last(latents, tmp_path, capsys):
    """``pipelines/evaluate.py`` recomputes a stage's held-out loss from its exported weights (Stage C's:
    the EMA) on the rows and settings of the run's config."""
    work_dir = _fresh_copy(latents, tmp_path)
    steps = ("--set", "train_c.steps=4", "--set", "train_c.eval_every=2", "--set", "generate.eval_captions=0")
    _main(work_dir, "--phases", "train_stage_c", *steps)
    client, (run,) = _phase_runs(work_dir, "train_stage_c")
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
    assert [step for step, _ in logged] == [2, 4]
    assert logged[0][1] != pytest.approx(logged[1][1], rel=1e-4), "the loss cannot tell these weights apart"
    config = evaluate.config_of_run(client, run.data.tags[MLFLOW_PARENT_RUN_ID], StorageConfig())
    metrics = evaluate.held_out_losses(config, {})
    terms = {name for name in run.data.metrics if name.startswith("val/") and name != "val/seconds"}
    assert set(metrics) == {f"stage_c/{name}" for name in terms}
    for name in terms:  # the last values the run logged: at its final step
        assert metrics[f"stage_c/{name}"] == pytest.approx(run.data.metrics[name], rel=1e-4), name
    assert f"stage_b: no held-out loss: no weights at {work_dir}/train_stage_b" in capsys.readouterr().err


def _stage_c_losses(latents: Path, folder: Path, *settings: str, lengths: tuple[int, ...] = (12,),
                    run_settings: tuple[tuple[str, ...], ...] = ()) -> list[tuple[int, float]]:  # fmt: skip
    """(step, loss) of the tiny Stage C trained with ``settings`` in runs of ``lengths`` steps, each run
    after the first resuming the one before, and each with its own ``run_settings`` if given; its final
    weights load strictly (later phases load them)."""
    folder.mkdir()
    work_dir = _fresh_copy(latents, folder)
    for steps, own in itertools.zip_longest(lengths, run_settings, fillvalue=()):
        _main(
            work_dir,
            "--phases",
            "train_stage_c",
            "--set",
            f"train_c.steps={steps}",
            *[arg for setting in (*settings, *own) for arg in ("--set", setting)],
            "--set",
            "train_c.log_every_seconds=0",
        )
    client, runs = _phase_runs(work_dir, "train_stage_c")
    assert [run.data.tags.get("resume.step") for run in runs[1:]] == [str(steps) for steps in lengths[:-1]]
    trained_weights.load(
        StageC(STAGE_C_CONFIGS["tiny"]()), str(work_dir / "train_stage_c" / trained_weights.FINAL_FILE)
    )
    return [point for run in runs for point in _loss_history(client, run.info.run_id)]


@pytest.fixture(scope="module")
def uninterrupted(latents, tmp_path_factory) -> list[tuple[int, float]]:
    """(step, loss) of the tiny Stage C trained for 12 steps on DDP without a stop: the curve that the
    resumed runs are held to."""
    return _stage_c_losses(latents, tmp_path_factory.mktemp("uninterrupted") / "run", "train_c.strategy=ddp")


@pytest.mark.slow
def test_resumed_compiled_and_fsdp_runs_follow_the_uninterrupted_loss_curve(latents, uninterrupted, tmp_path):
    whole = uninterrupted
    assert [step for step, _ in whole] == list(range(1, 13))
    # Stopped after step 6 (three epochs in; from the second on, cache_data serves reshuffled epochs
    # from the files in memory) and resubmitted: the same batches and draws, so the same losses to the last bit.
    assert _stage_c_losses(latents, tmp_path / "resumed", "train_c.strategy=ddp", lengths=(6, 12)) == whole
    # Under FSDP, stopped and resumed too (each rank loads its shards of the checkpoint): the same
    # averaged gradients, reduced in another order.
    fsdp = _stage_c_losses(latents, tmp_path / "fsdp", "train_c.strategy=fsdp", lengths=(6, 12))
    assert [step for step, _ in fsdp] == list(range(1, 13))
    np.testing.assert_allclose([loss for _, loss in fsdp], [loss for _, loss in whole], rtol=1e-5)
    # Inductor fuses and reorders float arithmetic: close to the eager curve, not bit-equal to it.
    # Checkpointed blocks recompute the same values (and draw the same dropout masks) in backward.
    # So do the ops that a memory budget has the partitioner recompute, here in blocks sharded by FSDP.
    for name, settings in [
        ("checkpointed", ["train_c.activation_checkpointing=true"]),
        ("budgeted-fsdp", ["train_c.activation_memory_budget=0.5", "train_c.strategy=fsdp"]),
    ]:
        compiled = _stage_c_losses(latents, tmp_path / name, "train_c.compile=true", *settings)
        assert [step for step, _ in compiled] == list(range(1, 13)), name
        np.testing.assert_allclose([loss for _, loss in compiled], [loss for _, loss in whole], rtol=1e-3, err_msg=name)

    # Stage A draws a grid at every sample step without partner stages. Rank 0 alone samples, but under
    # FSDP it cannot run the sharded model alone: every rank takes part in gathering the weights.
    work_dir = tmp_path / "fsdp" / "work"
    _main(
        work_dir,
        "--phases",
        "train_stage_a",
        "--set",
        "pre_encode.stage_a_weights=trained",
        "--set",
        "train_a.steps=4",
        "--set",
        "train_a.strategy=fsdp",
        "--set",
        "train_a.sample_every=2",
    )
    client, (run,) = _phase_runs(work_dir, "train_stage_a")
    grids = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "samples")]
    assert {"samples/step_0000002.png", "samples/step_0000004.png"} <= set(grids), grids


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_bit_exact_reading_again_one_shard_at_most(latents, tmp_path):
    # Batches of 8: an epoch of several steps per bucket, so step 7 lies inside one.
    whole = _stage_c_losses(latents, tmp_path / "whole", "train_c.global_batch_size=8")
    resumed = _stage_c_losses(latents, tmp_path / "resumed", "train_c.global_batch_size=8", lengths=(7, 12))
    assert [step for step, _ in whole] == list(range(1, 13))
    assert resumed == whole
    client, (first, second) = _phase_runs(tmp_path / "resumed" / "work", "train_stage_c")
    buckets = json.loads(first.data.params["bucket_batches_per_worker"])
    epoch = sum(buckets.values())
    assert 7 % epoch, f"step 7 ends an epoch of {epoch} steps: the test shows nothing"
    # Rank 0's rows read again on resume: per bucket, those of the piece that holds its position, in
    # one shard (replaying the epoch read all its batches before the position again).
    reread = max(m.value for m in client.get_metric_history(second.info.run_id, "data/rows_reread"))
    shards = [
        pq.read_table(path, columns=[schema.SPLIT, schema.CROP_WIDTH, schema.CROP_HEIGHT]).to_pylist()
        for path in (tmp_path / "resumed" / "work" / "pre_encode").glob("*.parquet")
    ]
    most_in_a_shard = {
        bucket: max(
            sum(
                f"train_{r[schema.CROP_WIDTH]}x{r[schema.CROP_HEIGHT]}" == bucket and r[schema.SPLIT] == "train"
                for r in rows
            )
            for rows in shards
        )
        for bucket in buckets
    }
    assert reread <= sum(most_in_a_shard.values()), (reread, most_in_a_shard)
    state = json.loads(
        next((tmp_path / "resumed" / "work" / "train_stage_c" / "ray").glob("*/checkpoint_*/state.json")).read_text()
    )
    assert set(state["data_position"]) == set(buckets)


@pytest.mark.slow
def test_under_fsdp_each_rank_writes_its_shards_while_training_goes_on_and_resumes_from_them(latents, tmp_path):
    settings = [
        "--set",
        "train_c.strategy=fsdp",
        "--set",
        "train_c.checkpoint_every=4",
        "--set",
        "train_c.log_every_seconds=0",
    ]
    whole = _stage_c_losses(latents, tmp_path / "whole", *settings[1::2])
    work_dir = _fresh_copy(latents, tmp_path)
    _main(work_dir, "--phases", "train_stage_c", "--set", "train_c.steps=6", *settings)
    (snapshot,) = (work_dir / "train_stage_c").glob("ray/*/checkpoint_manager_snapshot.json")
    periodic, final = json.loads(snapshot.read_text())["checkpoint_results"]
    assert (periodic["metrics"]["step"], final["metrics"]["step"]) == (4, 6)
    # Reported once both ranks had written their parts, after a later step had run.
    assert periodic["metrics"]["reported_at_step"] > 4
    # No rank gathered the whole state: each wrote about half of the model, EMA and AdamW's two
    # moments (and a record of each tensor it holds).
    whole_state = 4 * sum(p.numel() * p.element_size() for p in StageC(STAGE_C_CONFIGS["tiny"]()).parameters())
    shards = sorted((snapshot.parent / periodic["checkpoint_dir_name"]).glob("*.distcp"))
    sizes = [shard.stat().st_size for shard in shards]
    assert len(sizes) == 2 and max(sizes) < 0.75 * whole_state < whole_state < sum(sizes), (sizes, whole_state)
    # Resumed from the periodic checkpoint (the final one made unreadable): the uninterrupted run's
    # losses to the last bit.
    (snapshot.parent / final["checkpoint_dir_name"] / "state.json").write_text("{}")
    _main(work_dir, "--phases", "train_stage_c", "--set", "train_c.steps=12", *settings)
    client, (first, resumed) = _phase_runs(work_dir, "train_stage_c")
    assert resumed.data.tags["resume.step"] == "4"
    assert _loss_history(client, first.info.run_id) == whole[:6]
    assert _loss_history(client, resumed.info.run_id) == whole[4:]


@pytest.mark.slow
def test_a_run_switched_between_ddp_and_fsdp_resumes_where_it_stopped(latents, uninterrupted, tmp_path):
    strategies = (("train_c.strategy=ddp",), ("train_c.strategy=fsdp",), ("train_c.strategy=ddp",))
    switched = _stage_c_losses(latents, tmp_path / "switched", lengths=(4, 8, 12), run_settings=strategies)
    assert [step for step, _ in switched] == list(range(1, 13))
    assert switched[:4] == uninterrupted[:4]
    # Each checkpoint is read into the other strategy's layout (replicated tensors into FSDP's shards
    # and back): model, EMA, AdamW's moments and the data position carry over, and only the order in
    # which the gradients are reduced differs from the run that stayed on DDP.
    np.testing.assert_allclose([loss for _, loss in switched], [loss for _, loss in uninterrupted], rtol=1e-5)


@pytest.mark.slow
def test_a_sigterm_to_a_worker_checkpoints_at_the_next_step_and_the_restart_resumes_there(
    latents, uninterrupted, tmp_path, monkeypatch
):
    marker = tmp_path / "sigterm-sent"

    def clock() -> float:
        """The budget meter's clock, read once at the start and once after each step: on rank 1, after
        its third step, it sends its own process SIGTERM, as an instance's shutdown would; once, so
        the restarted workers train on. (From the test's process the step would be a race.)"""
        nonlocal reads
        reads += 1
        if reads == 4 and ray.train.get_context().get_world_rank() == 1 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGTERM)
        return time.monotonic()

    reads = 0
    monkeypatch.setattr(train_phase, "WorkerArgs", functools.partial(WorkerArgs, clock=clock))
    # No periodic checkpoint before the end (checkpoint_every is 200): a restart could only resume
    # from the checkpoint the notice wrote, or start over.
    preempted = _stage_c_losses(latents, tmp_path / "preempted")
    assert marker.exists()
    client, (run,) = _phase_runs(tmp_path / "preempted" / "work", "train_stage_c")
    noticed_at = int(run.data.tags["resume.step"])
    # The step the notice arrived in (rank 1 sees it only when its main thread runs the handler).
    assert 3 <= noticed_at < 12, noticed_at
    assert _registered_steps(tmp_path / "preempted" / "work") == [noticed_at, 12]
    # Every step once, none repeated, and the same losses as the run that was never stopped.
    assert preempted == uninterrupted


@pytest.mark.slow
def test_a_node_drained_for_preemption_has_the_run_checkpoint_at_the_next_step_and_train_on(latents, tmp_path):
    work_dir = _fresh_copy(latents, tmp_path)
    auth = ray_auth()
    # The head takes no work: the run's workers and its data tasks are the drained node's.
    with (
        ray_node(tmp_path / "head", auth, num_cpus=0) as head,
        ray_node(tmp_path / "node", auth, num_cpus=2, head_address=head.address),
    ):
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")},
            **auth,
            "RAY_ADDRESS": head.address,
        }
        driver = subprocess.Popen(
            [
                sys.executable,
                "pipelines/full.py",
                "--set",
                f"work_dir={work_dir}",
                *SMALL_DATA,
                *RANDOM_ENCODERS,
                "--phases",
                "train_stage_c",
                "--set",
                "train_c.steps=100000",
                "--set",
                "train_c.log_every_seconds=0",
                # No periodic checkpoint: the run would write one at tiny's step 200 if the notice's
                # came late or the test stopped the run late (CI once saw the notice's at step 179,
                # then step 200's before the run was stopped).
                "--set",
                "train_c.checkpoint_every=100000",
            ],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client: list[MlflowClient] = []

        def last_step() -> int:
            if not client:
                if not (work_dir / "train_stage_c").exists():
                    return 0
                client.append(_client(work_dir))
            runs = client[0].search_runs(["1"], filter_string="attributes.run_name = 'train_stage_c'")
            return max((step for step, _ in _loss_history(client[0], runs[0].info.run_id)), default=0) if runs else 0

        try:
            # Past the first epoch: from then on the workers train from the files they keep in memory
            # (cache_data); they read with no Ray task at all, which a draining node no longer takes.
            _wait_for(lambda: last_step() >= 4, driver, "the second epoch")
            (node,) = [node for node in ray_state(head.dashboard, auth, "nodes") if not node["is_head_node"]]
            # The node's spot notice watcher, as ray_cluster.yaml starts it on spot nodes, learns of an
            # interruption from the instance metadata service (a stand-in here) and drains the node.
            with instance_metadata() as metadata:
                watcher = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cluster.spot_notice",
                        f"--address={head.address}",
                        f"--node-id={node['node_id']}",
                        f"--metadata-url={metadata.url}",
                        "--poll-seconds=0.2",
                    ],
                    cwd=ROOT,
                    env=env,
                )
                try:
                    drained_at = last_step()
                    in_ten_minutes = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=10)
                    metadata.notice = {"action": "terminate", "time": in_ten_minutes.strftime("%Y-%m-%dT%H:%M:%SZ")}
                    assert watcher.wait(timeout=120) == 0
                finally:
                    if watcher.poll() is None:
                        watcher.kill()
                        watcher.wait()
            # With no periodic checkpoint, the one registered is the notice's.
            _wait_for(lambda: _registered_steps(work_dir), driver, "the notice's checkpoint")
            (noticed_at,) = _registered_steps(work_dir)
            # And the run trains on after it, until the node goes (here: until it is stopped).
            _wait_for(lambda: last_step() >= noticed_at + 3, driver, "training to go on after the checkpoint")
        finally:
            kill_session(driver.pid)
            driver.wait()
    assert drained_at <= noticed_at, (drained_at, noticed_at)
    checkpoints = list((work_dir / "train_stage_c" / "ray").glob("*/checkpoint_*/state.json"))
    assert [json.loads(path.read_text())["step"] for path in checkpoints] == [noticed_at]


def _registered_steps(work_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for the tiny Stage C run, oldest first."""
    for snapshot in (work_dir / "train_stage_c").glob("ray/*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError):  # being rewritten
            return [result["metrics"]["step"] for result in json.loads(snapshot.read_text())["checkpoint_results"]]
    return []


def _train_workers(driver_pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes of the local Ray that the driver started."""
    workers = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if " ".join(process.cmdline()).startswith("ray::RayTrainWorker"):
                workers.append(process)
    return workers


def _wait_for(condition, driver: subprocess.Popen, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert driver.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_worker_and_a_killed_job_continue_from_the_last_checkpoint(latents, tmp_path):
    work_dir = _fresh_copy(latents, tmp_path)
    args = [
        sys.executable,
        "pipelines/full.py",
        "--set",
        f"work_dir={work_dir}",
        *SMALL_DATA,
        *RANDOM_ENCODERS,
        "--phases",
        "train_stage_c",
        "--set",
        "train_c.checkpoint_every=10",
        "--set",
        "train_c.log_every_seconds=0",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    driver = subprocess.Popen(
        [*args, "--set", "train_c.steps=100000"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    clients: list[MlflowClient] = []

    def logged_steps() -> list[int]:
        if not clients:
            if not (work_dir / "train_stage_c").exists():
                return []
            clients.append(_client(work_dir))  # one client: polling must not starve the training
        runs = clients[0].search_runs(["1"], filter_string="attributes.run_name = 'train_stage_c'")
        return [step for step, _ in _loss_history(clients[0], runs[0].info.run_id)] if runs else []

    def registered_step() -> int:
        """Step of the latest checkpoint Ray Train has registered: the one a restart resumes from."""
        for snapshot in (work_dir / "train_stage_c").glob("ray/*/checkpoint_manager_snapshot.json"):
            with contextlib.suppress(ValueError):  # being rewritten
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
                return latest["metrics"]["step"] if latest else 0
        return 0

    try:
        # A worker dies: Ray Train restarts the group from the last checkpoint (max_failures).
        _wait_for(lambda: registered_step() >= 10, driver, "a registered checkpoint")
        # A step past that checkpoint logged first: killed before it, the restart would repeat no step.
        _wait_for(lambda: max(logged_steps(), default=0) > registered_step(), driver, "a step past the checkpoint")
        workers = _train_workers(driver.pid)
        assert len(workers) == 2, workers
        registered_before = registered_step()
        workers[1].kill()
        killed_at = max(logged_steps())
        _wait_for(lambda: max(logged_steps()) >= killed_at + 15, driver, "training to go on after the worker died")
        steps = logged_steps()
        restarted_at = next(step for previous, step in zip(steps, steps[1:]) if step <= previous)
        # Not from scratch: from the checkpoint registered before the failure, or a later one.
        assert registered_before < restarted_at <= killed_at + 10 and (restarted_at - 1) % 10 == 0, (
            registered_before,
            restarted_at,
            killed_at,
        )
        # The whole job dies: resubmitted, it continues from the last complete checkpoint.
        _wait_for(lambda: registered_step() >= 30, driver, "a third registered checkpoint")
    finally:
        # Every process of the job, or a surviving one may still register a checkpoint after the
        # snapshot is read below.
        killed = kill_session(driver.pid)
        driver.wait()
    assert killed, "the killed job's local Ray outlived it"
    logged_before_kill = max(logged_steps())

    # And the checkpoints the resubmission tries before the oldest registered one are damaged: the
    # latest registered (tried first) has a byte flipped in a tensor, its size right and its format
    # still loadable; the others are truncated. It says so for each and continues from the oldest.
    (snapshot,) = (work_dir / "train_stage_c").glob("ray/*/checkpoint_manager_snapshot.json")
    registered = json.loads(snapshot.read_text())
    oldest, latest = registered["checkpoint_results"][0], registered["latest_checkpoint_result"]
    oldest_step = oldest["metrics"]["step"]
    assert oldest["checkpoint_dir_name"] < latest["checkpoint_dir_name"], registered["checkpoint_results"]
    # Newest first, the order the resubmission tries them in.
    damaged = sorted(
        (
            folder.name
            for folder in snapshot.parent.glob("checkpoint_*")
            if oldest["checkpoint_dir_name"] < folder.name <= latest["checkpoint_dir_name"]
        ),
        reverse=True,
    )
    for name in damaged[1:]:
        with open(min((snapshot.parent / name).glob("*.distcp")), "r+b") as stream:
            stream.truncate(stream.seek(0, os.SEEK_END) // 2)
    with open(min((snapshot.parent / latest["checkpoint_dir_name"]).glob("*.distcp")), "r+b") as stream:
        stream.seek(stream.seek(0, os.SEEK_END) // 2)  # a byte of some tensor's data
        middle = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([middle[0] ^ 0x40]))
    result = subprocess.run(
        [*args, "--set", f"train_c.steps={logged_before_kill + 20}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, (_, resumed) = _phase_runs(work_dir, "train_stage_c")
    # Each damaged checkpoint was tried and refused, the latest first, then the oldest restored (the
    # workers' console lines saying so can be lost when the driver exits before Ray forwards them; the
    # run's tags cannot).
    tried = [*json.loads(resumed.data.tags["resume.unreadable_checkpoints"]), resumed.data.tags["resume.checkpoint"]]
    assert tried == [*damaged, oldest["checkpoint_dir_name"]], (tried, damaged, registered)
    assert resumed.data.tags["resume.step"] == str(oldest_step)
    first_step = _loss_history(client, resumed.info.run_id)[0][0]
    # From a complete checkpoint (every 10 steps), never from scratch and never past what was saved.
    # How far it lies behind the last step logged depends on the machine: the checkpoints registered
    # lag the steps by their background write and upload.
    assert first_step == oldest_step + 1 and (first_step - 1) % 10 == 0
    assert 10 < first_step <= logged_before_kill + 1, (logged_before_kill, first_step)
    assert (work_dir / "train_stage_c" / trained_weights.FINAL_FILE).is_file()


def test_a_checkpoint_file_truncated_or_altered_is_refused(tmp_path):
    weight = torch.arange(64, dtype=torch.float32)
    dcp.save({"weight": weight}, checkpoint_id=tmp_path, no_dist=True)
    (shard,) = tmp_path.glob("*.distcp")
    written = {shard.name: file_record(shard)}
    verify_files(tmp_path, written)
    data = bytearray(shard.read_bytes())
    values = weight.numpy().tobytes()
    data[data.index(values) + len(values) - 1] ^= 0x40  # one bit of the last value: the same size
    shard.write_bytes(bytes(data))
    loaded = {"weight": torch.zeros(64)}
    dcp.load(loaded, checkpoint_id=tmp_path, no_dist=True)
    assert not torch.equal(loaded["weight"], weight)  # the format does not notice
    with pytest.raises(ValueError, match=f"{shard.name} is not what the checkpoint wrote.*sha256"):
        verify_files(tmp_path, written)
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match=r"\{'bytes': 100\} != \{'bytes': "):
        verify_files(tmp_path, written)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_checkpoint_that_would_unpickle_code_is_refused(tmp_path):
    parameter = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([parameter])
    optimizer.zero_grad()
    parameter.sum().backward()
    optimizer.step()
    dcp.save({"weight": parameter.detach(), "optimizer": optimizer.state_dict()}, checkpoint_id=tmp_path, no_dist=True)
    loaded = {
        "weight": torch.zeros(4),
        "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))]).state_dict(),
    }
    load_parts(loaded, tmp_path)  # the optimizer's hyperparameters are plain data
    assert torch.equal(loaded["weight"], parameter.detach())
    assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    metadata = tmp_path / ".metadata"
    written = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointException, match="names posix.system: refused"):
        load_parts(loaded, tmp_path)
    metadata.write_bytes(written)
    dcp.save({"weight": parameter.detach(), "extra": _RunsCode()}, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        load_parts({"weight": torch.zeros(4), "extra": None}, tmp_path)


def test_a_step_draws_its_dropout_masks_from_its_seed_alone():
    # v2's Stage B and C use dropout 0.1, which draws from the global generators: a resumed run must
    # draw the masks the uninterrupted one would have, whatever ran in the process before.
    stage_c = dataclasses.replace(STAGE_C_CONFIGS["tiny"](), dropout=0.5)
    spec = TaskSpec(
        stage="stage_c",
        models="tiny",
        caption_dropout=0,
        semantic_dropout=0,
        semantic_noise=0,
        text_from_tokens=False,
        empty_caption={schema.TEXT_STAGE_C: np.zeros((1, 77, stage_c.c_cond), np.float32)},
    )
    task = build_task(spec, torch.device("cpu"))
    config = TrainConfig(steps=1, global_batch_size=4, warmup_steps=0)
    generator = torch.Generator().manual_seed(0)
    batch = {
        schema.STAGE_C_LATENT: torch.randn(4, stage_c.c_in, 4, 4, generator=generator),
        schema.TEXT_STAGE_C: torch.randn(4, 77, stage_c.c_cond, generator=generator),
    }

    def weights_after_one_step(global_seed: int, step_seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = StageC(stage_c)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        torch.manual_seed(global_seed)  # what the process drew before this step
        train_step(model, optimizer, schedule, task, batch, config, step_seed)
        # Not the loss: Stage C's zeroed output convolution hides the masks from the first loss.
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    reference = weights_after_one_step(global_seed=1, step_seed=7)
    assert torch.equal(weights_after_one_step(global_seed=2, step_seed=7), reference)
    assert not torch.equal(weights_after_one_step(global_seed=1, step_seed=8), reference)


def test_the_chain_is_scored_on_held_out_captions_and_their_real_images(latents):
    config = load_config("tiny", [*SMALL_DATA[1::2], *RANDOM_ENCODERS[1::2], f"work_dir={latents}"])
    shards = sorted(read_manifest(str(latents / "pre_encode")).shards)
    held_out = held_out_captions(str(latents / "pre_encode"), str(latents / "decode"), shards, 5, config.storage)
    rows = [
        row
        for shard in shards
        for row in pq.read_table(latents / "pre_encode" / f"{shard}.parquet").to_pylist()
        if row[schema.SPLIT] == "validation"
    ]
    assert held_out.captions == tuple(row[schema.CAPTION] for row in rows[:5])
    real = real_images(held_out, config.generate.size)
    assert len(real) == 5 and all(image.size == (config.generate.size,) * 2 for image in real)

    evaluation = ChainEvaluation(held_out=held_out, sample=config.generate, embed=config.embed, models="tiny")
    scorer, models = _chain_scorer(evaluation)
    first, again = scorer(models), scorer(models)
    assert first == again  # fixed captions, seed and real statistics: a property of the weights
    assert set(first) == {"eval/clip_score", "eval/fid", "eval/colour_accuracy"}
    assert 0 <= first["eval/clip_score"] <= 100 and first["eval/fid"] > 0 and 0 <= first["eval/colour_accuracy"] <= 1

    # Two ranks share the captions' chunks (RENDER_CHUNK 4: captions 0-3 on rank 0, caption 4 on
    # rank 1) and rank 0 gets the figures one process gets: each chunk has its own seed.
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    ranks = [context.Process(target=_score_chain_as_rank, args=(rank, address, evaluation, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    shared = dict(results.get(timeout=300) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert shared[1] == {}
    assert shared[0] == pytest.approx(first, rel=1e-9)


def _chain_scorer(evaluation: ChainEvaluation) -> tuple[ChainScorer, Wuerstchen]:
    """A scorer and a tiny chain, both drawn from seed 0 (the scorer's CLIP and feature models at its first call)."""
    torch.manual_seed(0)
    models = build_models("tiny")
    for module in (models.text_c, models.stage_c, models.text_b, models.stage_b, models.stage_a):
        module.eval()
    return ChainScorer(evaluation, torch.device("cpu")), models


def _score_chain_as_rank(rank: int, address: str, evaluation: ChainEvaluation, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    try:
        scorer, models = _chain_scorer(evaluation)
        results.put((rank, scorer(models, shared=True)))
    finally:
        torch.distributed.destroy_process_group()


def test_a_state_read_with_the_ema_swapped_in_keeps_the_ema_after_the_swap():
    # On CPU without FSDP the state dict would hold the parameters themselves, and checkpoints and
    # exported weights the trained weights where the EMA belongs.
    model = torch.nn.Linear(3, 2)
    ema = [torch.zeros_like(p) for p in model.parameters()]
    with swapped_in(model, ema):
        state = full_state(model)
    assert all(value.abs().sum() == 0 for value in state.values())
    assert model.weight.abs().sum() > 0
