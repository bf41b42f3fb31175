"""Preemption notices: a spot node about to go away, seen in time to checkpoint at the next step.

Two notices reach a training worker:

- Ray's: when a node is drained for preemption (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``,
  or a cloud integration that drains on the provider's notice), Ray Train tells every worker
  (``ray.train.get_preemption_info``), and at the drain's deadline restarts the run from its latest
  checkpoint, counted against ``FailureConfig.max_preemption_failures`` (no limit by default). The
  loop checkpoints once and trains on: a step made after the checkpoint is lost either way.
- SIGTERM to a worker's process, which an instance's shutdown sends every process (as on an AWS spot
  interruption when nothing drains the node first). Ray's worker would exit at once; here the signal
  is noted instead, the run checkpoints at the next step and then ends with ``Preempted``, from
  which Ray Train restarts it (counted against ``TrainConfig.max_failures``). A second SIGTERM exits
  as Ray's worker does.

Either way every rank checkpoints at the same step: the ranks agree on the notice first.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time

import ray.train
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution.callback import WorkerCallback

# Set by the SIGTERM handler, read by the training thread of the same worker process.
_TERMINATION_REQUESTED = threading.Event()
# Ray Train's watcher polls the drain state every 5 s (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S): asking
# it more often finds nothing new.
RAY_NOTICE_SECONDS = 5.0


class Preempted(RuntimeError):
    """A worker was told to terminate; the run checkpointed at the step it was told and ends here."""


class TerminationNotice(WorkerCallback):
    """Notes a SIGTERM to a training worker's process instead of exiting at once.

    A Ray Train worker callback, because a signal handler can only be set on a process's main
    thread, and the training loop runs on another; Ray Train runs ``after_init_train_context`` on
    the worker actor's main thread. Ray's own handler comes back when the worker shuts down."""

    def __init__(self):
        self._ray_handler = None

    def after_init_train_context(self) -> None:
        _TERMINATION_REQUESTED.clear()
        self._ray_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def before_worker_shutdown(self) -> None:
        if self._ray_handler is not None:
            signal.signal(signal.SIGTERM, self._ray_handler)

    def _on_sigterm(self, signum, frame) -> None:
        if _TERMINATION_REQUESTED.is_set() and callable(self._ray_handler):
            self._ray_handler(signum, frame)
        _TERMINATION_REQUESTED.set()


@dataclasses.dataclass(frozen=True)
class Notice:
    reason: str
    ends_run: bool
    """After its checkpoint: a SIGTERM ends the run (Ray Train restarts it), a drain does not."""


class PreemptionWatch:
    """What the loop asks after each step: has a notice come, so that the run checkpoints now?

    Every rank asks at every step (the question is a collective, one all-reduce): a SIGTERM reaches
    one process and counts for all. Ray's notice is the same for all, but asking for it is a barrier
    through a Ray actor (milliseconds), so it is asked only when rank 0's clock says it may have
    changed."""

    def __init__(self, device: torch.device):
        self.device = device
        self._asked_ray = time.monotonic()
        self._drain_checkpointed = False

    def notice(self) -> Notice | None:
        due = not self._drain_checkpointed and time.monotonic() - self._asked_ray >= RAY_NOTICE_SECONDS
        terminating, ask_ray = _any_rank([_TERMINATION_REQUESTED.is_set(), due and _rank() == 0], self.device)
        if terminating:
            return Notice(reason="a worker's process received SIGTERM", ends_run=True)
        if ask_ray:
            self._asked_ray = time.monotonic()
            if ray.train.get_preemption_info() is not None:
                self._drain_checkpointed = True
                return Notice(reason="Ray drains a node of the run for preemption", ends_run=False)
        return None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank if it is true on any."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flags
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]
