"""``python -m pipelines.sample``: a pipeline run's chain (or weights given per stage) rendered later,
written as PNGs and logged to MLflow; each kind of bad input to it and to ``python -m
pipelines.evaluate`` refused with one message (the demo's run evaluated later is in test_full.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image

from pipelines import evaluate, sample, trained_weights
from pipelines.generate_phase import render
from pipelines.storage import StorageConfig
from stages.stage_a import STAGE_A_CONFIGS, StageA
from stages.stage_b import STAGE_B_CONFIGS, StageB
from stages.stage_c import STAGE_C_CONFIGS, StageC

STORAGE = StorageConfig()
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
MODELS = {
    "stage_c": lambda: StageC(STAGE_C_CONFIGS["tiny"]()),
    "stage_b": lambda: StageB(STAGE_B_CONFIGS["tiny"]()),
    "stage_a": lambda: StageA(STAGE_A_CONFIGS["tiny"]()),
}


@pytest.fixture
def pipeline_run(tmp_path):
    """A work dir holding each trained stage's final weights as the training phases write them, and the
    pipeline run that full.py records for it."""
    work_dir = tmp_path / "work"
    torch.manual_seed(1)
    for stage, build in MODELS.items():
        trained_weights.write(
            f"{work_dir}/train_{stage}/{trained_weights.FINAL_FILE}",
            build().state_dict(),
            {"models": "tiny"},
            StorageConfig(),
        )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("wuerstchen-ray"), run_name="full-tiny").info.run_id
    for key, value in {
        "work_dir": str(work_dir),
        "pre_encode.models": "tiny",
        "pre_encode.stage_a_weights": "trained",
    }.items():
        client.log_param(run_id, key, value)
    return uri, run_id, work_dir


def _weights(work_dir) -> dict[str, str]:
    return {stage: f"{work_dir}/train_{stage}/{trained_weights.FINAL_FILE}" for stage in MODELS}


def _pngs(folder) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))]


def test_a_pipeline_runs_chain_is_rendered_written_and_logged(pipeline_run, tmp_path):
    uri, run_id, work_dir = pipeline_run
    sample.main(
        [
            "--run",
            run_id,
            "--tracking-uri",
            uri,
            "--size",
            "64",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "out"),
            *[arg for prompt in PROMPTS for arg in ("--prompt", prompt)],
        ]
    )
    expected = render("tiny", _weights(work_dir), STORAGE, PROMPTS, 64, 4.0, 3)
    written = _pngs(tmp_path / "out")
    assert len(written) == 2 and all(np.array_equal(w, e) for w, e in zip(written, expected))
    # Another decoder draws other images: the run's files were the ones loaded. (A fresh Stage C
    # would not show it: its zeroed output layer predicts no noise whatever its other weights.)
    torch.manual_seed(2)
    other = tmp_path / "other.safetensors"
    trained_weights.write(str(other), MODELS["stage_a"]().state_dict(), {}, StorageConfig())
    other_decoder = {**_weights(work_dir), "stage_a": str(other)}
    assert not np.array_equal(render("tiny", other_decoder, STORAGE, PROMPTS[:1], 64, 4.0, 3)[0], expected[0])

    client = MlflowClient(uri)
    (logged,) = [
        r for r in client.search_runs([client.get_run(run_id).info.experiment_id]) if r.info.run_name == sample.RUN_NAME
    ]
    assert logged.data.tags[MLFLOW_PARENT_RUN_ID] == run_id and logged.info.status == "FINISHED"
    assert logged.data.params["weights.stage_c"] == _weights(work_dir)["stage_c"]
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)} | {
        a.path for a in client.list_artifacts(logged.info.run_id, "images")
    }
    assert {"samples.png", "images/000.png", "images/001.png"} <= artifacts
    image = np.asarray(Image.open(client.download_artifacts(logged.info.run_id, "images/001.png", str(tmp_path))))
    assert np.array_equal(image, expected[1])


def test_weights_given_per_stage_need_no_run(pipeline_run, tmp_path):
    _, _, work_dir = pipeline_run
    sample.main(
        [
            "--models",
            "tiny",
            "--size",
            "64",
            "--out",
            str(tmp_path / "out"),
            "--prompt",
            PROMPTS[0],
            *[arg for stage, path in _weights(work_dir).items() for arg in ("--weights", f"{stage}={path}")],
        ]
    )
    expected = render("tiny", _weights(work_dir), STORAGE, PROMPTS[:1], 64, 4.0, 0)
    assert np.array_equal(_pngs(tmp_path / "out")[0], expected[0])


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown run", "no MLflow run 'feedbeef'"),
        ("a Stage B file as Stage C", "do not fit StageC"),
        ("Stage B never trained", "stage_b weights not found at"),
        ("no run, no sizes", "name the model sizes with --models"),
        ("a bad --weights", "--weights takes STAGE=PATH_OR_URL"),
    ],
)
def test_bad_input_gets_one_message(pipeline_run, tmp_path, capsys, case, message):
    uri, run_id, work_dir = pipeline_run
    args = ["--tracking-uri", uri, "--size", "64", "--prompt", PROMPTS[0]]
    weights = _weights(work_dir)
    args += {
        "unknown run": ["--run", "feedbeef"],
        "a Stage B file as Stage C": ["--run", run_id, "--weights", f"stage_c={weights['stage_b']}"],
        "Stage B never trained": ["--run", run_id],
        "no run, no sizes": ["--weights", f"stage_c={weights['stage_c']}"],
        "a bad --weights": ["--run", run_id, "--weights", "stage_d=x.safetensors"],
    }[case]
    if case == "Stage B never trained":
        (work_dir / "train_stage_b" / trained_weights.FINAL_FILE).unlink()
    with pytest.raises(SystemExit) as stop:
        sample.main(args)
    assert message in str(stop.value) and "\n" not in str(stop.value), stop.value
    if case == "Stage B never trained":
        assert "--weights stage_b=PATH" in str(stop.value)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown run", "no MLflow run 'feedbeef'"),
        ("no store", "--run needs the MLflow store that holds it"),
        ("too few captions", "--captions must be at least 2"),
        ("no held-out split", "has no finished pre_encode phase"),
    ],
)
def test_bad_input_to_evaluate_gets_one_message(pipeline_run, monkeypatch, case, message):
    uri, run_id, _ = pipeline_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = {
        "unknown run": ["--run", "feedbeef", "--tracking-uri", uri],
        "no store": ["--run", run_id],
        "too few captions": ["--run", run_id, "--tracking-uri", uri, "--captions", "1"],
        "no held-out split": ["--run", run_id, "--tracking-uri", uri],
    }[case]
    with pytest.raises(SystemExit) as stop:
        evaluate.main(args)
    assert message in str(stop.value) and "\n" not in str(stop.value), stop.value
