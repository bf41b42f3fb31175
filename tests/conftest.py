"""Shared fixtures: the demo data set, generated once per test session."""

from __future__ import annotations

import pytest
import ray

from pipelines import demo_data


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory) -> tuple[str, dict]:
    """The default demo data set: (its root folder, its ground truth)."""
    root = str(tmp_path_factory.mktemp("demo") / "set")
    truth = demo_data.generate(root, demo_data.DemoDataConfig())
    return root, truth


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the tests that run phases in-process (end-to-end tests start their own)."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
