"""GPU-hour arithmetic, without Ray: the meter of an attempt, a run's budget, the sums over attempts."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.budget import BudgetMeter, gpu_hours, run_budget
from pipelines import schema, shard_phase
from pipelines.tracking import ATTEMPT_GPU_HOURS, CHECKPOINTS_TAG, OUTPUT_TAG, RUN_GPU_HOURS, Tracker, TrackingConfig


class _Clock:
    """Seconds that advance ``tick`` per read: the meter reads once at its start and once per lap."""

    def __init__(self, tick: float):
        self.tick, self.now = tick, 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _steps_until_stop(meter: BudgetMeter, most: int = 1000) -> int:
    """Steps a training loop makes under ``meter``: it checks the next step fits, steps, laps."""
    steps, step_seconds = 0, 0.0
    while steps < most and meter.next_step_fits(step_seconds):
        steps += 1
        step_seconds = meter.lap()
    return steps


def test_an_attempt_counts_its_own_laps_and_the_run_adds_its_earlier_attempts():
    meter = BudgetMeter(units_held=4, budget=None, used_before=1.5, clock=_Clock(900))  # 1 GPU-hour per lap
    assert meter.attempt() == 0 and meter.used() == 1.5  # the start is read, nothing held yet
    assert meter.lap() == 900
    meter.lap()
    assert meter.attempt() == 2 and meter.used() == 3.5
    assert meter.remaining() is None
    # Ray Train restarted the workers: the attempt goes on from what it had counted.
    restarted = BudgetMeter(units_held=4, budget=None, used_before=1.5, attempt_before=2, clock=_Clock(900))
    restarted.lap()
    assert restarted.attempt() == 3 and restarted.used() == 4.5


def test_a_budget_stops_before_the_step_that_would_exceed_it():
    # 2 workers x 1.8 s per step: 0.001 worker-hours a step.
    assert gpu_hours(2, 1.8) == pytest.approx(0.001)
    meter = BudgetMeter(units_held=2, budget=0.0055, clock=_Clock(1.8))
    assert _steps_until_stop(meter) == 5
    assert meter.used() == pytest.approx(0.005) and meter.remaining() == pytest.approx(0.0005)
    # Resumed with the budget raised: the earlier attempt counts towards it, once.
    resumed = BudgetMeter(units_held=2, budget=0.0105, used_before=meter.used(), clock=_Clock(1.8))
    assert _steps_until_stop(resumed) == 5
    assert resumed.attempt() == pytest.approx(0.005) and resumed.used() == pytest.approx(0.010)
    # An attempt knows no step's cost before its first: it makes one if the run is under its budget,
    # none once the run has used it all.
    assert (
        _steps_until_stop(BudgetMeter(units_held=2, budget=0.0105, used_before=resumed.used(), clock=_Clock(1.8))) == 1
    )
    assert _steps_until_stop(BudgetMeter(units_held=2, budget=0.0105, used_before=0.0105, clock=_Clock(1.8))) == 0


def test_a_run_budget_without_an_experiment_budget_is_the_runs_own():
    budget = run_budget(run_budget=3, experiment_budget=None, experiment_used=100, run_used=2, setting="train_c.x")
    assert (budget.limit, budget.setting) == (3, "train_c.x")
    assert run_budget(run_budget=None, experiment_budget=None, experiment_used=0, run_used=0, setting="s").limit is None


def test_a_resumed_run_under_an_experiment_budget_gets_what_is_left_once():
    # The case: 10 GPU-hours for the experiment; a run stopped at 4 by its own budget and
    # resumed without one may go to 10 in all (6 more), not to 6 in all.
    budget = run_budget(run_budget=None, experiment_budget=10, experiment_used=4, run_used=4, setting="train_c.x")
    assert (budget.limit, budget.setting) == (10, "tracking.experiment_budget_gpu_hours")
    # Another run used 3 of the experiment's 10 as well: this one may go to 4 + 3.
    assert run_budget(run_budget=None, experiment_budget=10, experiment_used=7, run_used=4, setting="s").limit == 7


def test_a_run_budget_counts_the_runs_earlier_attempts_against_what_the_experiment_has_left():
    # 6 for the run, 4 of them spent: 2 more fit in the 3 the experiment has left.
    budget = run_budget(run_budget=6, experiment_budget=10, experiment_used=7, run_used=4, setting="train_c.x")
    assert (budget.limit, budget.setting) == (6, "train_c.x")
    with pytest.raises(
        ValueError,
        match=r"train_c.x \(9 GPU-hours, 4 of them used by the run's earlier attempts\) "
        r"does not fit .* \(3 of 10 GPU-hours\): lower train_c.x to at most 7",
    ):
        run_budget(run_budget=9, experiment_budget=10, experiment_used=7, run_used=4, setting="train_c.x")
    with pytest.raises(ValueError, match="used 10 of its 10 GPU-hours; nothing is left"):
        run_budget(run_budget=None, experiment_budget=10, experiment_used=10, run_used=4, setting="train_c.x")


def test_the_experiment_total_counts_each_attempt_once(tmp_path):
    tracker = Tracker(TrackingConfig(), str(tmp_path))
    stage_c, stage_b = f"{tmp_path}/train_stage_c/ray/a", f"{tmp_path}/train_stage_c/ray/b"

    def attempt(checkpoints: str, logged: list[tuple[int, float, float]]) -> None:
        """A phase run of a training run: (step, run total, attempt) as the workers and the driver log them."""
        with tracker.run("train") as run:
            run.set_tags({CHECKPOINTS_TAG: checkpoints})
            for step, total, own in logged:
                run.log_metrics({RUN_GPU_HOURS: total, ATTEMPT_GPU_HOURS: own}, step=step)

    with tracker.run("full-tiny"):  # the pipeline's own run logs no GPU-hours
        with tracker.run("pre_encode") as data:
            data.set_tags({OUTPUT_TAG: "pre_encode#settings"})
            data.log_metrics({ATTEMPT_GPU_HOURS: 0.5})
        attempt(stage_c, [(10, 1, 1), (20, 2, 2), (20, 4, 4)])  # stopped by its budget at 4
    assert tracker.gpu_hours() == 4.5
    attempt(stage_c, [(30, 5, 1), (40, 6, 2)])  # resumed: 2 more
    attempt(stage_b, [(10, 3, 3)])  # another run
    # Each attempt once, at its latest value: not 4 + 6 for the resumed run.
    assert tracker.gpu_hours() == 0.5 + 4 + 2 + 3
    assert tracker.gpu_hours(stage_c) == 6 and tracker.gpu_hours(stage_b) == 3
    assert tracker.gpu_hours(f"{tmp_path}/train_stage_c/ray/other") == 0
    assert tracker.gpu_hours(output="pre_encode#settings") == 0.5 and tracker.gpu_hours(output="embed#x") == 0


class _Shards:
    """A shard step that records the shards it was given."""

    def __init__(self, *, done: list[str]):
        self.done = done

    def __call__(self, batch):
        self.done.append(batch[schema.SHARD][0])
        return {schema.SHARD: batch[schema.SHARD], "samples_in": np.ones(1, np.int64)}


def test_a_budgeted_pool_starts_a_shard_only_if_its_longest_shard_still_ends_in_time():
    # Each read of the clock advances it 1 s, so each shard takes 1 s and each start reads 1 s later.
    done: list[str] = []
    step = shard_phase.WithinDeadline(step=_Shards, step_kwargs={"done": done}, deadline=4.5, clock=_Clock(1.0))
    results = [step({schema.SHARD: np.array([name])}) for name in ("a", "b", "c", "d")]
    # a: starts at 1 (ends at 2); b: starts at 3, its 1 s ends by 4.5; c: starts at 5, too late; d too.
    assert done == ["a", "b"]
    assert [int(r["samples_in"][0]) for r in results] == [1, 1, 0, 0]
