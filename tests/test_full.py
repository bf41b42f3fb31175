"""``pipelines/full.py`` end to end, as a user runs it: a subprocess, a local Ray, a local MLflow store."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image

from pipelines import demo_data, evaluate, sample, trained_weights
from pipelines.config import load_config
from pipelines.decode import DECODE_REASONS
from pipelines.metadata_filter import METADATA_REASONS
from pipelines.phases import PHASES
from pipelines.trainable import REGISTRY
from pipelines.trainable.text_conditioned import VALIDATION_TIMES
from stages.stage_b import STAGE_B_CONFIGS, StageB
from stages.stage_c import STAGE_C_CONFIGS, StageC

ROOT = Path(__file__).resolve().parents[1]
# Every test here reads the demo's whole run (several minutes on 2 cores): `make test-slow` runs
# them; a user's mistakes, which stop before any work, are checked fast in test_user_errors.py.
pytestmark = pytest.mark.slow


# A guard against a hung run, not a speed check: the demo took about 6.5 minutes on the 2-core
# machines of earlier sessions and 11.3 on a 2-core AMD EPYC with AVX2 (2026-12-02).
def run_full(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "pipelines/full.py", *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("full") / "work"
    result = run_full("--set", f"work_dir={work_dir}")
    assert result.returncode == 0, result.stderr[-4000:]
    return work_dir, result


def _runs(work_dir: Path):
    client = MlflowClient(f"sqlite:///{work_dir}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "wuerstchen-ray"]
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def _ran(runs, phase: str) -> list:
    """The runs of ``phase`` that did its work (a later run skips it)."""
    return [r for r in runs if r.info.run_name == phase and r.data.tags.get("phase.outcome") == "ran"]


def test_no_arguments_runs_the_built_phases_on_the_demo_data(first_run):
    work_dir, result = first_run
    assert demo_data.is_complete(str(work_dir / "demo_data"))
    assert (work_dir / "metadata_filter" / "manifest.json").is_file()
    assert (work_dir / "decode" / "manifest.json").is_file()
    assert f"ran: {', '.join(PHASES)}" in result.stderr
    assert f"mlflow ui --backend-store-uri sqlite:///{work_dir}/mlflow.db" in result.stderr
    # Ray's own INFO lines stay off the console unless ray.log_level asks for them.
    console = result.stdout + result.stderr
    for ray_detail in (
        "Execution plan of Dataset",
        "Started training worker group",
        "Reporting training result",
        "Checkpoint successfully created",
        "Moving model to device",
    ):
        assert ray_detail not in console, ray_detail
    steps = load_config("tiny", []).train_c.steps
    assert f"step {steps}/{steps} " in console  # the loop's own progress lines stay


def test_mlflow_holds_a_parent_run_a_phase_run_and_the_ground_truth_counts(first_run):
    work_dir, _ = first_run
    client, runs = _runs(work_dir)
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    assert len(parents) == 1 and [c.info.run_name for c in children] == list(PHASES)
    parent, child, decode_run = parents[0], children[0], children[1]
    assert child.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
    assert parent.info.status == child.info.status == "FINISHED"
    assert parent.data.params["config"] == "tiny"
    config = load_config("tiny", [])
    assert parent.data.params["filter.min_side"] == str(config.filter.min_side)
    assert parent.data.params["work_dir"] == str(work_dir)
    assert client.download_artifacts(parent.info.run_id, "config.json")
    # MLflow's UI opens it as model training, not in its GenAI view
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert child.data.params["filter.min_aesthetic"] == str(config.filter.min_aesthetic)

    truth = demo_data.load_ground_truth(str(work_dir / "demo_data"))["samples"]
    dropped = [r["expected"] for r in truth.values() if r["phase"] == "metadata"]
    metrics = child.data.metrics
    assert metrics["samples_in"] == len(truth)
    assert metrics["kept"] == len(truth) - len(dropped)
    for reason in METADATA_REASONS:
        assert metrics[f"dropped/{reason}"] == dropped.count(reason), reason
    assert Path(client.download_artifacts(child.info.run_id, "manifest.json")).is_file()

    decode_metrics = decode_run.data.metrics
    decoded = [r["expected"] for r in truth.values() if r["phase"] == "decode" and r["expected"] != demo_data.KEEP]
    assert decode_metrics["samples_in"] == metrics["kept"]
    assert decode_metrics["kept"] == metrics["kept"] - len(decoded)
    for reason in DECODE_REASONS:
        assert decode_metrics[f"dropped/{reason}"] == decoded.count(reason), reason
    assert decode_run.data.params["decode.resolution"] == str(config.decode.resolution)


def test_a_second_run_skips_the_finished_phase(first_run):
    work_dir, _ = first_run
    result = run_full("--set", f"work_dir={work_dir}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("skipped: output already complete") == len(PHASES)
    _, runs = _runs(work_dir)
    latest_phase = [r for r in runs if r.info.run_name == "metadata_filter"][-1]
    assert latest_phase.data.tags["phase.outcome"] == "skipped: output already complete"
    assert latest_phase.data.metrics["samples_in"] == len(
        demo_data.load_ground_truth(str(work_dir / "demo_data"))["samples"]
    )


@pytest.mark.parametrize(
    "phase, model",
    [
        ("train_stage_a", None),
        ("train_semantic", None),
        ("train_stage_b", StageB(STAGE_B_CONFIGS["tiny"]())),
        ("train_stage_c", StageC(STAGE_C_CONFIGS["tiny"]())),
    ],
)
def test_each_stage_learns_checkpoints_and_logs_loadable_weights(first_run, phase, model):
    work_dir, _ = first_run
    client, runs = _runs(work_dir)
    (run,) = _ran(runs, phase)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history[0][0] == 1, history  # the curve starts at the first step, however fast the machine
    losses = [loss for _, loss in history]
    assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0], losses
    for name in (
        "lr",
        "grad_norm",
        "samples_per_second",
        "data_wait_fraction",
        "gpu_hours",
        "eta_seconds",
        "flops_per_sample",
    ):
        assert name in run.data.metrics, name
    assert run.data.metrics["mfu"] > 0  # against the workers' measured fp32 matrix-product rate
    assert run.data.tags["mfu.peak_basis"].startswith("CPU fp32 matrix products measured"), run.data.tags
    assert 0 <= run.data.metrics["data_wait_fraction"] <= 1
    config = getattr(load_config("tiny", []), REGISTRY[phase.removeprefix("train_")].config_section)
    assert float(run.data.params["units_held"]) == config.units_held
    checkpoints = list((work_dir / phase / "ray").glob("*/checkpoint_*/state.json"))
    assert 1 <= len(checkpoints) <= config.keep_checkpoints, checkpoints
    # Every stage's held-out loss, every eval_every steps and at the end, falling.
    validation = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
    assert [step for step, _ in validation] == list(range(config.eval_every, config.steps + 1, config.eval_every))
    assert validation[-1][1] < validation[0][1], validation
    if phase == "train_stage_a":
        assert {"val/reconstruction", "val/quantisation"} <= set(run.data.metrics)
    if model is not None:  # the latent stages: the loss at each fixed time beside it
        assert validation[-1][1] < 0.8 * validation[0][1], validation
        assert sum(name.startswith("val/loss_r") for name in run.data.metrics) == VALIDATION_TIMES
        stage = phase.removeprefix("train_")
        trained_weights.load_from_mlflow(
            model, run.info.run_id, f"sqlite:///{work_dir}/mlflow.db", f"weights/{stage}.safetensors"
        )
        # The run logged the weights the phase exported, which later phases and generate load.
        exported = copy.deepcopy(model)
        trained_weights.load(exported, str(work_dir / phase / trained_weights.FINAL_FILE))
        for (name, logged), written in zip(model.state_dict().items(), exported.state_dict().values()):
            assert torch.equal(logged, written), name
    if phase == "train_stage_c":  # the chain on held-out captions at each evaluation: its colours improve
        chain = {
            name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"eval/{name}"))
            for name in ("clip_score", "fid", "colour_accuracy")
        }
        assert all(len(history) == len(validation) for history in chain.values()), chain
        accuracy = [value for _, value in chain["colour_accuracy"]]
        assert accuracy[-1] > accuracy[0], accuracy
        # Its grid is rendered through the trained Stage B and Stage A.
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        last_step = load_config("tiny", []).train_c.steps  # the grid logged at the end of training
        assert f"samples/step_{last_step:07d}.png" in artifacts


def test_the_trained_chain_draws_the_colour_the_prompt_names(first_run):
    """Learning, measured: text -> Stage C (guidance) -> Stage B -> Stage A, 16 prompts per colour."""
    work_dir, _ = first_run
    client, runs = _runs(work_dir)
    (generate,) = _ran(runs, "generate")
    metrics = generate.data.metrics
    per_colour = {name: value for name, value in metrics.items() if name.startswith("colour_accuracy/")}
    assert len(per_colour) == 4
    assert metrics["colour_accuracy"] >= 0.6, metrics  # chance is 0.25
    assert sum(value >= 0.5 for value in per_colour.values()) >= 3, metrics
    assert metrics["empty_prompt_colour_accuracy"] <= 0.4, metrics
    assert metrics["colour_accuracy"] - metrics["empty_prompt_colour_accuracy"] >= 0.3, metrics
    artifacts = [a.path for a in client.list_artifacts(generate.info.run_id)]
    assert "samples.png" in artifacts and "samples_empty_prompt.png" in artifacts


def test_the_demo_runs_chain_can_be_sampled_later(first_run, tmp_path):
    work_dir, _ = first_run
    _, runs = _runs(work_dir)
    parent = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags][0]  # the run that trained
    prompt = "a red circle on a white background"
    sample.main(
        [
            "--run",
            parent.info.run_id,
            "--tracking-uri",
            f"sqlite:///{work_dir}/mlflow.db",
            "--size",
            "64",
            "--prompt",
            prompt,
            "--out",
            str(tmp_path),
        ]
    )
    (image,) = [np.asarray(Image.open(path)) for path in tmp_path.glob("*.png")]
    assert image.shape == (64, 64, 3)
    _, runs = _runs(work_dir)
    (logged,) = [r for r in runs if r.info.run_name == sample.RUN_NAME]
    assert logged.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
    assert logged.data.params["weights.stage_b"] == f"{work_dir}/train_stage_b/final.safetensors"


def test_the_demo_runs_chain_evaluated_later_scores_what_training_logged_last(first_run, capsys, local_ray):
    work_dir, _ = first_run
    client, runs = _runs(work_dir)
    parent = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags][0]
    # evaluate reads the held-out rows with Ray Data: on the session's Ray (local_ray), not on one it
    # would start itself and leave running for the tests after it.
    evaluate.main(["--run", parent.info.run_id, "--tracking-uri", f"sqlite:///{work_dir}/mlflow.db"])
    printed = capsys.readouterr().out
    assert "eval/colour_accuracy" in printed and "stage_c/val/loss" in printed
    _, runs = _runs(work_dir)
    (logged,) = [r for r in runs if r.info.run_name == evaluate.RUN_NAME]
    assert logged.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
    assert logged.data.params["captions"] == "16" and logged.data.params["fid_features"] == "tiny"
    # The exported weights are the EMA that Stage C's last evaluation scored, on the same captions.
    (stage_c,) = _ran(runs, "train_stage_c")
    for name in ("eval/clip_score", "eval/fid", "eval/colour_accuracy"):
        assert logged.data.metrics[name] == pytest.approx(stage_c.data.metrics[name], rel=1e-3, abs=1e-6), name
    # And each stage's held-out loss, on the rows its training evaluated on; the semantic compressor's
    # is left out, its probe not exported.
    for phase in ("train_stage_a", "train_stage_b", "train_stage_c"):
        (trained,) = _ran(runs, phase)
        history = client.get_metric_history(trained.info.run_id, "val/loss")
        last = max(history, key=lambda metric: metric.step).value
        stage = phase.removeprefix("train_")
        assert logged.data.metrics[f"{stage}/val/loss"] == pytest.approx(last, rel=1e-4), stage
    assert not any(name.startswith("semantic/") for name in logged.data.metrics)

    with pytest.raises(SystemExit, match="no MLflow run 'nope'"):
        evaluate.main(["--run", "nope", "--tracking-uri", f"sqlite:///{work_dir}/mlflow.db"])
    with pytest.raises(SystemExit, match="is it a 'tiny' checkpoint of that stage"):
        evaluate.main(
            [
                "--run",
                parent.info.run_id,
                "--tracking-uri",
                f"sqlite:///{work_dir}/mlflow.db",
                "--weights",
                f"stage_c={work_dir}/train_stage_b/final.safetensors",
            ]
        )


def test_stage_c_continued_under_fsdp_scores_the_chain_as_its_exported_weights_score(first_run, capsys, local_ray):
    """Under FSDP the chain renders on rank 0 through an unsharded copy of the EMA gathered from both
    ranks: its scores must be those of the weights the run exports."""
    work_dir = first_run[0].parent / "fsdp"
    shutil.copytree(first_run[0], work_dir)  # the other tests read the demo's run as it ended
    steps = load_config("tiny", []).train_c.steps
    result = run_full(
        "--set",
        f"work_dir={work_dir}",
        "--phases",
        "train_stage_c",
        "--set",
        f"train_c.steps={steps + 1}",
        "--set",
        "train_c.strategy=fsdp",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    client, runs = _runs(work_dir)
    continued = _ran(runs, "train_stage_c")[-1]
    assert continued.data.params["train_c.strategy"] == "fsdp"
    assert continued.data.tags["resume.step"] == str(steps)  # one step on FSDP, from the DDP run's end
    scored = {m.step: m.value for m in client.get_metric_history(continued.info.run_id, "eval/clip_score")}
    assert list(scored) == [steps + 1], scored
    parent = continued.data.tags[MLFLOW_PARENT_RUN_ID]
    evaluate.main(["--run", parent, "--tracking-uri", f"sqlite:///{work_dir}/mlflow.db"])
    assert "eval/colour_accuracy" in capsys.readouterr().out
    _, runs = _runs(work_dir)
    (logged,) = [
        r for r in runs if r.info.run_name == evaluate.RUN_NAME and r.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    ]
    for name in ("eval/clip_score", "eval/fid", "eval/colour_accuracy"):
        assert logged.data.metrics[name] == pytest.approx(continued.data.metrics[name], rel=1e-3, abs=1e-6), name
