"""The gateway's own HTTP/1.1 client (quotagate.upstreams.http) against raw TCP servers on loopback that
answer byte for byte what each test needs: framing, keep-alive reuse, stale connections, timeouts,
back-pressure, garbage, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from quotagate.upstreams.errors import Stale, Unreachable, UpstreamError, UpstreamTimeout
from quotagate.upstreams.http import HIGH_WATER, Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """On uvloop, as the gateway runs."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class Server:
    """A TCP server whose every connection is served by ``handler``; counts connections, keeps requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def pool(url: str, **kwargs: Any) -> Pool:
    options: dict[str, Any] = {"connect_timeout": 2.0, "keepalive": 4.0, "headers": {}} | kwargs
    return Pool(url, **options)


async def post(p: Pool, body: bytes = b"{}", timeout: float = 5.0) -> tuple[int, bytes]:
    response = await p.post(p.request("/chat/completions", body, "req_1"), timeout)
    try:
        return response.status, await response.read()
    finally:
        response.release()


def keep_answering(answer: bytes) -> Callable[[Server], Handler]:
    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await server.read_request(reader)
                writer.write(answer)
                await writer.drain()
        return handler
    return make


@contextlib.asynccontextmanager
async def served(make: Callable[[Server], Handler]) -> AsyncIterator[Server]:
    """A Server whose handler ``make`` builds (the handler gets the server, to record requests)."""
    server = Server(lambda r, w: asyncio.sleep(0))
    server.handler = make(server)
    async with server:
        yield server


def test_the_request_on_the_wire_and_keep_alive_reuse() -> None:
    async def main() -> None:
        async with served(keep_answering(OK)) as server:
            p = pool(server.url, headers={"Content-Type": "application/json", "Authorization": "Bearer up-secret"})
            for _ in range(3):
                assert await post(p, b'{"model":"m"}') == (200, b'{"ok":true}')
            assert server.connections == 1  # one keep-alive connection carried all three
            host = server.url.split("/")[2]
            assert server.requests[0] == (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode()
                + b"\r\nAccept-Encoding: identity\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer up-secret\r\nX-Request-Id: req_1\r\nContent-Length: 13\r\n\r\n"
                b'{"model":"m"}')
            p.close()
    run(main())


def test_a_chunked_answer_arrives_piece_by_piece() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                await writer.drain()
                await gate.wait()
                writer.write(b"6\r\n world\r\n0\r\n\r\n")
                await writer.drain()
                await server.read_request(reader)
                writer.write(OK)
                await writer.drain()
                await asyncio.sleep(1)
            return handler

        async with served(make) as server:
            p = pool(server.url)
            response = await p.post(p.request("/chat/completions", b"{}", "req_1"), 5.0)
            assert response.status == 200
            assert await response.read_chunk() == b"hello"  # before the rest was even sent
            gate.set()
            rest = b""
            while chunk := await response.read_chunk():
                rest += chunk
            assert rest == b" world"
            response.release()
            assert await post(p) == (200, b'{"ok":true}')
            assert server.connections == 1
    run(main())


def test_a_body_without_length_ends_with_the_connection_which_is_not_reused() -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"1}")
                await writer.drain()
                writer.close()
            return handler

        async with served(make) as server:
            p = pool(server.url)
            assert await post(p) == (200, b'{"a":1}')
            assert await post(p) == (200, b'{"a":1}')
            assert server.connections == 2
    run(main())


def test_connection_close_and_unsolicited_bytes_stop_reuse() -> None:
    async def main() -> None:
        closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
        async with served(keep_answering(closing)) as server:
            p = pool(server.url)
            assert await post(p) == (200, b"{}")
            assert await post(p) == (200, b"{}")
            assert server.connections == 2

        # A server that sends more than it was asked for (here: a second answer nobody requested).
        async with served(keep_answering(OK + OK)) as server:
            p = pool(server.url)
            assert await post(p) == (200, b'{"ok":true}')
            await asyncio.sleep(0.05)
            assert await post(p) == (200, b'{"ok":true}')
            assert server.connections == 2
    run(main())


def test_a_keep_alive_connection_the_server_closed_is_stale_and_a_new_one_works() -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(OK)
                await writer.drain()
                # Reads the next request but closes without answering: the keep-alive race, from our side.
                await reader.readuntil(b"\r\n\r\n")
            return handler

        async with served(make) as server:
            p = pool(server.url)
            assert await post(p) == (200, b'{"ok":true}')
            with pytest.raises(Stale):
                await post(p)
            assert await post(p) == (200, b'{"ok":true}')  # the dead connection was not pooled again
            assert server.connections == 2
    run(main())


def test_idle_connections_older_than_the_keep_alive_are_not_reused() -> None:
    async def main() -> None:
        async with served(keep_answering(OK)) as server:
            p = pool(server.url, keepalive=0.2)
            await post(p)
            await post(p)
            assert server.connections == 1
            await asyncio.sleep(0.3)
            await post(p)
            assert server.connections == 2
    run(main())


def test_an_interim_100_answer_is_skipped() -> None:
    async def main() -> None:
        async with served(keep_answering(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server:
            p = pool(server.url)
            assert await post(p) == (200, b'{"ok":true}')
            assert await post(p) == (200, b'{"ok":true}')
            assert server.connections == 1
    run(main())


def test_garbage_and_a_broken_off_answer_are_upstream_errors() -> None:
    async def main() -> None:
        async with served(keep_answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")) as server:
            with pytest.raises(UpstreamError, match=r"not HTTP/1\.1"):
                await post(pool(server.url))

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\"")
                await writer.drain()
            return handler

        async with served(make) as server:
            with pytest.raises(UpstreamError, match="in the middle of its answer"):
                await post(pool(server.url))
    run(main())


def test_silence_is_a_timeout_before_the_head_and_within_the_body() -> None:
    async def main() -> None:
        def make(head: bytes) -> Callable[[Server], Handler]:
            def factory(server: Server) -> Handler:
                async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    await server.read_request(reader)
                    writer.write(head)
                    await writer.drain()
                    await asyncio.sleep(30)
                return handler
            return factory

        for head in (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{"):
            async with served(make(head)) as server:
                t0 = time.monotonic()
                with pytest.raises(UpstreamTimeout):
                    await post(pool(server.url), timeout=0.3)
                assert 0.25 < time.monotonic() - t0 < 3
    run(main())


def test_nothing_listening_is_unreachable() -> None:
    async def main() -> None:
        async with served(keep_answering(OK)) as server:
            url = server.url
        assert server.server is not None
        await server.server.wait_closed()
        with pytest.raises(Unreachable, match="ConnectionRefused"):
            await post(pool(url))
    run(main())


def test_a_reader_slower_than_the_server_holds_back_the_socket_and_loses_nothing() -> None:
    total = 256 * HIGH_WATER  # far more than loopback's socket buffers can hold (a few MB)

    async def main() -> None:
        sent = 0

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                nonlocal sent
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
                block = bytes(range(256)) * 256
                while sent < total:
                    writer.write(block)
                    sent += len(block)
                    await writer.drain()
            return handler

        async with served(make) as server:
            p = pool(server.url)
            response = await p.post(p.request("/chat/completions", b"{}", "req_1"), 5.0)
            await asyncio.sleep(0.5)  # the server writes as fast as it can; the gateway does not read
            assert sent < total  # held back: the kernel's buffers filled, not the gateway's memory
            body = b""
            while chunk := await response.read_chunk():
                assert len(chunk) <= HIGH_WATER + 256 * 1024
                body += chunk
            assert body == (bytes(range(256)) * 256) * (total // 65536)
            response.release()
    run(main())


def test_closing_a_response_mid_stream_drops_the_connection() -> None:
    async def main() -> None:
        closed = asyncio.Event()

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                await writer.drain()
                if not await reader.read(100):
                    closed.set()
            return handler

        async with served(make) as server:
            p = pool(server.url)
            response = await p.post(p.request("/chat/completions", b"{}", "req_1"), 5.0)
            assert await response.read_chunk() == b"abc"
            waiting = asyncio.ensure_future(response.read_chunk())
            await asyncio.sleep(0.05)
            response.close()
            with pytest.raises(UpstreamError, match="abandoned"):
                await waiting
            await asyncio.wait_for(closed.wait(), 5)  # the model server saw the gateway hang up
            response.release()  # a second release or close is harmless
    run(main())


def test_https_upstreams_are_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def main(trusted: bool) -> None:
        server = Server(lambda r, w: asyncio.sleep(0))
        server.handler = keep_answering(OK)(server)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server.connections += 1
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                await server.handler(reader, writer)

        tls = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        url = f"https://127.0.0.1:{tls.sockets[0].getsockname()[1]}/v1"
        try:
            if trusted:
                p = pool(url)
                assert await post(p) == (200, b'{"ok":true}')
                assert await post(p) == (200, b'{"ok":true}')
                assert server.connections == 1
                assert b"Host: 127.0.0.1:" in server.requests[0]
            else:
                with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
                    await post(pool(url))
        finally:
            tls.close()

    run(main(trusted=False))  # a certificate nobody vouched for: refused
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # how an operator trusts a private CA
    run(main(trusted=True))


def test_bad_base_urls_are_refused() -> None:
    for url in ("ftp://host/v1", "http:///v1", "http://"):
        with pytest.raises(ValueError, match="http:// or https://"):
            pool(url)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset instead of an orderly close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_a_body_without_length_cut_by_a_reset_is_an_error_not_an_end() -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"choices":[')
                await writer.drain()
                await asyncio.sleep(0.05)
                reset(writer)
            return handler

        async with served(make) as server:
            with pytest.raises(UpstreamError, match="in the middle of its answer"):
                await post(pool(server.url))
    run(main())


def test_only_a_final_chunked_coding_frames_the_body() -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nall of it")
                await writer.drain()
                writer.close()
            return handler

        async with served(make) as server:
            assert await post(pool(server.url)) == (200, b"all of it")  # to the close, not a broken answer
    run(main())


def test_a_switch_of_protocols_is_an_upstream_error() -> None:
    async def main() -> None:
        async with served(keep_answering(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                                              b"Upgrade: websocket\r\n\r\n")) as server:
            with pytest.raises(UpstreamError, match="switched to another protocol"):
                await post(pool(server.url))
    run(main())


def test_a_new_connection_closed_unanswered_is_not_retried_as_stale() -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)  # a prompt that crashes the model server, say
            return handler

        async with served(make) as server:
            with pytest.raises(UpstreamError, match="closed the connection before answering") as info:
                await post(pool(server.url))
            assert not isinstance(info.value, Stale)  # Stale would have it sent again

    run(main())


def test_a_timed_out_request_to_a_server_that_stopped_reading_is_dropped_at_once() -> None:
    big = b"x" * (32 * 1024 * 1024)

    async def main() -> None:
        received = asyncio.get_running_loop().create_future()

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await asyncio.sleep(1.0)  # not reading: the gateway's request piles up in its buffers
                count = 0
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(1 << 20):
                        count += len(chunk)
                received.set_result(count)
            return handler

        async with served(make) as server:
            p = pool(server.url)
            with pytest.raises(UpstreamTimeout):
                await p.post(p.request("/chat/completions", big, "req_1"), 0.3)
            # The connection was reset, not closed after a flush that would never come: the server sees
            # the end of it without the whole request.
            count = await asyncio.wait_for(received, 10)
            assert count < len(big)
    run(main())


def test_a_stream_released_at_done_still_reuses_its_connection() -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while True:
                    await server.read_request(reader)
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"e\r\ndata: [DONE]\n\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)  # the terminator comes in a write of its own, as uvicorn's does
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
            return handler

        async with served(make) as server:
            p = pool(server.url)
            for _ in range(3):
                response = await p.post(p.request("/chat/completions", b"{}", "req_1"), 5.0)
                assert await response.read_chunk() == b"data: [DONE]\n\n"
                response.release()  # as the stream relay does on [DONE], before the terminator
                await asyncio.sleep(0.1)
            assert server.connections == 1
    run(main())


def test_idle_connections_are_closed_after_the_keep_alive_without_more_traffic() -> None:
    async def main() -> None:
        closed = asyncio.Event()

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(OK)
                await writer.drain()
                if not await reader.read(100):  # a server that never closes idle connections itself
                    closed.set()
            return handler

        async with served(make) as server:
            await post(pool(server.url, keepalive=0.2))
            await asyncio.wait_for(closed.wait(), 3)  # no request came to prune it: the pool's own timer did
    run(main())


def test_running_out_of_file_descriptors_is_a_503_without_putting_the_upstream_aside() -> None:
    import errno

    from quotagate.config import GatewaySpec, ModelSpec
    from quotagate.upstreams.client import UpstreamClient
    from quotagate.upstreams.errors import OutOfSockets

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def no_fds(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        loop.create_connection = no_fds  # type: ignore[method-assign]
        client = UpstreamClient({"m": ModelSpec("m", "chat", ("http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"))},
                                GatewaySpec(), env={})
        with pytest.raises(OutOfSockets) as info:
            await client.post("m", "/chat/completions", b"{}", "req_1")
        assert info.value.status == 503 and info.value.retry_after == 1.0
        route = client._routes["m"]  # white-box: the cool-down state is not observable from outside here
        assert all(u.down_until == 0 for u in route.upstreams)
        await client.close()

    asyncio.run(main())  # the standard loop: its create_connection can be replaced for the test


def test_the_read_timeout_of_a_reused_connection_counts_from_its_own_wait() -> None:
    async def main() -> None:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.read_request(reader)
                writer.write(OK)
                await writer.drain()
                await server.read_request(reader)  # the second request: no answer
                await asyncio.sleep(30)
            return handler

        async with served(make) as server:
            p = pool(server.url)
            assert await post(p, timeout=0.5) == (200, b'{"ok":true}')
            await asyncio.sleep(0.4)  # most of the first wait's timeout has run out meanwhile
            t0 = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                await post(p, timeout=0.5)
            assert 0.45 < time.monotonic() - t0 < 3  # a whole timeout from the second wait, not the first's rest
            assert server.connections == 1
    run(main())
