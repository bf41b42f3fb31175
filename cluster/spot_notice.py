"""An AWS spot interruption notice, turned into Ray's drain for preemption of the node it came to.

AWS warns a spot instance two minutes before it reclaims it, through the instance metadata service
(IMDSv2): ``/latest/meta-data/spot/instance-action`` answers 404 until then and afterwards
``{"action": "terminate", "time": "<UTC>"}``. Ray does not read it, so without this a training run
learns of the interruption only from the SIGTERM at shutdown. Started on every spot node
(``ray_cluster.yaml``, ``gpu_worker_spot``), ``python -m cluster.spot_notice`` asks every 5 s and,
on a notice, drains its node for preemption with the notice's deadline: the training loop sees it
(``ray.train.get_preemption_info``) and checkpoints at the next step, and the autoscaler schedules
no new work there.

The metadata service answers only on the instance itself, one network hop away: Ray's containers
share the host's network, so the default hop limit of 1 reaches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import ray

logger = logging.getLogger(__name__)

METADATA_URL = "http://169.254.169.254"
POLL_SECONDS = 5.0
_TOKEN_TTL_SECONDS = 300
_TIMEOUT_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class Interruption:
    """A spot interruption notice: what AWS will do to the instance, and when."""

    action: str
    at: datetime.datetime

    def seconds_left(self, now: datetime.datetime) -> int:
        return max(0, int((self.at - now).total_seconds()))


def interruption(metadata_url: str = METADATA_URL) -> Interruption | None:
    """The instance's pending spot interruption, or None while there is none. Raises URLError (or
    OSError) when the metadata service cannot be reached."""
    token_request = urllib.request.Request(
        f"{metadata_url}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(_TOKEN_TTL_SECONDS)},
    )
    with urllib.request.urlopen(token_request, timeout=_TIMEOUT_SECONDS) as response:
        token = response.read().decode()
    notice_request = urllib.request.Request(
        f"{metadata_url}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
    )
    try:
        with urllib.request.urlopen(notice_request, timeout=_TIMEOUT_SECONDS) as response:
            notice = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    at = datetime.datetime.fromisoformat(notice["time"].replace("Z", "+00:00"))
    return Interruption(action=notice["action"], at=at)


def drain_command(address: str, node_id: str, notice: Interruption, now: datetime.datetime) -> list[str]:
    """``ray drain-node`` for ``notice``: the node is drained for preemption, with its deadline."""
    return [
        str(Path(sys.executable).with_name("ray")),
        "drain-node",
        f"--address={address}",
        f"--node-id={node_id}",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        f"--reason-message=AWS spot interruption notice: {notice.action} at {notice.at.isoformat()}",
        f"--deadline-remaining-seconds={notice.seconds_left(now)}",
    ]


def this_node_id(address: str) -> str:
    """The ID of the Ray node on this machine (a driver connected to it runs on it)."""
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def watch(
    address: str,
    *,
    node_id: str | None = None,
    metadata_url: str = METADATA_URL,
    poll_seconds: float = POLL_SECONDS,
    now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    drain: Callable[[list[str]], object] = lambda command: subprocess.run(command, check=True, timeout=120),
) -> Interruption:
    """Waits for a spot interruption notice, drains this node for it (``drain`` runs the command) and
    returns it. An unreachable metadata service is logged and asked again: it answers once the
    instance's network is up."""
    while True:
        try:
            notice = interruption(metadata_url)
        except OSError as error:
            logger.warning("the instance metadata service at %s cannot be reached (%s)", metadata_url, error)
            notice = None
        if notice is not None:
            command = drain_command(address, node_id or this_node_id(address), notice, now())
            logger.warning("spot interruption notice (%s at %s): %s", notice.action, notice.at, " ".join(command))
            drain(command)
            return notice
        time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="auto", help="the Ray cluster (default: the one on this machine)")
    parser.add_argument("--node-id", default=None, help="the node to drain (default: this machine's)")
    parser.add_argument("--metadata-url", default=METADATA_URL, help="the instance metadata service")
    parser.add_argument("--poll-seconds", type=float, default=POLL_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    watch(args.address, node_id=args.node_id, metadata_url=args.metadata_url, poll_seconds=args.poll_seconds)


if __name__ == "__main__":
    main()
