"""The spot notice watcher (``python -m cluster.spot_notice``) against a stand-in of the instance
metadata service; tests/test_train.py's drained-node test runs it against a Ray node."""

from __future__ import annotations

import datetime
import threading
import time

from cluster import spot_notice
from cluster.local_cluster import free_port
from tests.instance_metadata import instance_metadata

WHEN = datetime.datetime(2026, 12, 6, 16, 2, 0, tzinfo=datetime.UTC)


def test_no_notice_until_aws_sets_one_then_its_action_and_time():
    with instance_metadata() as metadata:
        assert spot_notice.interruption(metadata.url) is None
        metadata.notice = {"action": "terminate", "time": "2026-12-06T16:02:00Z"}
        notice = spot_notice.interruption(metadata.url)
    assert notice == spot_notice.Interruption(action="terminate", at=WHEN)
    # IMDSv2: a session token first, and the notice asked for with it (the stand-in answers 401 without).
    assert metadata.requests[:2] == [("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/spot/instance-action")]


def test_the_drain_is_for_preemption_with_the_notices_deadline():
    notice = spot_notice.Interruption(action="terminate", at=WHEN)
    command = spot_notice.drain_command("127.0.0.1:6379", "ab" * 28, notice, WHEN - datetime.timedelta(seconds=95.5))
    assert command[1:] == [
        "drain-node",
        "--address=127.0.0.1:6379",
        f"--node-id={'ab' * 28}",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message=AWS spot interruption notice: terminate at 2026-12-06T16:02:00+00:00",
        "--deadline-remaining-seconds=95",
    ]
    assert notice.seconds_left(WHEN + datetime.timedelta(seconds=3)) == 0, "a deadline passed is no negative deadline"


def test_the_watcher_asks_an_unreachable_service_again_and_drains_once_on_the_notice(caplog):
    port = free_port()
    drains: list[list[str]] = []
    returned: list[spot_notice.Interruption] = []
    watcher = threading.Thread(
        target=lambda: returned.append(
            spot_notice.watch(
                "127.0.0.1:6379",
                node_id="ab" * 28,
                metadata_url=f"http://127.0.0.1:{port}",
                poll_seconds=0.05,
                now=lambda: WHEN - datetime.timedelta(seconds=120),
                drain=drains.append,
            )
        ),
        daemon=True,
    )
    watcher.start()
    _wait_until(lambda: caplog.text.count("cannot be reached") >= 2)  # nothing listens yet: asked again
    with instance_metadata(port) as metadata:
        _wait_until(lambda: len(metadata.requests) >= 4)  # answered: no notice, asked again
        assert watcher.is_alive() and not drains
        metadata.notice = {"action": "terminate", "time": "2026-12-06T16:02:00Z"}
        watcher.join(timeout=30)
    assert not watcher.is_alive()
    assert returned == [spot_notice.Interruption(action="terminate", at=WHEN)]
    (command,) = drains
    assert "--reason=DRAIN_NODE_REASON_PREEMPTION" in command and "--deadline-remaining-seconds=120" in command


def _wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
