"""One pipelined connection to Redis for the limiter's hot path: admissions and settlements.

Why not redis-py's pool for these: per command it checks a connection out and back in, runs a health
check, arms a timeout and builds several objects — measured at ~27% of the gateway's CPU in Redis mode
(py-spy, bench/). Here every caller writes its command on the same connection at once and waits on a
future; hiredis parses the replies, which Redis sends in order, and each resolves the oldest waiter.
Redis runs commands one at a time anyway, so one connection loses nothing and batches writes for free.

Failure semantics (what the limiter needs to know, see limits/redis.py): a command either gets its reply
or raises ``ConnectionError``/``TimeoutError`` — in which case it may or may not have run. A reply that
takes longer than ``timeout`` fails every command waiting on the connection and drops it (later replies
could no longer be matched); the next command reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, BusyLoadingError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Error replies by their first word, as redis-py raises them: those meaning "Redis cannot serve this
# right now" are ConnectionErrors (the limiter's "unavailable"), the rest ResponseErrors.
_ERRORS: dict[str, type[Exception]] = {
    "NOSCRIPT": NoScriptError,
    "LOADING": BusyLoadingError,          # restarted, still reading its data from disk
    "READONLY": ReadOnlyError,            # a replica, e.g. during a failover
    "MASTERDOWN": RedisConnectionError,
    "BUSY": RedisConnectionError,         # a script running past lua-time-limit
    "TRYAGAIN": RedisConnectionError,
    "CLUSTERDOWN": RedisConnectionError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
}


def _error(reply: ResponseError) -> Exception:
    message = str(reply)
    return _ERRORS.get(message.split(" ", 1)[0], ResponseError)(message)


def _encode(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RespConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=ResponseError)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._owner._waiting
        while (reply := reader.gets()) is not False:
            if not waiting:
                break
            future, _ = waiting.popleft()
            if not future.done():
                if isinstance(reply, ResponseError):
                    future.set_exception(_error(reply))
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(self, RedisConnectionError(f"Redis closed the connection ({exc or 'EOF'})"))


class RespConnection:
    """A lazily (re)connected, pipelined connection to the Redis that ``like`` talks to."""

    def __init__(self, like: Redis, *, timeout: float = 2.0, connect_timeout: float = 1.0) -> None:
        kw = like.connection_pool.connection_kwargs
        self._host: str = kw.get("host", "127.0.0.1")
        self._port: int = int(kw.get("port", 6379))
        self._path: str | None = kw.get("path")  # a Unix socket
        self._db = int(kw.get("db", 0) or 0)
        self._username: str | None = kw.get("username")
        self._password: str | None = kw.get("password")
        self._ssl: ssl.SSLContext | None = None
        if "SSL" in like.connection_pool.connection_class.__name__:
            self._ssl = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
            if kw.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None

    async def call(self, *args: bytes | str | int) -> Any:
        """Send one command and return its reply (raises redis-py's exceptions)."""
        return await self._send(await self._ready(), [args])[0]

    async def pipeline(self, commands: list[tuple[bytes | str | int, ...]]) -> list[Any]:
        """Send several commands in one write; their replies, or the exception of each that failed."""
        if not commands:
            return []
        results: list[Any] = []
        for future in self._send(await self._ready(), commands):
            try:
                results.append(await future)
            except Exception as exc:
                results.append(exc)
        return results

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail(RedisConnectionError("the connection was closed"))

    # -- internals --------------------------------------------------------------------------------
    async def _ready(self) -> asyncio.Transport:
        """The connection's transport, connecting first if there is none."""
        if self._transport is None:
            await self._connect()
        transport = self._transport
        if transport is None or transport.is_closing():
            raise RedisConnectionError("not connected to Redis")
        return transport

    def _send(self, transport: asyncio.Transport,
              commands: list[tuple[bytes | str | int, ...]]) -> list[asyncio.Future[Any]]:
        """Write ``commands`` in one go; a future per reply, in order."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future[Any]] = []
        for _ in commands:
            future: asyncio.Future[Any] = loop.create_future()
            futures.append(future)
            self._waiting.append((future, now))
        transport.write(b"".join([_encode(c) for c in commands]) if len(commands) > 1 else _encode(commands[0]))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout / 4, self._watch)
        return futures

    async def _connect(self) -> None:
        if self._connecting is not None:  # another caller is connecting: wait for it
            await asyncio.shield(self._connecting)
            return
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            try:
                if self._path:
                    conn = loop.create_unix_connection(lambda: _Protocol(self), self._path)
                else:
                    conn = loop.create_connection(lambda: _Protocol(self), self._host, self._port, ssl=self._ssl,
                                                  server_hostname=self._host if self._ssl else None)
                transport, protocol = await asyncio.wait_for(conn, self._connect_timeout)
            except TimeoutError:
                raise RedisTimeoutError("timed out connecting to Redis") from None
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
            # AUTH and SELECT go first and alone: no caller's command may reach Redis before them.
            self._protocol = protocol
            setup: list[tuple[bytes | str | int, ...]] = []
            if self._password:
                setup.append(("AUTH", self._username, self._password) if self._username
                             else ("AUTH", self._password))
            if self._db:
                setup.append(("SELECT", self._db))
            try:
                for future in self._send(transport, setup) if setup else []:
                    await future
            except BaseException:
                transport.close()
                self._protocol = None
                raise
            self._transport = transport
            self._connecting.set_result(None)
        except asyncio.CancelledError:
            self._connecting.cancel()
            raise
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            self._connecting = None

    def _lost(self, protocol: _Protocol, exc: Exception) -> None:
        if protocol is self._protocol:
            self._transport = None
            self._protocol = None
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(exc)

    def _watch(self) -> None:
        """Every timeout/4 while commands wait: drop the connection if the oldest waited too long."""
        self._watchdog = None
        if not self._waiting:
            return
        if time.monotonic() - self._waiting[0][1] > self._timeout:
            if self._transport is not None:
                self._transport.abort()
                self._transport = None
                self._protocol = None
            self._fail(RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(self._timeout / 4, self._watch)
