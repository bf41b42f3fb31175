"""Training on Ray Train (2 CPU workers, tiny configs): resume, budgets, a killed job.

Learning, checkpoints and logged weights of every stage are checked on the end-to-end run (test_full).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines import full, trained_weights

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = ["--set", "data.demo.num_shards=2", "--set", "data.demo.samples_per_shard=24"]
# Random encoders: trained ones are test_full's subject, and their training would double the set-up.
RANDOM_ENCODERS = ["--set", "pre_encode.stage_a_weights=", "--set", "pre_encode.semantic_weights="]


def _main(work_dir: Path, *args: str) -> None:
    full.main(["--set", f"work_dir={work_dir}", *SMALL_DATA, *RANDOM_ENCODERS, *args])


def _client(work_dir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{work_dir}/mlflow.db")


def _phase_runs(work_dir: Path, phase: str):
    client = _client(work_dir)
    runs = client.search_runs(["1"], filter_string=f"attributes.run_name = '{phase}'",
                              order_by=["attributes.start_time ASC"])
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


def test_budgets_stop_a_run_with_a_checkpoint_and_refuse_one_that_cannot_fit(latents, tmp_path, capsys):
    work_dir = _fresh_copy(latents, tmp_path)
    budget = 0.004  # worker-hours: ~7 s of wall time for 2 workers
    _main(work_dir, "--phases", "train_stage_c,generate", "--set", "train_c.steps=100000",
          "--set", f"train_c.budget_gpu_hours={budget}", "--set", "train_c.log_every_seconds=0")
    assert "stopped before: generate" in capsys.readouterr().err
    client, (run,) = _phase_runs(work_dir, "train_stage_c")
    assert "GPU-hour budget reached" in run.data.tags["stop_reason"]
    assert run.data.params["budget_gpu_hours"] == str(budget)
    used = run.data.metrics["gpu_hours"]
    assert 0.5 * budget < used < 1.5 * budget
    assert run.data.metrics["gpu_hours_remaining"] == pytest.approx(max(budget - used, 0), abs=1e-9)
    stopped_at = int(run.data.metrics["final_step"])
    assert 0 < stopped_at < 100000
    assert list((work_dir / "train_stage_c" / "ray").glob("*/checkpoint_*/model.safetensors"))
    assert not (work_dir / "train_stage_c" / trained_weights.FINAL_FILE).exists()

    # Resubmitted with a larger budget and a reachable length: continues the step count and the
    # loss curve (the resumed losses are those of a trained model, not of a fresh one).
    _main(work_dir, "--phases", "train_stage_c", "--set", f"train_c.steps={stopped_at + 20}",
          "--set", "train_c.budget_gpu_hours=1", "--set", "train_c.log_every_seconds=0")
    client, (stopped, resumed) = _phase_runs(work_dir, "train_stage_c")
    before, after = _loss_history(client, stopped.info.run_id), _loss_history(client, resumed.info.run_id)
    assert after[0][0] == stopped_at + 1 and after[-1][0] == stopped_at + 20
    assert np.mean([loss for _, loss in after[:5]]) < 0.5 * np.mean([loss for _, loss in before[:5]])
    assert (work_dir / "train_stage_c" / trained_weights.FINAL_FILE).is_file()

    # The experiment's budget counts both runs; a new run that cannot fit refuses to start.
    used = sum(r.data.metrics.get("gpu_hours", 0) for r in client.search_runs(["1"]))
    with pytest.raises(SystemExit, match="nothing is left"):
        _main(work_dir, "--phases", "train_stage_b", "--set", f"tracking.experiment_budget_gpu_hours={used / 2}")
    with pytest.raises(SystemExit, match=r"train_b.budget_gpu_hours \(5 GPU-hours\) does not fit"):
        _main(work_dir, "--phases", "train_stage_b", "--set", f"tracking.experiment_budget_gpu_hours={used + 1}",
              "--set", "train_b.budget_gpu_hours=5")
    assert not list((work_dir / "train_stage_b").glob("ray/*/checkpoint_*/model.safetensors"))


def test_a_batch_larger_than_the_training_set_refuses_to_start(latents, tmp_path):
    work_dir = _fresh_copy(latents, tmp_path)
    with pytest.raises(SystemExit, match=r"train_b.global_batch_size \(1000\) is larger than the training set"):
        _main(work_dir, "--phases", "train_stage_b", "--set", "train_b.global_batch_size=1000")


def test_a_killed_job_resubmitted_continues_from_its_last_checkpoint(latents, tmp_path):
    work_dir = _fresh_copy(latents, tmp_path)
    args = [sys.executable, "pipelines/full.py", "--set", f"work_dir={work_dir}", *SMALL_DATA, *RANDOM_ENCODERS,
            "--phases", "train_stage_c", "--set", "train_c.checkpoint_every=10", "--set", "train_c.log_every_seconds=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    driver = subprocess.Popen([*args, "--set", "train_c.steps=100000"], cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if len(list((work_dir / "train_stage_c").glob("ray/*/checkpoint_*/model.safetensors"))) >= 2:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    client, (killed,) = _phase_runs(work_dir, "train_stage_c")
    logged_before_kill = max(step for step, _ in _loss_history(client, killed.info.run_id))

    result = subprocess.run([*args, "--set", f"train_c.steps={logged_before_kill + 30}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client, (_, resumed) = _phase_runs(work_dir, "train_stage_c")
    first_step = _loss_history(client, resumed.info.run_id)[0][0]
    # From the last complete checkpoint (every 10 steps), never from scratch and never past what was saved.
    assert logged_before_kill - 20 < first_step <= logged_before_kill + 1 and (first_step - 1) % 10 == 0
    assert (work_dir / "train_stage_c" / trained_weights.FINAL_FILE).is_file()
