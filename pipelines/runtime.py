"""Starting or joining Ray."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import ray

RAY_SOURCE = str(Path(ray.__file__).parent)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Which Ray the pipeline runs on."""

    address: str = ""
    """Cluster to join ("auto", "ray://host:10001"); empty: $RAY_ADDRESS, else start a local Ray."""
    num_cpus: int | None = None
    """CPUs of a local Ray (none: every core of this machine); ignored when joining a cluster."""
    dashboard: bool = True
    """Start the Ray dashboard with a local Ray (a cluster has its own); it also serves the state API
    that Ray Train's controller polls (without it every poll logs a warning)."""
    progress_bars: bool = False
    """Ray Data progress bars on the console (without them Ray logs progress lines at intervals)."""
    log_level: str = "WARNING"
    """Ray's own lines on the console at this level and above (a Python logging level): WARNING keeps
    the console to the pipeline's summaries and progress lines; INFO adds Ray's detail (each data
    set's execution plan, Ray Train's worker groups, every reported result and checkpoint path)."""

    def __post_init__(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 or none, got {self.num_cpus}")
        if not isinstance(logging.getLevelName(self.log_level), int):
            raise ValueError(f"log_level must be a logging level (DEBUG, INFO, WARNING, ERROR), got {self.log_level!r}")


def init_ray(config: RayConfig) -> None:
    """Joins the configured cluster, or starts a local Ray; does nothing when Ray is already up."""
    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS", "")
        # Ray Data logs three lines for every data set it runs, and training runs one every epoch; a
        # local Ray's workers inherit this.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", config.log_level)
        if address:
            ray.init(address=address, logging_level=config.log_level)
        else:
            ray.init(num_cpus=config.num_cpus, include_dashboard=config.dashboard, logging_level=config.log_level)
    # The driver's Ray Data logger was set up when ray.data was first imported, before the line above.
    logging.getLogger("ray.data").setLevel(config.log_level)
    ray.data.DataContext.get_current().enable_progress_bars = config.progress_bars


class RaySourceBelow(logging.Filter):
    """Drops the records that Ray's own code logs below ``level``, whatever their logger's name (Ray
    Train names some of its loggers by file path, outside the ``ray`` hierarchy)."""

    def __init__(self, level: str):
        super().__init__()
        self.level = logging.getLevelName(level)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not record.pathname.startswith(RAY_SOURCE)


def quiet_ray_below(level: str) -> None:
    """In a Ray Train worker: Ray's lines below ``level`` leave the console (the handlers Ray set up)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RaySourceBelow) for f in handler.filters):
            handler.addFilter(RaySourceBelow(level))
