"""GPU-hour accounting and budgets, shared by every phase.

GPU-hours are GPUs held x wall time. A run on CPU workers counts worker-hours the same way (each
worker one unit), so budgets behave identically on a laptop and on a cluster and the tests can
exercise them.

What is counted, once: each attempt (one phase of one pipeline invocation, Ray Train's restarts of
its workers included) records the GPU-hours it held itself. A training run's total is the sum over
its attempts, and its budget caps that total; an experiment's total is the sum over every attempt of
every run, and its budget caps that.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable


def gpu_hours(units_held: float, seconds: float) -> float:
    """GPU-hours (or worker-hours) of holding ``units_held`` for ``seconds``."""
    return units_held * seconds / 3600


@dataclasses.dataclass(kw_only=True)
class BudgetMeter:
    """Live accounting of one attempt of a run: what the run was given, what it used, what is left.

    The clock is read once at the start and once per ``lap`` (after every step), so the figures hold
    between laps and a clock that advances a fixed amount per read charges a fixed cost per step.
    """

    units_held: float
    """GPUs held by the run (workers on CPU-only runs)."""
    budget: float | None
    """GPU-hours the run may use in all, its earlier attempts included; None: no limit."""
    used_before: float = 0.0
    """GPU-hours used by the run's earlier attempts."""
    attempt_before: float = 0.0
    """GPU-hours this attempt used before Ray Train restarted its workers."""
    clock: Callable[[], float] = time.monotonic
    """Seconds, read at the start and at each lap."""

    def __post_init__(self):
        self._started = self._lapped = self.clock()

    def lap(self) -> float:
        """Reads the clock; the seconds since the previous lap (or the start)."""
        now = self.clock()
        seconds, self._lapped = now - self._lapped, now
        return seconds

    def attempt(self) -> float:
        """GPU-hours of this attempt up to the last lap."""
        return self.attempt_before + gpu_hours(self.units_held, self._lapped - self._started)

    def used(self) -> float:
        """GPU-hours of the run up to the last lap: its earlier attempts and this one."""
        return self.used_before + self.attempt()

    def remaining(self) -> float | None:
        """What is left of the budget; None without one."""
        if self.budget is None:
            return None
        return max(self.budget - self.used(), 0.0)

    def next_step_fits(self, step_seconds: float) -> bool:
        """Whether one more step of ``step_seconds`` stays within the budget (0 before an attempt's first
        step, whose cost nothing foretells: it fits while some of the budget is left)."""
        if self.budget is None:
            return True
        used = self.used()
        return used < self.budget and used + gpu_hours(self.units_held, step_seconds) <= self.budget


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunBudget:
    """The cap on a run's total GPU-hours (its earlier attempts included) and the setting that sets it."""

    limit: float | None
    """GPU-hours the run may use in all; None: no limit."""
    setting: str
    """The setting to raise to let the run go further."""


def run_budget(
    *, run_budget: float | None, experiment_budget: float | None, experiment_used: float, run_used: float, setting: str
) -> RunBudget:
    """The budget an attempt of a run may go to, or a ValueError that says what is left and what to change.

    ``run_used``: GPU-hours of the run's earlier attempts, part of ``experiment_used``. ``setting`` names
    the run's budget setting (e.g. ``train_c.budget_gpu_hours``).
    """
    if experiment_budget is None:
        return RunBudget(limit=run_budget, setting=setting)
    experiment_setting = "tracking.experiment_budget_gpu_hours"
    left = experiment_budget - experiment_used
    if left <= 0:
        raise ValueError(
            f"the experiment has used {experiment_used:.4g} of its {experiment_budget:.4g} GPU-hours; nothing is "
            f"left for this run: raise {experiment_setting} or use another tracking.experiment"
        )
    if run_budget is None:
        return RunBudget(limit=run_used + left, setting=experiment_setting)
    if run_budget - run_used > left:
        raise ValueError(
            f"{setting} ({run_budget:.4g} GPU-hours, {run_used:.4g} of them used by the run's earlier attempts) "
            f"does not fit what is left of the experiment budget ({left:.4g} of {experiment_budget:.4g} "
            f"GPU-hours): lower {setting} to at most {run_used + left:.4g} or raise {experiment_setting}"
        )
    return RunBudget(limit=run_budget, setting=setting)
