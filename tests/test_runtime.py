"""Which Ray the pipeline joins or starts, and which of Ray's own lines reach the console."""

from __future__ import annotations

import logging
import os

import pytest

from pipelines.runtime import RAY_SOURCE, RayConfig, RaySourceBelow


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_cpus": 0}, "num_cpus must be >= 1 or none, got 0"),
        ({"log_level": "LOUD"}, "log_level must be a logging level"),
    ],
)
def test_a_bad_ray_setting_fails_naming_it(settings, message):
    with pytest.raises(ValueError, match=message):
        RayConfig(**settings)


def _record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("any.name", level, pathname, 1, "a line", None, None)


def test_ray_s_lines_below_the_level_are_dropped_and_every_other_line_kept():
    ray_file = os.path.join(RAY_SOURCE, "train", "v2", "_internal", "some_module.py")
    below = RaySourceBelow("WARNING")
    assert not below.filter(_record(ray_file, logging.INFO))
    assert below.filter(_record(ray_file, logging.WARNING))
    # The project's own progress lines are INFO and must stay, whatever Ray's level.
    assert below.filter(_record("/work/pipelines/train.py", logging.INFO))
    assert RaySourceBelow("INFO").filter(_record(ray_file, logging.INFO))
