"""MLflow, behind the few calls the pipeline makes, so tests can point it at a store in a temp dir.

One parent run per ``full.py`` invocation, one child run per phase. By default the store is a
SQLite file inside the run's work directory and artifacts sit beside it, so the embedded default
needs no server; ``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` points at a real one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_BATCH = 100  # MLflow's limit of params or metrics per log_batch call
# GPU-hours one attempt held (a phase run, Ray Train's restarts of its workers included): what totals
# and budgets add up, each attempt once. Training runs log their total over all attempts as RUN_GPU_HOURS.
ATTEMPT_GPU_HOURS = "gpu_hours_attempt"
RUN_GPU_HOURS = "gpu_hours"
CHECKPOINTS_TAG = "train.checkpoints"  # where a training run's checkpoints live: the run its attempts belong to
OUTPUT_TAG = "phase.output"  # a data phase's output folder and settings: the run its budgeted attempts belong to


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Where runs are recorded."""

    experiment: str = "wuerstchen-ray"
    """MLflow experiment that holds the runs."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else SQLite inside the work dir."""
    experiment_budget_gpu_hours: float | None = None
    """GPU-hours all runs of the experiment may use together; none: no limit."""

    def __post_init__(self):
        if not self.experiment.strip():
            raise ValueError("experiment must not be empty")
        if self.experiment_budget_gpu_hours is not None and self.experiment_budget_gpu_hours <= 0:
            raise ValueError(f"experiment_budget_gpu_hours must be > 0 or none, got {self.experiment_budget_gpu_hours}")


def resolve_store(config: TrackingConfig, work_dir: str) -> tuple[str, str | None]:
    """The tracking URI and, for the embedded SQLite store, the artifact location beside it."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    if "://" in work_dir:
        raise ValueError(
            f"work_dir {work_dir!r} is remote, so the embedded SQLite store cannot live there: "
            "set tracking.tracking_uri or $MLFLOW_TRACKING_URI to your MLflow server"
        )
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(work_dir).resolve() / DB_FILE}", (Path(work_dir).resolve() / ARTIFACTS_DIR).as_uri()


class TrackedRun:
    """One MLflow run: what a phase or the pipeline logs into."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        timestamp = int(time.time() * 1000)
        items = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + _BATCH])

    def latest_metric(self, key: str) -> float | None:
        """The last value logged for ``key``; None if none was."""
        return self.client.get_run(self.run_id).data.metrics.get(key)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image as a PNG artifact."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, local_path: str, artifact_path: str) -> None:
        """A local file under the run's ``artifact_path`` folder."""
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, sessions, an assistant);
# with it, as model training: runs, their metrics and artifacts.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    """Opens runs in one experiment of one store."""

    def __init__(self, config: TrackingConfig, work_dir: str):
        self.uri, artifact_location = resolve_store(config, work_dir)
        # MLflow logs every schema migration of a fresh SQLite store at INFO.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(config.experiment)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                config.experiment, artifact_location=artifact_location, tags={EXPERIMENT_KIND: MODEL_TRAINING}
            )
        else:
            self.experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND not in experiment.tags:  # made before the tag was set; a user's own choice stays
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)

    @contextlib.contextmanager
    def run(self, name: str, parent: TrackedRun | None = None) -> Iterator[TrackedRun]:
        """A run that ends FINISHED when the block completes, FAILED or KILLED when it does not."""
        tags = {MLFLOW_PARENT_RUN_ID: parent.run_id} if parent is not None else {}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        status = RunStatus.FAILED
        try:
            yield TrackedRun(self.client, run.info.run_id)
            status = RunStatus.FINISHED
        except KeyboardInterrupt:
            status = RunStatus.KILLED
            raise
        finally:
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(status))

    def gpu_hours(self, checkpoints: str = "", output: str = "") -> float:
        """GPU-hours of every attempt in the experiment so far, each counted once; with ``checkpoints``,
        of the attempts of the training run whose checkpoints live there; with ``output``, of the
        attempts of a data phase at that output (``OUTPUT_TAG``)."""
        condition = f"metrics.{ATTEMPT_GPU_HOURS} >= 0"
        if checkpoints:
            condition += f" and tags.`{CHECKPOINTS_TAG}` = '{checkpoints}'"
        if output:
            condition += f" and tags.`{OUTPUT_TAG}` = '{output}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=condition, max_results=50_000)
        return sum(run.data.metrics[ATTEMPT_GPU_HOURS] for run in runs)

    def ui_command(self) -> str:
        """How a person opens this store in the MLflow UI."""
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        return f"open {self.uri} in a browser"


def connect(tracking_uri: str, run_id: str) -> TrackedRun:
    """A run the driver opened, for a worker process to log into (Ray Train's rank 0)."""
    return TrackedRun(MlflowClient(tracking_uri), run_id)
