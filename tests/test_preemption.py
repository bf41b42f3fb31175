"""A SIGTERM to a training worker's process is noted, not obeyed, until the loop has checkpointed;
a second one is obeyed; the worker's own handler comes back at shutdown (the whole run under a
SIGTERM is in test_train.py, slow)."""

from __future__ import annotations

import os
import signal

import torch

from pipelines.training.preemption import PreemptionWatch, TerminationNotice


def test_a_sigterm_is_noted_for_the_loop_and_a_second_one_reaches_the_worker_s_handler():
    obeyed = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: obeyed.append(signum))
    try:
        callback = TerminationNotice()
        callback.after_init_train_context()
        watch = PreemptionWatch(torch.device("cpu"))
        assert watch.notice() is None

        os.kill(os.getpid(), signal.SIGTERM)
        notice = watch.notice()
        assert notice is not None and notice.ends_run and "SIGTERM" in notice.reason
        assert not obeyed, "the first SIGTERM must wait for the checkpoint"

        os.kill(os.getpid(), signal.SIGTERM)
        assert obeyed == [signal.SIGTERM]

        callback.before_worker_shutdown()
        os.kill(os.getpid(), signal.SIGTERM)
        assert obeyed == [signal.SIGTERM, signal.SIGTERM], "the worker's own handler is back"
        # A new worker in the same process starts without the old notice.
        TerminationNotice().after_init_train_context()
        assert PreemptionWatch(torch.device("cpu")).notice() is None
    finally:
        signal.signal(signal.SIGTERM, previous)
