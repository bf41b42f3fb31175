"""What the cluster did during a run: its nodes of each type over time, and per phase.

A thread on the driver reads the autoscaler's view of the cluster (what ``ray status`` shows: every
node with its node type, the dead ones included) every few seconds. Each phase gets, in its MLflow
run and on the console, its nodes of each type at its start and end, the most it had at once, and
how many the autoscaler launched and removed while it ran; the pipeline's run gets the whole time
series. Nodes that no launcher started (a local Ray, ``ray start`` by hand) have no node type: they
count as ``head`` and ``worker``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

import ray
from ray.autoscaler.v2.sdk import get_cluster_status

from pipelines.tracking import TrackedRun

POLL_SECONDS = 5.0
HEAD, WORKER = "head", "worker"
# The resource Ray gives the head node only.
_HEAD_RESOURCE = "node:__internal_head__"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The cluster's nodes at one moment: node ID to node type."""

    seconds: float
    """Since the recording started."""
    alive: dict[str, str]
    dead: dict[str, str]

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(self.alive.values())


@dataclasses.dataclass(frozen=True)
class PhaseNodes:
    """Nodes of each type during one phase."""

    phase: str
    start: dict[str, int]
    end: dict[str, int]
    peak: dict[str, int]
    launched: dict[str, int]
    """Nodes that joined while the phase ran."""
    removed: dict[str, int]
    """Nodes that left while the phase ran."""

    def metrics(self) -> dict[str, int]:
        return {
            f"nodes_{what}/{node_type}": count
            for what in ("start", "end", "peak", "launched", "removed")
            for node_type, count in getattr(self, what).items()
        }

    def line(self) -> str:
        """``cpu_worker 0→1 +1; gpu_worker 1→0 (peak 1) -1``: per type, at start→end, the peak when
        higher, nodes launched and removed."""
        parts = []
        for node_type in sorted(self.peak):
            start, end, peak = self.start[node_type], self.end[node_type], self.peak[node_type]
            part = f"{node_type} {start}→{end}" + (f" (peak {peak})" if peak > max(start, end) else "")
            part += f" +{self.launched[node_type]}" if self.launched[node_type] else ""
            part += f" -{self.removed[node_type]}" if self.removed[node_type] else ""
            parts.append(part)
        return "; ".join(parts)


class NodeRecorder:
    """Records the cluster's nodes while the block runs (a thread polls every ``poll_seconds``) and
    logs their time series to ``run`` at its end; ``phase`` records one phase."""

    def __init__(self, run: TrackedRun, poll_seconds: float = POLL_SECONDS):
        self.run, self.poll_seconds = run, poll_seconds
        self.phases: list[PhaseNodes] = []
        self._snapshots: list[Snapshot] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="node-recorder", daemon=True)

    def __enter__(self) -> NodeRecorder:
        self._gcs_address = ray.get_runtime_context().gcs_address
        self._head = {node["NodeID"] for node in ray.nodes() if _HEAD_RESOURCE in node["Resources"]}
        self._started = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._log_series()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.sample()

    def sample(self) -> Snapshot:
        """Reads the cluster's nodes now, and keeps the reading."""
        status = get_cluster_status(self._gcs_address)
        alive = {node.node_id: self._type(node) for node in (*status.active_nodes, *status.idle_nodes)}
        dead = {node.node_id: self._type(node) for node in status.failed_nodes}
        with self._lock:  # the poller's readings and the phases' stay in the order of their times
            snapshot = Snapshot(time.monotonic() - self._started, alive=alive, dead=dead)
            self._snapshots.append(snapshot)
        return snapshot

    def _type(self, node) -> str:
        # The autoscaler names a node without a node type after its ID.
        if node.ray_node_type_name != f"node_{node.node_id}":
            return node.ray_node_type_name
        return HEAD if node.node_id in self._head else WORKER

    @contextlib.contextmanager
    def phase(self, name: str, run: TrackedRun) -> Iterator[None]:
        """Records the nodes during the block as phase ``name`` and logs them to ``run``, also when
        the block fails."""
        first = self.sample()
        try:
            yield
        finally:
            last = self.sample()
            with self._lock:
                during = [s for s in self._snapshots if first.seconds <= s.seconds <= last.seconds]
            types = sorted({t for s in self._snapshots for t in (*s.alive.values(), *s.dead.values())})
            # Exact however short a node lived: the readings list the dead nodes too.
            launched = collections.Counter(
                t
                for node, t in {**last.alive, **last.dead}.items()
                if node not in first.alive and node not in first.dead
            )
            removed = collections.Counter(t for node, t in last.dead.items() if node not in first.dead)
            nodes = PhaseNodes(
                name,
                start={t: first.counts()[t] for t in types},
                end={t: last.counts()[t] for t in types},
                peak={t: max(s.counts()[t] for s in during) for t in types},
                launched={t: launched[t] for t in types},
                removed={t: removed[t] for t in types},
            )
            self.phases.append(nodes)
            run.log_metrics(nodes.metrics())

    def _log_series(self) -> None:
        """The nodes of each type over the run (``nodes/TYPE``, step: seconds since the start): a
        point where a count changed, and the last."""
        with self._lock:
            snapshots = list(self._snapshots)
        types = sorted({t for s in snapshots for t in s.alive.values()})
        previous = None
        for index, snapshot in enumerate(snapshots):
            counts = {f"nodes/{t}": snapshot.counts()[t] for t in types}
            if counts != previous or index == len(snapshots) - 1:
                self.run.log_metrics(counts, step=round(snapshot.seconds))
            previous = counts

    def summary(self) -> str:
        """The console's closing lines: each phase's nodes per type."""
        lines = ["nodes per type in each phase (start→end, peak when higher, +launched -removed):"]
        width = max((len(p.phase) for p in self.phases), default=0)
        return "\n".join([*lines, *(f"  {p.phase:<{width}}  {p.line()}" for p in self.phases)])
