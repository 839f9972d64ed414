"""quotagate's own HTTP/1.1 server (quotagate.httpserver), byte for byte over a raw socket, mostly on the LLM
listener: pipelining, 100-continue, HEAD, HTTP/1.0, chunked request bodies, malformed and oversized requests,
a 413 with the body still coming, timeouts for idle, trickling and stalled clients (on the console too), and a
graceful stop with a stream in flight."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.gateway.conftest import Mint
from tests.gateway.helpers import hi
from tests.support import Gateway, start_gateway


@pytest.fixture
def key(mint: Mint) -> str:
    return mint()[0]


def connect(gw: Gateway) -> socket.socket:
    host, port = gw.llm_url.split("//")[1].split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_answer(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer (Content-Length or chunked) from ``sock``; leftover bytes stay in ``buf``."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; got {bytes(buf)!r}")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    buf[:] = rest
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buf) < length:
            buf += sock.recv(65536)
        body = bytes(buf[:length])
        del buf[:length]
        return status, headers, body
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            size_line, _, _ = bytes(buf).partition(b"\r\n")
            size = int(size_line, 16)
            need = len(size_line) + 2 + size + 2
            while len(buf) < need:
                buf += sock.recv(65536)
            body += bytes(buf[len(size_line) + 2:len(size_line) + 2 + size])
            del buf[:need]
            if size == 0:
                return status, headers, body
    return status, headers, b""


SHORT_TIMEOUTS = {"QUOTAGATE_KEEPALIVE_SECONDS": "2", "QUOTAGATE_BODY_TIMEOUT_SECONDS": "0.5"}


def own_gateway(tmp_path: Path, database_url: str, upstream: FakeUpstream,
                env: dict[str, str] | None = None) -> Gateway:
    """A gateway of the test's own (one chat model on ``upstream``), for settings such as short timeouts."""
    config = tmp_path / "m.toml"
    config.write_text(f'[[models]]\nid = "chat"\nupstreams = ["{upstream.base_url}"]\n')
    return start_gateway(tmp_path / "data", database_url, config, extra_env=env)


