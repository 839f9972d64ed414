"""quotagate's HTTP/1.1 server for its listeners: the part of ASGI its apps use, and nothing else, on uvloop.

It serves the LLM API, the console (API and web) and the metrics listener; only the demo's simulated
model server still runs on uvicorn. Why not uvicorn:

- speed: on the LLM API's request path uvicorn's protocol was a quarter of the event loop's CPU once
  aiohttp was gone (docs/performance.md), for generality the apps do not use: validation of the app's
  own headers, access logging, WebSockets, an asyncio.Event and two socket writes per answer;
- robustness: uvicorn arms no timer on a new connection and drops its keep-alive timer on the first
  byte of a request, so a client that connects and sends nothing, or half a request head, holds a
  connection (and a file descriptor) forever — measured on the console before it moved here.

This server parses requests with httptools (llhttp, as uvicorn does), hands the app a plain ASGI scope,
and writes an answer's head together with its first body bytes, so a whole small answer leaves in one
write. What it keeps from a full server: caps on the connections open at once, per listener and per client
address (connlimits), a short deadline for a new connection's first request head, keep-alive with an idle
timeout (which also bounds the time a later request's head may take), a timeout for a request body that
stalls, pipelined requests answered in order, ``Expect: 100-continue``, request bodies held back past
256 KiB until the app reads them, write back-pressure for streams, ``http.disconnect`` when the client
goes away, HTTP/1.0 clients, HEAD, a 400 for malformed requests and a 431 for oversized heads (in the LLM
API's error shape, whose ``code`` and ``message`` the console's clients read too), and a graceful stop
that lets answers in flight finish (up to ``graceful_seconds``). The app is trusted: its status and
headers are sent as given. There is no ASGI lifespan: ``startup`` and ``shutdown`` are plain callables.
Proxy headers are the app's business (the console wraps itself in uvicorn's ProxyHeadersMiddleware; the
LLM API reads none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

from quotagate.connlimits import ConnectionLimits, address_key
from quotagate.gateway.errors import ApiError

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
# Any ASGI app (Starlette's and uvicorn's own type their messages more narrowly than each other).
App = Callable[[Any, Any, Any], Awaitable[None]]

# Request body bytes buffered before the app reads them; past this the socket is not read.
HIGH_WATER = 256 * 1024
# The request line and headers together; a longer head is refused with 431 (a request is a few hundred bytes).
MAX_HEAD_BYTES = 64 * 1024
# Pipelined requests queued behind the one being answered before the socket is no longer read; one read
# can still hold many more (the parser parses all of it), up to FLOOD_PIPELINE, past which the client is
# not one that waits for answers and the connection is dropped.
MAX_PIPELINE = 16
# Seconds a request body may stall (no bytes while the app waits for more) before the app is told it timed
# out (nginx's client_body_timeout is 60 s; an API client sends its body at once). A request's head has the
# keep-alive time from its first byte.
BODY_TIMEOUT = 30.0
FLOOD_PIPELINE = 1024

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_DISCONNECT: Message = {"type": "http.disconnect"}
# When a request body stalls for ``body_timeout``, or the rest of it cannot be parsed (a bad chunk size),
# ``receive`` returns a disconnect (the body will not be had, as far as ASGI goes) and notes why in the
# scope under this key, "timeout" or "malformed", so that an app can answer 408 or 400 instead of taking
# the client for gone (the LLM app and the console do; the connection closes after the answer). The scope
# rather than the message, because Starlette turns the message into an exception (ClientDisconnect).
BODY_ERROR = "quotagate.body_error"


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def _error(error: ApiError) -> bytes:
    """The app's OpenAI-shaped error, whole, for an answer the app could not give (then the connection closes)."""
    body = error.body()
    return (_status_line(error.status) + b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body))


_FAILED = ApiError(500, "internal_error", "the gateway failed on this request")
# The whole answer to a connection over a cap (connlimits), written before the close.
_BUSY = _error(ApiError(503, "too_many_connections", "this server has too many connections open (from your "
                        "address, or in all); try again shortly")).replace(b"connection: close\r\n",
                                                                          b"connection: close\r\nretry-after: 1\r\n")


