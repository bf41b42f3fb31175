"""Shared fixtures: the demo data set, generated once per test session."""

from __future__ import annotations

import pytest

from pipelines import demo_data


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory) -> tuple[str, dict]:
    """The default demo data set: (its root folder, its ground truth)."""
    root = str(tmp_path_factory.mktemp("demo") / "set")
    truth = demo_data.generate(root, demo_data.DemoDataConfig())
    return root, truth
