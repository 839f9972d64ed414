"""A small HTTP/1.1 client for the one kind of request the gateway sends: a POST of a JSON body.

Why not aiohttp (which this replaced): on the request path it was the largest single cost, about a third of
the event loop's busy samples at concurrency 64 (docs/performance.md). The gateway needs one request shape,
keep-alive pooling, a read timeout and a body it can read as it arrives. Responses are parsed by httptools
(Node's llhttp; uvicorn's server already uses it), so the framing rules (Content-Length, chunked, keep-alive,
1xx) are a real parser's, not ours. What is ours: the pool, the timeouts and back-pressure.

One ``Pool`` per upstream base URL holds idle keep-alive connections, most recently used first. A ``Response``
is one connection while it carries an answer; ``release()`` hands the connection back to the pool when the
answer was read to its end and the server keeps the connection open, and closes it otherwise.

A long stream's body can also be handed over as it arrives, in the protocol's callback, to a ``Sink`` set
with ``Response.push`` while its reader waits: the stream relay does that for the plain token chunks, each of
which would otherwise cost a wake-up of the reading task (a future, a task step, a chain of coroutines).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httptools

from quotagate.upstreams.errors import OutOfSockets, Stale, Unreachable, UpstreamError, UpstreamTimeout

# A streamed answer the client reads slower than the model server writes is buffered up to this many bytes;
# then the socket is not read until the client catches up (the model server's own buffers then fill).
HIGH_WATER = 256 * 1024
# Idle connections kept per upstream; beyond that, a released connection is closed.
MAX_IDLE = 1024
# An answer released before its very end (a stream whose chunked terminator is still on its way after
# [DONE]) keeps its connection this long, and up to this many more bytes, to see the end and be reused.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 64 * 1024


# Takes body bytes as they arrive; returns None when it has taken them all, or the bytes it hands back: the
# sink is dropped, and those bytes, if any, are kept for read_chunk and the reader is woken.
Sink = Callable[[bytes], "bytes | None"]


class _Unsolicited(Exception):
    """Bytes after the end of the answer, in the same read (raised to stop the parser)."""


class Connection(asyncio.Protocol):
    """One keep-alive connection: the request goes out in one write, httptools parses the answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str) -> None:
        self.loop = loop
        self._loop = loop
        self._label = label                  # "http://host:port", for error messages
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._uses = 0                       # requests sent on this connection
        self._waiter: asyncio.Future[None] | None = None
        self._busy = False                   # a request is out and its answer not read to its end
        self._got_bytes = False              # any byte of the current answer has arrived
        self._status = 0
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._framed = False                 # Content-Length or chunked: the body is self-delimiting
        self._unsolicited = False            # a second answer began after this one's end
        self._draining: Pool | None = None   # released before its end; pooled when the end comes
        self._drained = 0
        self._drain_timer: asyncio.TimerHandle | None = None
        self._chunks: list[bytes] = []
        self._sink: Sink | None = None       # takes the body while the reader waits (push); dropped when it wakes
        self._buffered = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._timeout = 0.0
        # The read timeout, kept cheap: one timer per connection that, when it fires, compares the clock
        # with the current wait's deadline and sleeps again if need be (no timer armed and cancelled per wait).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Requests and answers are small and latency-bound: never hold a segment back (Nagle).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            # Bytes nobody asked for (say, a "408" an idle server sends before closing): the connection's
            # framing can no longer be trusted, so it is not reused.
            self._close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # (An exception raised in a callback comes out as HttpParserCallbackError: hence the flag.)
            if self._unsolicited:
                self._keep_alive = False  # the answer is whole; what follows it is not ours to read
                self._close()
            else:
                self._fail(UpstreamError(f"{self._label} answered with something that is not HTTP/1.1 ({exc})"))
                self._kill()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError(f"{self._label} switched to another protocol instead of answering"))
            self._kill()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._stop_draining()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._busy or self._complete:
            return
        if self._head_done and not self._framed and exc is None:
            # No Content-Length and not chunked: the body ends where the connection does (RFC 9112 §6.3);
            # a reset (exc) is not an end but a break.
            self._complete = True
            self._keep_alive = False
            self._wake()
        elif not self._got_bytes and self._uses > 1:
            self._fail(Stale(f"{self._label} closed the connection before answering"))
        elif not self._got_bytes:
            self._fail(UpstreamError(f"{self._label} closed the connection before answering"))
        else:
            self._fail(UpstreamError(f"{self._label} closed the connection in the middle of its answer"))

    def pause_writing(self) -> None:
        pass  # one bounded request body per connection: the transport's buffer takes it whole

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._complete:
            self._unsolicited = True
            raise _Unsolicited  # a second answer to one request: stops the parser (see data_received)

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length":
            self._framed = True
        elif lowered == b"transfer-encoding":
            # Only a final "chunked" delimits the body; any other coding runs to the close (RFC 9112 §6.3).
            self._framed = value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # 1xx (100 Continue, 103 Early Hints): an interim answer; the real one follows
        self._status = status
        self._keep_alive = self._parser.should_keep_alive()
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._draining is not None:
            self._drained += len(body)
            if self._drained > DRAIN_BYTES:
                self._stop_draining()
                self.abort()
            return
        sink = self._sink
        if sink is not None:
            self._deadline = self._loop.time() + self._timeout  # the read timeout counts from the last bytes
            rest = sink(body)
            if rest is None:
                return
            self._sink = None
            if not rest:
                return  # taken, and the sink wants no more: the next bytes are read_chunk's
            body = rest
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head_done:
            self._complete = True
            self._wake()
            pool = self._draining
            if pool is not None:
                self._stop_draining()
                if self.finish():
                    pool.put(self)
        else:
            self._framed = False  # the end of an interim 1xx answer: reset for the final one

    # -- the exchange ----------------------------------------------------------------------------
    @property
    def reusable(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing() and not self._busy

    async def exchange(self, request: bytes, read_timeout: float) -> int:
        """Send ``request`` (head and body) and wait for the answer's head; returns its status.

        ``read_timeout`` bounds each wait for the server's next bytes, not the whole answer: a stream may
        run for as long as the model keeps generating."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise Stale(f"{self._label} closed the connection before answering")
        self._busy = True
        self._uses += 1
        self._got_bytes = self._head_done = self._complete = self._framed = self._keep_alive = False
        self._status = 0
        self._error = None
        self._timeout = read_timeout
        transport.write(request)
        while not self._head_done:
            await self._wait()
        return self._status

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call, waiting for some; b"" at the end of the body."""
        while not self._chunks:
            if self._complete:
                return b""
            await self._wait()
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def push(self, sink: Sink) -> None:
        """Hand the body's next bytes to ``sink`` as they arrive, until the reader wakes (for the end of the
        body, an error, or bytes the sink handed back). Only while nothing is buffered: those come first."""
        if not self._chunks and self._busy:
            self._sink = sink

    def finish(self) -> bool:
        """End the exchange; True when the connection can carry another request."""
        reusable = self._complete and self._keep_alive and self._error is None and not self._chunks
        self._sink = None
        self._busy = False
        self._chunks.clear()
        self._buffered = 0
        if not reusable:
            self._close()
        return reusable and self.transport is not None

    def release(self, pool: Pool) -> None:
        """Done with the answer: back to ``pool`` if it was read to its end and the server keeps the
        connection; if only its last bytes are missing (a stream's chunked terminator after [DONE]),
        once they come, within DRAIN_SECONDS; else closed."""
        if (not self._complete and self._head_done and self._framed and self._keep_alive and self._error is None
                and self.transport is not None):
            self._chunks.clear()
            self._buffered = 0
            if self._paused:
                self._paused = False
                self.transport.resume_reading()
            self._draining = pool
            self._drained = 0
            self._drain_timer = self._loop.call_later(DRAIN_SECONDS, self.abort)
            return
        if self.finish():
            pool.put(self)

    def abort(self) -> None:
        """Drop the connection now (the client went away: stop the model server generating for no one)."""
        self._stop_draining()
        self._fail(UpstreamError(f"the exchange with {self._label} was abandoned"))
        self._kill()

    # -- internals -------------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._deadline = self._loop.time() + self._timeout
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check_deadline)
        try:
            await waiter
        finally:
            self._waiter = None
            self._sink = None  # what comes now is read_chunk's, in order, until the reader pushes again

    def _wake(self) -> None:
        self._sink = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self._sink = None
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._error)

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting now: the next wait arms a timer again
        left = self._deadline - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check_deadline)
            return
        self._fail(UpstreamTimeout(f"the model server did not answer within {self._timeout:g}s"))
        self._kill()

    def _stop_draining(self) -> None:
        self._draining = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _close(self) -> None:
        """Close after what is written has gone out (an exchange that ended cleanly)."""
        self._paused = False
        if self.transport is not None:
            self.transport.close()

    def _kill(self) -> None:
        """Close now, dropping unsent bytes: a server that stopped reading never takes them."""
        self._paused = False
        if self.transport is not None:
            self.transport.abort()


