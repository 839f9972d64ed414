"""Connection caps and the first-head deadline of quotagate's HTTP server (issue 13: 20,500 idle connections
took every file descriptor, and both listeners reset new connections for 75 s with nothing logged)."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx

from tests.fakes.upstream import FakeUpstream
from tests.gateway.test_httpserver import closed, own_gateway, read_answer
from tests.support import Gateway

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"


def open_from(port: int, source: str) -> socket.socket:
    """A connection to the listener on ``port`` from the loopback address ``source`` (127.0.0.x)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def healthy(sock: socket.socket) -> bool:
    sock.sendall(HEALTHZ)
    status, _, body = read_answer(sock, bytearray())
    return status == 200 and json.loads(body) == {"status": "ok"}


def refused(sock: socket.socket) -> dict[str, str]:
    """The 503 a connection over a cap gets before anything is asked; the connection is closed after it."""
    status, headers, body = read_answer(sock, bytearray())
    assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections", body
    assert headers["connection"] == "close" and headers["retry-after"] == "1"
    assert closed(sock)
    return headers


def metric(gw: Gateway, token: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.console_url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    assert found, f"{name}{{{wanted}}} not in /metrics"
    return float(found.group(1))


def test_connections_over_the_caps_are_refused_logged_and_accepted_again_once_others_close(
        tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    gw = own_gateway(tmp_path, database_url, upstream, {"QUOTAGATE_MAX_CONNECTIONS": "8",
                                                         "QUOTAGATE_MAX_CONNECTIONS_PER_ADDRESS": "5"})
    held: list[socket.socket] = []
    try:
        admin = gw.user("admin@example.com", admin=True)
        # One address takes its five connections (idle, after a request each) ...
        held = [open_from(gw.llm_port, "127.0.0.1") for _ in range(5)]
        assert all(healthy(sock) for sock in held)
        # ... and a sixth, and fifty more, are answered 503 and closed at once, without a request.
        t0 = time.monotonic()
        for _ in range(51):
            refused(open_from(gw.llm_port, "127.0.0.1"))
        assert time.monotonic() - t0 < 5
        # The connections it holds still serve, and so does the listener for another address.
        assert healthy(held[0]) and healthy(held[4])
        other = [open_from(gw.llm_port, "127.0.0.2") for _ in range(3)]
        assert all(healthy(sock) for sock in other)
        held += other
        # Eight open: the listener's cap, whoever asks; the console listener has caps of its own.
        refused(open_from(gw.llm_port, "127.0.0.3"))
        assert healthy(open_from(gw.console_port, "127.0.0.1"))
        # One warning for the flood, naming the cap and the address, not a line per connection.
        log = gw.log()
        assert log.count("refusing new connections") == 1, log
        assert "llm listener: refusing new connections: 127.0.0.1 holds the cap of 5 connections per client " \
               "address" in log
        assert metric(gw, admin.token, "quotagate_connections_refused_total", listener="llm",
                      reason="address_cap") == 51
        assert metric(gw, admin.token, "quotagate_connections_refused_total", listener="llm",
                      reason="listener_cap") == 1
        assert metric(gw, admin.token, "quotagate_connections_open", listener="llm") == 8
        # Connections that close give their places back.
        for sock in held[:2]:
            sock.close()
        deadline = time.monotonic() + 5
        while True:
            sock = open_from(gw.llm_port, "127.0.0.1")
            sock.sendall(HEALTHZ)
            status, _, _ = read_answer(sock, bytearray())
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # (the close may not have reached the server yet)
        assert status == 200
        held.append(sock)
        # A summary of what was refused after the first warning follows within a few seconds.
        deadline = time.monotonic() + 8
        while "refused 51 more connections" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "refused 51 more connections in 5 s: 1 over the listener's cap of 8, 50 over the cap of 5 per " \
               "client address (latest: 127.0.0.1)" in gw.log()
    finally:
        for sock in held:
            sock.close()
        gw.stop()


def test_a_new_connection_must_send_its_first_request_head_within_the_deadline(
        tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    gw = own_gateway(tmp_path, database_url, upstream, {"QUOTAGATE_FIRST_HEAD_TIMEOUT_SECONDS": "1"})
    try:
        admin = gw.user("admin@example.com", admin=True)
        # Nothing, or half a head, or a head trickled in: closed a second after connecting (not 75 s).
        for opening in (b"", b"GET /healthz HTTP/1.1\r\nHo"):
            for port in (gw.llm_port, gw.console_port):
                sock = open_from(port, "127.0.0.1")
                t0 = time.monotonic()
                sock.sendall(opening)
                assert closed(sock)
                assert 0.8 < time.monotonic() - t0 < 3
        sock = open_from(gw.llm_port, "127.0.0.1")
        t0 = time.monotonic()
        try:
            for byte in HEALTHZ:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
        assert closed(sock)
        assert 0.8 < time.monotonic() - t0 < 3
        # Once a request has come, the connection has the keep-alive time (75 s) between requests.
        sock = open_from(gw.llm_port, "127.0.0.1")
        assert healthy(sock)
        time.sleep(1.5)
        assert healthy(sock)
        sock.close()
        assert metric(gw, admin.token, "quotagate_connections_head_timeouts_total", listener="llm") == 3
    finally:
        gw.stop()
