"""GPU-hour accounting and budgets, shared by every phase.

GPU-hours are GPUs held x wall time. A run on CPU workers counts worker-hours the same way (each
worker one unit), so budgets behave identically on a laptop and on a cluster and the tests can
exercise them. A training run gets its own budget and checks before every step whether the next
one still fits; an experiment's budget caps the sum over all of its runs.
"""

from __future__ import annotations

import dataclasses
import time


def gpu_hours(units_held: float, seconds: float) -> float:
    """GPU-hours (or worker-hours) of holding ``units_held`` for ``seconds``."""
    return units_held * seconds / 3600


@dataclasses.dataclass(kw_only=True)
class BudgetMeter:
    """Live accounting of one run: what it was given, what it used, what is left."""

    units_held: float
    """GPUs held by the run (workers on CPU-only runs)."""
    budget: float | None
    """GPU-hours this run may use in all, its earlier attempts included; None: no limit."""
    used_before: float = 0.0
    """GPU-hours used by earlier attempts of the run (read from its checkpoint)."""
    started: float = dataclasses.field(default_factory=time.monotonic)

    def used(self) -> float:
        return self.used_before + gpu_hours(self.units_held, time.monotonic() - self.started)

    def remaining(self, used: float | None = None) -> float | None:
        """What is left; ``used``: a figure of ``used()`` already taken, so both agree in one report."""
        if self.budget is None:
            return None
        return max(self.budget - (self.used() if used is None else used), 0.0)

    def next_step_fits(self, step_seconds: float) -> bool:
        """Whether one more step of ``step_seconds`` stays within the budget."""
        return self.budget is None or self.used() + gpu_hours(self.units_held, step_seconds) <= self.budget


def run_budget(*, run_budget: float | None, experiment_budget: float | None, experiment_used: float,
               setting: str) -> float | None:
    """The budget a new run may have, or a ValueError that says what is left and what to change.

    ``setting`` names the run's budget setting for the message (e.g. ``train_c.budget_gpu_hours``).
    """
    if experiment_budget is None:
        return run_budget
    left = experiment_budget - experiment_used
    if left <= 0:
        raise ValueError(
            f"the experiment has used {experiment_used:.4g} of its {experiment_budget:.4g} GPU-hours; nothing is "
            "left for this run: raise tracking.experiment_budget_gpu_hours or use another tracking.experiment"
        )
    if run_budget is not None and run_budget > left:
        raise ValueError(
            f"{setting} ({run_budget:.4g} GPU-hours) does not fit what is left of the experiment budget "
            f"({left:.4g} of {experiment_budget:.4g} GPU-hours): lower {setting} to at most {left:.4g} "
            "or raise tracking.experiment_budget_gpu_hours"
        )
    return left if run_budget is None else run_budget