class _Exchange:
    """One request and its answer: the ``receive`` and ``send`` the app is given."""

    __slots__ = ("body", "body_done", "body_error", "buffered", "chunked", "conn", "done", "head", "head_only",
                 "keep_alive", "scope", "started", "told_end", "waiter", "wants_continue")

    def __init__(self, conn: _Connection, scope: Scope, keep_alive: bool, wants_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.wants_continue = wants_continue
        self.head_only = scope["method"] == "HEAD"
        self.body: list[bytes] = []
        self.buffered = 0                    # bytes in ``body`` (a running count: chunks can be one byte each)
        self.body_done = False
        self.told_end = False
        # "timeout": the body stalled for body_timeout (_Connection._check_body); "malformed": the rest of it
        # could not be parsed (_Connection._refuse).
        self.body_error: str | None = None
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
                log.error("the app failed on %s %s", self.scope["method"], self.scope["path"], exc_info=exc)
            if not self.started and not self.conn.gone:
                self.conn.write(_error(_FAILED))
            self.conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            if not self.done and not self.conn.gone:
                log.error("the app returned without finishing its answer to %s %s", self.scope["method"],
                          self.scope["path"])
                if not self.started:
                    self.conn.write(_error(_FAILED))
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
            while not self.body and not self.body_done and not conn.gone and not self.done:
                if self.body_error == "malformed":
                    self.told_end = True
                    self.scope[BODY_ERROR] = "malformed"
                    return _DISCONNECT  # (_refuse has made the connection close after the answer)
                conn.resume_reading()
                conn.body_wait_began()
                try:
                    await self._wait()
                finally:
                    conn.body_wait_since = None
                if self.body_error == "timeout":
                    self.body_error = None
                    if not self.body and not self.body_done:  # (bytes that came at the deadline win)
                        # A body that stops coming would hold this exchange (and its task) forever. What is
                        # left of it is read and dropped, and the connection closes after the answer.
                        self.keep_alive = False
                        self.told_end = True
                        conn.go_deaf()
                        self.scope[BODY_ERROR] = "timeout"
                        return _DISCONNECT
            if conn.gone or self.done:
                return _DISCONNECT
            body = self.body
            chunk = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            self.buffered = 0
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
        if conn.write_paused and not conn.gone:
            await conn.drain()  # a client that does not read holds the answers back, not our memory
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

    # -- the direct writer ---------------------------------------------------------------------------
    def write(self, body: bytes) -> bool:
        """Body bytes of an answer under way, written now, with no coroutine (a relayed stream writes most of
        its chunks from the upstream connection's callback: gateway/streaming.py), as ``send`` writes a body
        message that is not the last. Whether the client takes more at once: if not, the next bytes must go
        through ``send``, which waits for it. Only once ``send`` has written the answer's first body bytes."""
        conn = self.conn
        if not self.done and not self.head_only:
            conn.write(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)
        return not conn.write_paused

    def _prepare_head(self, status: int, headers: Any) -> None:
        if self.wants_continue:
            # Answered before asking for the body (a 413 from Content-Length, a 401): the client may send
            # the body or not, so where the next request starts is unknown. (Without Expect, a body still
            # coming after the answer is read and dropped, and the connection goes on.)
            self.keep_alive = False
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


def direct_writer(send: Any) -> _Exchange | None:
    """The exchange behind an ASGI ``send`` of this server (its ``write``), or None for another server's, or
    a send that is not one (a buffer)."""
    owner = getattr(send, "__self__", None)
    return owner if isinstance(owner, _Exchange) else None


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one after another, keeps the idle timeout."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        # Made at the first read: a connection that never sends a byte costs less (a flood of idle
        # connections up to the caps is what they bound; a parser and a deque were a third of each one).
        self.parser: httptools.HttpRequestParser | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.gone = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._current: _Exchange | None = None       # the exchange being answered
        self._parsing: _Exchange | None = None       # the exchange whose request is being parsed
        self._queue: list[_Exchange] = []             # (at most FLOOD_PIPELINE: pop(0) is cheap enough)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._wants_continue = False
        self._in_head = False                        # between a request's first byte and its head's end
        self._head_raw = 0                           # bytes read while in a head (httptools buffers headers)
        self._head_began: float | None = None        # loop time of the first read that ended in this head
        # The idle timeout, kept cheap: one timer per connection that, when it fires, checks how long the
        # connection has really been idle and sleeps again if need be (arming and cancelling a timer around
        # every request cost more than the check).
        self._idle_since: float | None = None        # None: a request is being read or answered
        self._idle: asyncio.TimerHandle | None = None
        # The body timeout, kept as cheap the same way: set while the app waits for body bytes.
        self.body_wait_since: float | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._deaf = False                           # what comes in is dropped (after an Upgrade, an error)
        self._flood = False
        self._admitted = False                       # counted in the listener's connection limits
        self._address: str | None = None             # what the per-address cap counts it under
        self._served = False                         # a request has started: the first head came in time

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self._address = address_key(self.client[0] if self.client else None)
        if not self.server.limits.admit(self._address, self.loop):
            # Answered and closed at once, so that its descriptor is free before the next accept.
            self._deaf = True
            self.gone = True
            transport.write(_BUSY)  # type: ignore[attr-defined]  # (a BaseTransport: it is a Transport)
            transport.close()
            return
        self._admitted = True
        local = transport.get_extra_info("sockname")
        self.local = (local[0], local[1]) if isinstance(local, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        # The first request's head must be whole within first_head_timeout of connecting (a connection
        # that was never used costs a descriptor and earns nothing); later heads get the keep-alive time.
        first = self.server.first_head_timeout
        now = self.loop.time()
        self._idle_since = now - (self.server.keepalive - first)  # (_check_idle: expires at now + first)
        self._idle = self.loop.call_later(first, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self._deaf:
            return
        try:
            if self.parser is None:
                self.parser = httptools.HttpRequestParser(self)
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch here: the request is served as it is, with no body, and the connection
            # closes after it (see on_headers_complete); what follows on the wire is not read.
            self.go_deaf()
            exchange, self._parsing = self._parsing, None
            if exchange is not None:
                exchange.body_done = True
                exchange.wake()
        except httptools.HttpParserError as exc:
            # (An exception raised in a callback comes out as HttpParserCallbackError: hence the flags.)
            if self._flood:
                self.go_deaf()
                self.abort()
            elif self._head_raw > MAX_HEAD_BYTES:
                self._refuse(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head:
            # httptools keeps an unfinished header line to itself: count what came in while in a head.
            self._head_raw += len(data)
            if self._head_raw > MAX_HEAD_BYTES:
                self._refuse(431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
                return
        if self._served and self._in_head and self._head_began is None and self._current is None \
                and not self._closing and self.transport is not None:
            # The first read of a new request's head: the connection gets a keep-alive time from here to
            # send the rest of it. Other bytes read while idle — the rest of a head, CRLFs between requests,
            # the tail of a body already answered (read and dropped) — leave the idle clock running, so that
            # no trickle of bytes can hold a connection open (nginx's lingering_time, in effect).
            self._head_began = self.loop.time()
            self._arm_idle(self._head_began)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.transport = None
        if self._admitted:
            self._admitted = False
            self.server.limits.release(self._address)
        self.server.connections.discard(self)
        self._in_head = False
        self._idle_since = None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
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
        self._head_raw = 0
        self._in_head = True
        self._head_began = None  # set (lazily) when a read ends inside this head
        self._wants_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_raw += len(url)
        if self._head_raw > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: never a header of the request the app was given
        self._head_raw += len(name) + len(value) + 4
        if self._head_raw > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._wants_continue = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        assert parser is not None  # (a callback of its own)
        raw_url = self._url
        if raw_url[:1] == b"/" and b"?" not in raw_url and b"#" not in raw_url:
            raw_path, query = raw_url, b""  # the usual origin-form path: nothing for parse_url to split
        else:
            url = httptools.parse_url(raw_url)
            raw_path, query = url.path or b"/", url.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        version = parser.get_http_version()
        scope: Scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": version,
            "method": parser.get_method().decode("ascii"), "scheme": "http", "path": path, "raw_path": raw_path,
            "query_string": query, "root_path": "", "headers": self._headers, "client": self.client,
            "server": self.local,
        }
        # HTTP/1.0 gets one answer per connection (and no 100 Continue, which it does not know).
        http11 = version == "1.1"
        keep_alive = http11 and parser.should_keep_alive() and not parser.should_upgrade() and not self._closing
        exchange = _Exchange(self, scope, keep_alive, self._wants_continue and http11)
        self._parsing = exchange
        if self._current is None:
            self._start(exchange)
        else:
            self._queue.append(exchange)  # pipelined: answered once the ones before it are
            if len(self._queue) >= MAX_PIPELINE:
                self.pause_reading()
                if len(self._queue) >= FLOOD_PIPELINE:
                    # One read held more requests than a client that waits for answers ever sends.
                    self._flood = True
                    raise _HeadTooLarge

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange is None or exchange.done:
            # The answer is out already (say, a 413): the rest of the body is read (so that the next
            # request on the connection is found where it starts) and dropped.
            return
        exchange.body.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > HIGH_WATER:
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
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait until the client has taken enough of what was written; a client that takes nothing for the
        keep-alive time is dropped (else it would hold its answer, and a model server's stream, forever)."""
        if self.write_paused and not self.gone:
            self._drain = self.loop.create_future()
            try:
                await asyncio.wait_for(self._drain, self.server.keepalive)
            except TimeoutError:
                self.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent bytes (a client that does not read would hold them forever)."""
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if len(self._queue) < MAX_PIPELINE:
            self.resume_reading_now()

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
            self._start(self._queue.pop(0))
            if len(self._queue) < MAX_PIPELINE:
                self.resume_reading()
        elif self._closing:
            self.close()
        else:
            self._arm_idle(self._head_began if self._in_head else None)

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
        self._served = True
        self._current = exchange
        self._idle_since = None  # busy until the answer is out (finished() arms the idle clock again)
        task = self.loop.create_task(exchange.run(self.server.app))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def _arm_idle(self, since: float | None = None) -> None:
        self._idle_since = self.loop.time() if since is None else since
        if self._idle is None:
            self._idle = self.loop.call_later(self.server.keepalive, self._check_idle)

    def _check_idle(self) -> None:
        self._idle = None
        if self.gone:
            return
        since = self._idle_since
        if since is None:  # busy: look again a whole keep-alive later
            self._idle = self.loop.call_later(self.server.keepalive, self._check_idle)
            return
        left = since + self.server.keepalive - self.loop.time()
        if left <= 0:
            if not self._served:
                self.server.limits.head_timeouts += 1
            self.abort()
        else:
            self._idle = self.loop.call_later(left, self._check_idle)

    def body_wait_began(self) -> None:
        self.body_wait_since = self.loop.time()
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self.server.body_timeout, self._check_body)

    def _check_body(self) -> None:
        self._body_timer = None
        since = self.body_wait_since
        if since is None or self.gone:
            return  # not waiting: the next wait arms the timer again
        left = since + self.server.body_timeout - self.loop.time()
        if left > 0:
            self._body_timer = self.loop.call_later(left, self._check_body)
        elif self._current is not None:
            self._current.body_error = "timeout"
            self._current.wake()

    def go_deaf(self) -> None:
        # Still read, but drop: closing a socket with unread bytes resets it, and a reset can destroy the
        # answer on its way to the client before the client reads it.
        self._deaf = True
        self.resume_reading_now()

    def resume_reading_now(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def _refuse(self, status: int, message: str) -> None:
        self.go_deaf()
        self._queue.clear()
        if self._current is None:
            self.write(_error(ApiError(status, "invalid_request_error", message)))
            self.close()
        else:
            # An answer is on its way out: the error would land in its middle. Close after it instead.
            # If the app still waits for the body that broke, it is told so (and answers 400).
            self._closing = True
            current = self._current
            current.keep_alive = False
            if current is self._parsing and not current.body_done:
                current.body_error = "malformed"
                current.wake()


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop the parser (see the flags checked in data_received)."""


class HTTPServer:
    """Serves ``app`` on ``host:port`` until ``should_exit`` is set; the shape ``serve_all`` drives.

    ``startup`` and ``shutdown``, if given, bracket the app's life (they take the place of the ASGI
    lifespan). ``max_connections`` (None: no cap) and ``max_per_address`` (0: no cap) bound the client
    connections open at once (connlimits); a new connection's first request head must be whole within
    ``first_head_timeout`` (at most ``keepalive``) of connecting. ``name`` names the listener in the log
    and on /metrics. ``sockets``, if given, are listening sockets to accept on instead of binding
    ``host:port`` (a worker's, see workers/)."""

    def __init__(self, app: App, host: str, port: int, *, keepalive: float,
                 startup: Callable[[], Awaitable[None]] | None = None,
                 shutdown: Callable[[], Awaitable[None]] | None = None,
                 graceful_seconds: float = 10.0, body_timeout: float = BODY_TIMEOUT, name: str = "http",
                 max_connections: int | None = None, max_per_address: int = 0,
                 first_head_timeout: float | None = None, sockets: list[socket.socket] | None = None) -> None:
        self.app = app
        self.sockets = sockets  # already listening (a worker's, from its parent): served instead of binding
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.first_head_timeout = keepalive if first_head_timeout is None else min(first_head_timeout, keepalive)
        self.limits = ConnectionLimits(name, max_connections, max_per_address)
        self.body_timeout = body_timeout
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
        servers: list[asyncio.Server] = []
        try:
            if self._startup is not None:
                await self._startup()
            try:
                if self.sockets is None:
                    servers.append(await self.loop.create_server(lambda: _Connection(self), self.host, self.port,
                                                                 reuse_address=True, backlog=2048))
                else:
                    for sock in self.sockets:
                        servers.append(await self.loop.create_server(lambda: _Connection(self), sock=sock))
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", self.host, self.port, exc.strerror or exc)
                return
            self.started = True
            await self._exit.wait()
            for server in servers:
                server.close()
            for conn in list(self.connections):
                conn.stop()
            deadline = self.loop.time() + self.graceful_seconds
            while self.tasks and self.loop.time() < deadline:  # (pipelined requests start as others end)
                await asyncio.wait(list(self.tasks), timeout=deadline - self.loop.time())
            if self.tasks:
                log.warning("stopping %d answers still in flight after %gs", len(self.tasks), self.graceful_seconds)
                for task in list(self.tasks):
                    task.cancel()
                await asyncio.wait(list(self.tasks), timeout=1.0)
            for conn in list(self.connections):
                conn.abort()
        except Exception:
            log.exception("the listener on %s:%d failed", self.host, self.port)
        finally:
            for server in servers:
                server.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 1.0)
            self.limits.close()
            if self._shutdown is not None:
                await self._shutdown()
