"""The LLM listener's HTTP/1.1 server: the part of ASGI the LLM app uses, and nothing else, on uvloop.

Why not uvicorn here (the console still runs on it): on the request path its protocol was a quarter of the
event loop's CPU once aiohttp was gone (docs/performance.md), for generality the LLM app does not use:
header validation of the app's own headers, access logging, proxy headers, WebSockets, an asyncio.Event and
two socket writes per answer. This server parses requests with httptools (llhttp, as uvicorn does), hands
the app a plain ASGI scope, and writes an answer's head together with its first body bytes, so a whole
non-streamed answer leaves in one write.

What it keeps from a full server: keep-alive with an idle timeout, pipelined requests answered in order,
``Expect: 100-continue``, request bodies held back past 256 KiB until the app reads them, write
back-pressure for streams, ``http.disconnect`` when the client goes away, HTTP/1.0 clients, HEAD, a 400
for malformed requests and a 431 for oversized heads, and a graceful stop that lets answers in flight
finish (up to ``graceful_seconds``). The app is trusted: its status and headers are sent as given.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
import orjson

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

# Request body bytes buffered before the app reads them; past this the socket is not read.
HIGH_WATER = 256 * 1024
# The request line and headers together; a longer head is refused with 431 (a request is a few hundred bytes).
MAX_HEAD_BYTES = 64 * 1024
# Pipelined requests queued behind the one being answered before the socket is no longer read.
MAX_PIPELINE = 16

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_DISCONNECT: Message = {"type": "http.disconnect"}


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def _error(status: int, message: str) -> bytes:
    """A plain OpenAI-shaped error, for requests the app never saw (the connection is closed after it)."""
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": "bad_request"}})
    return (_status_line(status) + b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body))


class _Exchange:
    """One request and its answer: the ``receive`` and ``send`` the app is given."""

    __slots__ = ("body", "body_done", "chunked", "conn", "done", "head", "head_only", "keep_alive", "scope",
                 "started", "told_end", "waiter", "wants_continue")

    def __init__(self, conn: _Connection, scope: Scope, keep_alive: bool, wants_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.wants_continue = wants_continue
        self.head_only = scope["method"] == "HEAD"
        self.body: list[bytes] = []
        self.body_done = False
        self.told_end = False
        self.waiter: asyncio.Future[None] | None = None
        self.head: bytes | None = None       # the answer's head, held until its first body bytes
        self.started = False
        self.chunked = False
        self.done = False

    async def run(self, app: App) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.error("the LLM app failed on %s %s", self.scope["method"], self.scope["path"], exc_info=exc)
            if not self.started and not self.conn.gone:
                self.conn.write(_error(500, "the gateway failed on this request"))
            self.conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            if not self.done and not self.conn.gone:
                log.error("the LLM app returned without finishing its answer to %s %s", self.scope["method"],
                          self.scope["path"])
                if not self.started:
                    self.conn.write(_error(500, "the gateway failed on this request"))
                self.conn.close()
        finally:
            self.done = True
            self.conn.finished(self)

    # -- receive ---------------------------------------------------------------------------------
    async def receive(self) -> Message:
        conn = self.conn
        if self.wants_continue:
            self.wants_continue = False
            if not conn.gone:
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.told_end:
            while not self.body and not self.body_done and not conn.gone:
                conn.resume_reading()
                await self._wait()
            if conn.gone:
                return _DISCONNECT
            body = self.body
            chunk = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            conn.resume_reading()
            self.told_end = self.body_done
            return {"type": "http.request", "body": chunk, "more_body": not self.body_done}
        # The body was read to its end: the next message is the disconnect, whenever it comes.
        while not conn.gone and not self.done:
            await self._wait()
        return _DISCONNECT

    async def _wait(self) -> None:
        waiter = self.conn.loop.create_future()
        self.waiter = waiter
        try:
            await waiter
        finally:
            self.waiter = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- send ------------------------------------------------------------------------------------
    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.gone or self.done:
            return
        kind = message["type"]
        if kind == "http.response.start":
            if self.started or self.head is not None:
                raise RuntimeError("http.response.start sent twice")
            self._prepare_head(message["status"], message.get("headers", ()))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        head = self.head
        if head is None and not self.started:
            raise RuntimeError("http.response.body before http.response.start")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.head_only:
            body = b""
        elif self.chunked:
            body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (b"" if more else b"0\r\n\r\n")
        if head is not None:
            self.head = None
            self.started = True
            body = head + body
        if body:
            conn.write(body)
        if not more:
            self.done = True
            self.wake()  # a receive() waiting for the disconnect: the exchange is over
            if not self.keep_alive:
                conn.close()
        elif conn.write_paused:
            await conn.drain()

    def _prepare_head(self, status: int, headers: Any) -> None:
        lines = [_status_line(status)]
        framed = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length" or lowered == b"transfer-encoding":
                framed = True
            elif lowered == b"connection" and b"close" in value.lower():
                self.keep_alive = False
            lines.append(b"%s: %s\r\n" % (name, value))
        if not framed and status >= 200 and status not in (204, 304) and self.scope["method"] != "HEAD":
            if self.scope["http_version"] == "1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends with the connection
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        self.head = b"".join(lines)


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one after another, keeps the idle timeout."""

    def __init__(self, server: LLMServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.gone = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._current: _Exchange | None = None       # the exchange being answered
        self._parsing: _Exchange | None = None       # the exchange whose request is being parsed
        self._queue: collections.deque[_Exchange] = collections.deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._wants_continue = False
        self._idle: asyncio.TimerHandle | None = None
        self._closing = False

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        local = transport.get_extra_info("sockname")
        self.local = (local[0], local[1]) if isinstance(local, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch here: the request is served as it is, with no body, and the connection
            # closes after it (see on_headers_complete); what follows on the wire is not read.
            self.pause_reading()
            exchange, self._parsing = self._parsing, None
            if exchange is not None:
                exchange.body_done = True
                exchange.wake()
        except httptools.HttpParserError as exc:
            # httptools wraps an exception raised in a callback in HttpParserCallbackError, as its context.
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.transport = None
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for exchange in (self._current, self._parsing, *self._queue):
            if exchange is not None:
                exchange.wake()
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._wants_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._wants_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = httptools.parse_url(self._url)
        raw_path: bytes = url.path
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        version = parser.get_http_version()
        scope: Scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": version,
            "method": parser.get_method().decode("ascii"), "scheme": "http", "path": path, "raw_path": raw_path,
            "query_string": url.query or b"", "root_path": "", "headers": self._headers, "client": self.client,
            "server": self.local,
        }
        keep_alive = parser.should_keep_alive() and not parser.should_upgrade() and not self._closing
        exchange = _Exchange(self, scope, keep_alive, self._wants_continue)
        self._parsing = exchange
        if self._current is None:
            self._start(exchange)
        else:
            self._queue.append(exchange)  # pipelined: answered once the ones before it are
            if len(self._queue) >= MAX_PIPELINE:
                self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None or exchange.done:
            # The answer is out already (say, a 413): the rest of the body is read (so that the next
            # request on the connection is found where it starts) and dropped.
            return
        exchange.body.append(body)
        if sum(map(len, exchange.body)) > HIGH_WATER:
            self.pause_reading()
        exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self._parsing
        if exchange is not None:
            exchange.body_done = True
            exchange.wake()
        self._parsing = None

    # -- the server's side -----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.write_paused and not self.gone:
            self._drain = self.loop.create_future()
            await self._drain

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def finished(self, exchange: _Exchange) -> None:
        """An answer is complete: start the next pipelined request, or wait for one (idle timeout)."""
        if exchange is not self._current:
            return
        self._current = None
        exchange.body.clear()
        if self.gone or self.transport is None or self.transport.is_closing():
            return
        if self._parsing is exchange:
            self.resume_reading()  # its unread body is still coming in, to be dropped
        if self._queue:
            self._start(self._queue.popleft())
            if len(self._queue) < MAX_PIPELINE:
                self.resume_reading()
        elif self._closing:
            self.close()
        else:
            self._arm_idle()

    def stop(self) -> None:
        """The server is stopping: close now if idle, else after the answer in flight."""
        self._closing = True
        if self._current is None:
            self.close()
        else:
            self._current.keep_alive = False
            for queued in self._queue:
                queued.keep_alive = False

    def _start(self, exchange: _Exchange) -> None:
        self._current = exchange
        task = self.loop.create_task(exchange.run(self.server.app))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def _arm_idle(self) -> None:
        self._idle = self.loop.call_later(self.server.keepalive, self.close)

    def _refuse(self, status: int, message: str) -> None:
        if self._current is None:  # else an answer is on its way out: the error would land in its middle
            self.write(_error(status, message))
        self.close()


class _HeadTooLarge(Exception):
    pass


class LLMServer:
    """Serves ``app`` on ``host:port`` until ``should_exit`` is set; the shape ``serve_all`` drives.

    ``startup`` and ``shutdown`` bracket the app's life (they take the place of the ASGI lifespan)."""

    def __init__(self, app: App, host: str, port: int, *, keepalive: float,
                 startup: Callable[[], Awaitable[None]], shutdown: Callable[[], Awaitable[None]],
                 graceful_seconds: float = 10.0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.graceful_seconds = graceful_seconds
        self._startup = startup
        self._shutdown = shutdown
        self.started = False
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._exit: asyncio.Event | None = None
        self._should_exit = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._exit is not None:
            self._exit.set()

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        if self._should_exit:
            return
        try:
            await self._startup()
        except Exception:
            log.exception("the LLM API failed to start")
            return
        try:
            try:
                server = await self.loop.create_server(lambda: _Connection(self), self.host, self.port,
                                                       reuse_address=True, backlog=2048)
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", self.host, self.port, exc.strerror or exc)
                return
            self.started = True
            await self._exit.wait()
            server.close()
            for conn in list(self.connections):
                conn.stop()
            if self.tasks:
                _, pending = await asyncio.wait(list(self.tasks), timeout=self.graceful_seconds)
                for task in pending:
                    task.cancel()
                if pending:
                    log.warning("stopped %d answers still in flight after %gs", len(pending), self.graceful_seconds)
                    await asyncio.wait(pending, timeout=1.0)
            for conn in list(self.connections):
                conn.close()
        finally:
            await self._shutdown()
