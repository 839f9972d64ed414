"""The limiter's pipelined Redis connection (limits/resp.py): replies matched in order under
concurrency, errors per command, the database and password of the URL, a silent Redis timed out, and a
restarted Redis reconnected to without any help."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quotagate.limits.resp import RespConnection
from tests.fakes.redis_server import RedisServer
from tests.limits.conftest import REDIS_URL, redis_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''")]


async def test_concurrent_commands_get_their_own_replies() -> None:
    async with redis_prefix() as prefix:
        conn = RespConnection(Redis.from_url(REDIS_URL))
        try:
            replies = await asyncio.gather(*(conn.call("INCRBY", f"{prefix}:n{i % 7}", i) for i in range(500)))
            assert len(replies) == 500
            totals = {i: sum(j for j in range(500) if j % 7 == i) for i in range(7)}
            for i in range(7):
                assert int(await conn.call("GET", f"{prefix}:n{i}")) == totals[i]
            # a pipeline: one write, one outcome per command, an error in the middle stays its own
            out = await conn.pipeline([("SET", f"{prefix}:a", "1"), ("INCR", f"{prefix}:nope", "x"),
                                       ("GET", f"{prefix}:a")])
            assert out[0] == b"OK" and isinstance(out[1], ResponseError) and out[2] == b"1"
            with pytest.raises(NoScriptError):
                await conn.call("EVALSHA", "0" * 40, 0)
        finally:
            await conn.close()


async def test_the_database_and_password_of_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        admin = Redis.from_url(server.url)
        await admin.config_set("requirepass", "s3cret")
        await admin.aclose()
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        conn = RespConnection(Redis.from_url(url))
        # many first callers at once: every command waits for AUTH and SELECT
        await asyncio.gather(*(conn.call("SET", f"where{i}", "db3") for i in range(50)))
        await conn.close()
        check = Redis.from_url(url)
        assert await check.get("where0") == b"db3"
        assert await check.execute_command("DBSIZE") == 50
        await check.aclose()
        with pytest.raises(AuthenticationError):  # a ConnectionError: the limiter reports Redis unavailable
            await RespConnection(Redis.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0")).call("PING")
    finally:
        server.kill()


async def test_a_silent_redis_times_out_and_the_connection_is_dropped() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = RespConnection(Redis.from_url(f"redis://127.0.0.1:{port}/0"), timeout=0.3)
    try:
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(conn.call("PING"), 5)
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(conn.call("PING"), 5)
        assert len(accepted) == 2  # the first connection was dropped, the second call made a new one
    finally:
        await conn.close()
        server.close()


async def test_a_restarted_redis_is_reconnected_to(own_redis: RedisServer) -> None:
    conn = RespConnection(Redis.from_url(own_redis.url))
    try:
        assert await conn.call("PING") == b"PONG"
        own_redis.kill()
        with pytest.raises(RedisConnectionError):
            await conn.call("PING")
        own_redis.start()
        assert await conn.call("PING") == b"PONG"
    finally:
        await conn.close()


async def test_error_replies_raise_what_redis_py_raises() -> None:
    """A Redis that is loading its data, read-only or busy is "unavailable" (a ConnectionError to the
    limiter, which answers 503), not a failed request."""
    from redis.exceptions import BusyLoadingError, ReadOnlyError

    replies = {b"PING": b"-LOADING Redis is loading the dataset in memory\r\n",
               b"ECHO": b"-READONLY You can't write against a read only replica.\r\n",
               b"TIME": b"-BUSY Redis is busy running a script.\r\n",
               b"INFO": b"-ERR unknown thing\r\n"}

    async def fake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while line := await r.readline():
            for name, reply in replies.items():
                if line.strip().upper() == name:
                    w.write(reply)

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = RespConnection(Redis.from_url(f"redis://127.0.0.1:{port}/0"))
    try:
        with pytest.raises(BusyLoadingError):
            await conn.call("PING")
        with pytest.raises(ReadOnlyError):
            await conn.call("ECHO")
        with pytest.raises(RedisConnectionError):
            await conn.call("TIME")
        with pytest.raises(ResponseError) as info:
            await conn.call("INFO")
        assert not isinstance(info.value, RedisConnectionError) and "unknown thing" in str(info.value)
    finally:
        await conn.close()
        server.close()
