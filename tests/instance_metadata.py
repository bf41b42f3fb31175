"""A stand-in for the EC2 instance metadata service (IMDSv2) on 127.0.0.1, for the spot notice tests.

It answers as AWS documents: ``PUT /latest/api/token`` gives a session token, and
``GET /latest/meta-data/spot/instance-action`` with that token answers 404 until a notice is set,
then the notice as JSON; without the token it answers 401.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator

TOKEN = "a-session-token"


class InstanceMetadata:
    def __init__(self, url: str):
        self.url = url
        self.notice: dict[str, str] | None = None
        self.requests: list[tuple[str, str]] = []


@contextlib.contextmanager
def instance_metadata(port: int = 0) -> Iterator[InstanceMetadata]:
    state: list[InstanceMetadata] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            state[0].requests.append(("PUT", self.path))
            if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
                self._answer(400, b"")
            else:
                self._answer(200, TOKEN.encode())

        def do_GET(self):
            state[0].requests.append(("GET", self.path))
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                self._answer(401, b"")
            elif self.path != "/latest/meta-data/spot/instance-action" or state[0].notice is None:
                self._answer(404, b"")
            else:
                self._answer(200, json.dumps(state[0].notice).encode())

        def _answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    state.append(InstanceMetadata(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
