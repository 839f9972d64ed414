"""A webhook receiver for the tests: a real HTTP server on loopback (the standard library's, in a thread)
that keeps every POST it gets and can fail the first attempts of each event."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from quotagate.webhooks.signing import verify


@dataclass(frozen=True, slots=True)
class Received:
    at: float                # time.time()
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    answered: int            # the status the receiver answered with

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(self.body)
        return event

    @property
    def event_id(self) -> str:
        return self.headers["quotagate-event-id"]


class Receiver:
    """``fail_first``: answer 500 to the first that many attempts of each event id (then 200)."""

    def __init__(self, fail_first: int = 0, status: int = 200) -> None:
        self.fail_first = fail_first
        self.status = status
        self.received: list[Received] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with owner._lock:
                    earlier = sum(1 for r in owner.received if r.headers.get("quotagate-event-id")
                                  == headers.get("quotagate-event-id"))
                    answer = 500 if earlier < owner.fail_first else owner.status
                    owner.received.append(Received(time.time(), self.path, headers, body, answer))
                reply = b'{"ok": true}' if answer < 300 else b'{"error": "failing on purpose"}'
                self.send_response(answer)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/quotagate?src=test"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def accepted(self, event_type: str | None = None) -> list[Received]:
        """The POSTs answered with a 2xx (of one event type)."""
        return [r for r in self.snapshot() if 200 <= r.answered < 300
                and (event_type is None or r.event["type"] == event_type)]

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "webhook deliveries") -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.snapshot()
            if predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; received: "
                                     f"{[(r.event['type'], r.answered) for r in got]}")
            time.sleep(0.05)


def verified(secret: str, r: Received) -> bool:
    return verify(secret, r.headers["quotagate-signature"], r.body)
