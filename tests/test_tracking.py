"""pipelines/tracking.py: the experiment a run lands in opens in MLflow's UI as model training."""

from __future__ import annotations

import pytest

from pipelines.tracking import EXPERIMENT_KIND, MODEL_TRAINING, Tracker, TrackingConfig


@pytest.fixture
def work_dir(tmp_path, monkeypatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded SQLite store in the work dir
    return str(tmp_path / "work")


def test_a_new_experiment_and_one_made_without_the_tag_open_as_model_training(work_dir: str) -> None:
    tracker = Tracker(TrackingConfig(experiment="fresh"), work_dir)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND] == MODEL_TRAINING

    older = tracker.client.create_experiment("older")
    assert EXPERIMENT_KIND not in tracker.client.get_experiment(older).tags
    Tracker(TrackingConfig(experiment="older"), work_dir)
    assert tracker.client.get_experiment(older).tags[EXPERIMENT_KIND] == MODEL_TRAINING


def test_a_kind_the_user_chose_stays(work_dir: str) -> None:
    tracker = Tracker(TrackingConfig(experiment="mine"), work_dir)
    tracker.client.set_experiment_tag(tracker.experiment_id, EXPERIMENT_KIND, "genai_development")
    Tracker(TrackingConfig(experiment="mine"), work_dir)
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND] == "genai_development"