class Response:
    """A model server's answer, its body unread. ``release()`` or ``close()`` it exactly once or more."""

    __slots__ = ("_conn", "_pool", "status")

    def __init__(self, pool: Pool, conn: Connection, status: int) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self.status = status

    async def read(self) -> bytes:
        """The whole body (raises UpstreamTimeout, or UpstreamError if it broke off)."""
        conn = self._live()
        parts = []
        while chunk := await conn.read_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_chunk(self) -> Awaitable[bytes]:
        """The next piece of the body as it arrives; b"" at its end. (The connection's own coroutine: one
        frame less per chunk of a stream.)"""
        return self._live().read_chunk()

    def push(self, sink: Sink) -> None:
        """Until the next ``read_chunk`` returns, hand the body's bytes to ``sink`` as they arrive (``Sink``)."""
        if self._conn is not None:
            self._conn.push(sink)

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it is still good."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release(self._pool)

    def close(self) -> None:
        """Drop the connection, even mid-answer."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
            conn.finish()

    def _live(self) -> Connection:
        if self._conn is None:
            raise UpstreamError("the answer was already released")
        return self._conn


class Pool:
    """Keep-alive connections to one upstream, and the head of every request sent to it."""

    def __init__(self, base_url: str, *, connect_timeout: float, keepalive: float,
                 headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream {base_url!r} must be an http:// or https:// URL with a host")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self._tls else None
        self.label = f"{parts.scheme}://{parts.netloc}"
        self._base_path = parts.path.rstrip("/")
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        host = parts.netloc.rpartition("@")[2]  # never a userinfo part in the Host header
        static = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._static = f"Host: {host}\r\nAccept-Encoding: identity\r\n{static}".encode("latin-1")
        self._lines: dict[str, bytes] = {}
        self._idle: collections.deque[Connection] = collections.deque()
        self._reaper: asyncio.TimerHandle | None = None

    def request(self, path: str, body: bytes, request_id: str | None) -> bytes:
        """The bytes of a POST of ``body`` (JSON) to ``path`` under the base URL, with an X-Request-Id
        header unless ``request_id`` is None."""
        line = self._lines.get(path)
        if line is None:
            line = self._lines[path] = f"POST {self._base_path}{path} HTTP/1.1\r\n".encode("latin-1") + self._static
        if request_id is None:
            return b"%sContent-Length: %d\r\n\r\n%s" % (line, len(body), body)
        return b"%sX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (line, request_id.encode(), len(body), body)

    async def post(self, request: bytes, read_timeout: float, *, fresh: bool = False) -> Response:
        """Send a request made by ``request()`` on a pooled (or, if ``fresh`` or none is idle, a new)
        connection; returns when the answer's head is in."""
        conn = None if fresh else self._take()
        if conn is None:
            conn = await self._connect()
        try:
            status = await conn.exchange(request, read_timeout)
        except BaseException:
            conn.abort()
            conn.finish()
            raise
        return Response(self, conn, status)

    def put(self, conn: Connection) -> None:
        now = conn.idle_since = time.monotonic()
        idle = self._idle
        # The oldest idle connections past their keep-alive, or closed by their server: let them go.
        while idle and (not idle[0].reusable or now - idle[0].idle_since > self._keepalive):
            idle.popleft().abort()
        if len(idle) >= MAX_IDLE:
            conn.abort()
            return
        idle.append(conn)
        if self._reaper is None:
            self._reaper = conn.loop.call_later(self._keepalive, self._reap)

    def _reap(self) -> None:
        """Close idle connections past their keep-alive even when no request comes to prune them (a server
        that never closes idle connections would otherwise keep up to MAX_IDLE of them open)."""
        self._reaper = None
        idle = self._idle
        now = time.monotonic()
        while idle and (not idle[0].reusable or now - idle[0].idle_since > self._keepalive):
            idle.popleft().abort()
        if idle:
            self._reaper = idle[0].loop.call_later(self._keepalive, self._reap)

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        while self._idle:
            self._idle.pop().abort()

    def _take(self) -> Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be open at the other end
            if conn.reusable and now - conn.idle_since <= self._keepalive:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: Connection(loop, self.label), self._host, self._port,
                                                       ssl=self._ssl)
        except TimeoutError:
            raise Unreachable(f"{self.label} did not accept a connection within {self._connect_timeout:g}s") \
                from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise OutOfSockets("the gateway has no file descriptor left for a connection to the model "
                                   "server; retry shortly") from None
            raise Unreachable(f"{self.label}: {type(exc).__name__}: {exc}") from None
        return conn