def chat_request(key: str, body: bytes | None = None, extra: str = "") -> bytes:
    body = body if body is not None else json.dumps({"model": "chat", "messages": hi(), "max_tokens": 3}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_requests_are_answered_in_order_on_one_connection(gw: Gateway, key: str) -> None:
    sock = connect(gw)
    bodies = [json.dumps({"model": "chat", "messages": hi(f"n{i}"), "max_tokens": i + 1}).encode() for i in range(3)]
    sock.sendall(b"".join(chat_request(key, b) for b in bodies) + b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    buf = bytearray()
    ids = set()
    for i in range(3):
        status, headers, body = read_answer(sock, buf)
        assert status == 200, body
        assert json.loads(body)["usage"]["completion_tokens"] == i + 1  # in the order they were sent
        ids.add(headers["x-request-id"])
    assert len(ids) == 3
    assert read_answer(sock, buf)[0] == 200
    sock.close()


def test_expect_100_continue_head_http10_and_chunked_bodies(gw: Gateway, key: str) -> None:
    sock = connect(gw)
    body = json.dumps({"model": "chat", "messages": hi(), "max_tokens": 2}).encode()
    sock.sendall(chat_request(key, b"", "Expect: 100-continue\r\n").replace(b"Content-Length: 0",
                                                                            b"Content-Length: %d" % len(body)))
    buf = bytearray()
    assert read_answer(sock, buf)[0] == 100  # asked before the body was sent
    sock.sendall(body)
    status, _, answer = read_answer(sock, buf)
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2

    # HEAD: the head of the answer, no body; the connection goes on.
    sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    sock.settimeout(10)
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 15" in head.lower() and rest == b""
    buf.clear()

    # A chunked request body.
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + key.encode()
               + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 10 + body[:10] + b"\r\n"
               + b"%x\r\n" % (len(body) - 10) + body[10:] + b"\r\n0\r\n\r\n")
    sock.sendall(chunked)
    status, _, answer = read_answer(sock, buf)
    assert status == 200, answer

    # A trailer after a chunked body is not a header of the request (here it would replace the key).
    sock.sendall(chunked.replace(b"0\r\n\r\n", b"0\r\nAuthorization: Bearer sk-not-the-key\r\n\r\n"))
    status, _, answer = read_answer(sock, buf)
    assert status == 200, answer
    sock.close()

    # HTTP/1.0: answered, then closed (no keep-alive asked for).
    sock = connect(gw)
    sock.sendall(chat_request(key).replace(b"HTTP/1.1", b"HTTP/1.0"))
    status, headers, answer = read_answer(sock, bytearray())
    assert status == 200 and headers.get("connection") == "close"
    assert closed(sock)


def test_malformed_and_oversized_requests_get_an_openai_shaped_error_and_a_close(gw: Gateway) -> None:
    for raw, status, needle in ((b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed HTTP request"),
                                (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431,
                                 "request head is larger than"),
                                # A header line that never ends (the parser keeps it until it does).
                                (b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 70_000, 431,
                                 "request head is larger than")):
        sock = connect(gw)
        sock.sendall(raw)
        got, _, body = read_answer(sock, bytearray())
        assert got == status
        error = json.loads(body)["error"]
        assert needle in error["message"] and error["type"] == "invalid_request_error"
        assert closed(sock)
    assert httpx.get(gw.llm_url.rsplit("/v1", 1)[0] + "/healthz").status_code == 200  # still serving


def test_a_413_answer_does_not_wait_for_the_body_and_the_connection_stays_usable(gw: Gateway, key: str) -> None:
    sock = connect(gw)
    too_big = 64 * 1024 * 1024  # declared, far above the limit; only a little is ever sent
    sock.sendall(chat_request(key, b"", "").replace(b"Content-Length: 0", b"Content-Length: %d" % too_big)
                 + b"{" * 1000)
    status, _, body = read_answer(sock, bytearray())
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    sock.close()

    # A body a little over the limit, sent whole: the answer, then the next request on the same connection.
    sock = connect(gw)
    limit = 8 * 1024 * 1024
    payload = b'{"model":"chat","messages":[{"role":"user","content":"' + b"a" * limit + b'"}]}'
    sender = threading.Thread(target=lambda: sock.sendall(chat_request(key, payload) + chat_request(key)))
    sender.start()
    buf = bytearray()
    assert read_answer(sock, buf)[0] == 413
    sender.join(30)
    status, _, body = read_answer(sock, buf)
    assert status == 200, body
    sock.close()


def test_a_client_that_goes_quiet_is_closed_after_the_keep_alive(tmp_path: Path, database_url: str,
                                                                   upstream: FakeUpstream) -> None:
    gw = own_gateway(tmp_path, database_url, upstream, {"QUOTAGATE_KEEPALIVE_SECONDS": "1"})
    try:
        sock = connect(gw)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_answer(sock, bytearray())[0] == 200
        t0 = time.monotonic()
        assert closed(sock)
        assert 0.8 < time.monotonic() - t0 < 4
        # A connection used again just before its keep-alive ran out gets a whole keep-alive more.
        sock = connect(gw)
        buf = bytearray()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_answer(sock, buf)[0] == 200
        time.sleep(0.7)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_answer(sock, buf)[0] == 200
        t0 = time.monotonic()
        assert closed(sock)
        assert 0.8 < time.monotonic() - t0 < 4
        # Half a request head, then nothing (slowloris): the same.
        sock = connect(gw)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: g")
        t0 = time.monotonic()
        assert closed(sock)
        assert 0.8 < time.monotonic() - t0 < 4
    finally:
        gw.stop()


def test_a_graceful_stop_lets_a_stream_in_flight_finish(tmp_path: Path, database_url: str,
                                                         upstream: FakeUpstream) -> None:
    gw = own_gateway(tmp_path, database_url, upstream)
    try:
        admin = gw.user("admin@example.com", admin=True)
        secret = admin.mint(admin.project("p")["id"])["secret"]
        events: list[str] = []
        with httpx.Client(base_url=gw.llm_url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as c, \
                c.stream("POST", "/chat/completions", json={
                    "model": "chat", "messages": hi(), "stream": True, "max_tokens": 40,
                    "fake": {"tokens": 40, "token_delay": 0.05}}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    break
            gw.proc.send_signal(signal.SIGTERM)  # two seconds of stream still to come
            events.extend(line for line in lines if line.startswith("data: "))
        assert events[-1] == "data: [DONE]"
        content: Any = [json.loads(e[6:]) for e in events[:-1]]
        assert sum(1 for c in content if c["choices"] and c["choices"][0]["delta"].get("content")) == 40
        assert gw.proc.wait(timeout=20) == 0
    finally:
        if gw.proc.poll() is None:
            gw.stop()


def test_a_stalled_body_gets_a_408_and_a_head_trickled_in_cannot_hold_the_connection(
        tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    gw = own_gateway(tmp_path, database_url, upstream, SHORT_TIMEOUTS)
    try:
        admin = gw.user("admin@example.com", admin=True)
        secret = admin.mint(admin.project("p")["id"])["secret"]
        forwarded = len(upstream.requests)
        # Half a body, then nothing: a 408 once the body has stalled for 0.5 s, then the connection closes.
        request = chat_request(secret)
        sock = connect(gw)
        sock.sendall(request[:-10])
        t0 = time.monotonic()
        status, headers, body = read_answer(sock, bytearray())
        assert 0.4 < time.monotonic() - t0 < 5
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close" and headers["x-request-id"].startswith("req_")
        assert closed(sock)
        # A body that keeps coming, slower than the whole timeout but never stalling that long, is served.
        sock = connect(gw)
        head, _, payload = request.partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n")
        for i in range(0, len(payload), len(payload) // 4 + 1):
            time.sleep(0.25)
            sock.sendall(payload[i:i + len(payload) // 4 + 1])
        assert read_answer(sock, bytearray())[0] == 200
        assert len(upstream.requests) == forwarded + 1  # the stalled one was never forwarded
        # A head sent one byte every 0.3 s keeps the connection busy but not alive: it is dropped about
        # one keep-alive (2 s) after its first byte, though bytes keep coming.
        sock = connect(gw)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.3)
        assert 1.5 < time.monotonic() - t0 < 8
    finally:
        gw.stop()


def test_no_trickle_of_bytes_outside_a_request_keeps_an_idle_connection_open(
        tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    gw = own_gateway(tmp_path, database_url, upstream, {"QUOTAGATE_KEEPALIVE_SECONDS": "2"})

    def dropped_while_trickling(sock: socket.socket, byte: bytes) -> float:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(100):  # 30 s: far longer than the keep-alive
                sock.sendall(byte)
                time.sleep(0.3)
        return time.monotonic() - t0

    try:
        # CRLFs between requests (which the parser skips) are not a request starting.
        sock = connect(gw)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_answer(sock, bytearray())[0] == 200
        assert dropped_while_trickling(sock, b"\r\n") < 8
        # The tail of a body the answer did not wait for (a 401 to a request declaring 100 kB) is read and
        # dropped, and the connection goes on — but only for a keep-alive time after the answer.
        sock = connect(gw)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n{")
        status, _, body = read_answer(sock, bytearray())
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert dropped_while_trickling(sock, b" ") < 8
    finally:
        gw.stop()


def test_the_console_listener_drops_silent_and_trickling_clients_and_answers_a_stalled_body_408(
        tmp_path: Path, database_url: str, upstream: FakeUpstream) -> None:
    # The console ran on uvicorn, which arms no timer on a new connection and drops its keep-alive timer
    # at a request's first byte: both of these connections stayed open for good.
    gw = own_gateway(tmp_path, database_url, upstream, SHORT_TIMEOUTS)
    try:
        admin = gw.user("admin@example.com", admin=True)
        for opening in (b"", b"GET /healthz HTTP/1.1\r\nHo"):
            sock = socket.create_connection(("127.0.0.1", gw.console_port), timeout=10)
            sock.sendall(opening)
            t0 = time.monotonic()
            assert closed(sock)
            assert 1.5 < time.monotonic() - t0 < 6
        # The console API and the web console's forms both answer a stalled body 408 (not a 500).
        api_auth = f"Authorization: Bearer {admin.token}\r\n"
        for path, content_type, extra in (("/v1/projects", "application/json", api_auth),
                                          ("/login", "application/x-www-form-urlencoded", "")):
            sock = socket.create_connection(("127.0.0.1", gw.console_port), timeout=10)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: gw\r\n{extra}Content-Type: {content_type}\r\n"
                         f"Content-Length: 50\r\n\r\n{{".encode())
            status, headers, body = read_answer(sock, bytearray())
            assert status == 408, (path, body)
            assert json.loads(body)["error"]["code"] == "request_timeout"
            assert headers["connection"] == "close"
            assert closed(sock)
        # A chunked body whose framing breaks is a 400 there too.
        sock = socket.create_connection(("127.0.0.1", gw.console_port), timeout=10)
        sock.sendall(f"POST /v1/projects HTTP/1.1\r\nHost: gw\r\n{api_auth}Content-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n".encode())
        status, _, body = read_answer(sock, bytearray())
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request", body
        assert "Traceback" not in gw.log()
        # X-Forwarded-For from a proxy on this machine is still believed (the audit log's address).
        project = admin.ok("POST", "/v1/projects", 201, json={"name": "p"},
                           headers={"X-Forwarded-For": "203.0.113.9"})
        entries = admin.ok("GET", f"/v1/projects/{project['id']}/audit-log")["data"]
        assert entries and entries[0]["client_ip"] == "203.0.113.9", entries[:1]
    finally:
        gw.stop()


def test_a_malformed_chunked_body_gets_a_400_at_once(gw: Gateway, key: str) -> None:
    # Found by an adversarial run: the app waited for the rest of the body until the body timeout (408).
    sock = connect(gw)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".encode())
    t0 = time.monotonic()
    status, headers, body = read_answer(sock, bytearray())
    assert time.monotonic() - t0 < 5
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error", body
    assert headers["connection"] == "close" and headers["x-request-id"].startswith("req_")
    assert closed(sock)
