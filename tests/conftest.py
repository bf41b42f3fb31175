"""Shared fixtures: the demo data set, a local Ray, a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import pytest
import ray

from cluster.local_cluster import GPU_STAND_IN, SeaweedFS
from pipelines import demo_data


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory) -> tuple[str, dict]:
    """The default demo data set: (its root folder, its ground truth)."""
    root = str(tmp_path_factory.mktemp("demo") / "set")
    truth = demo_data.generate(root, demo_data.DemoDataConfig())
    return root, truth


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the tests that run phases in-process (end-to-end tests start their own), with
    one GPU stand-in for the tests of what a phase does when it holds GPUs."""
    ray.init(num_cpus=2, resources={GPU_STAND_IN: 1}, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway on 127.0.0.1; yields the S3 endpoint URL."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        yield server.endpoint
    finally:
        server.stop()
