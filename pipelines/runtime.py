"""Starting or joining Ray."""

from __future__ import annotations

import dataclasses
import os

import ray


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

    def __post_init__(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 or none, got {self.num_cpus}")


def init_ray(config: RayConfig) -> None:
    """Joins the configured cluster, or starts a local Ray; does nothing when Ray is already up."""
    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address)
        else:
            # Training re-runs its data set every epoch, and each run logs three INFO lines from a
            # worker; a local Ray's workers inherit this, keeping the console to progress lines.
            os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
            ray.init(num_cpus=config.num_cpus, include_dashboard=config.dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = config.progress_bars
