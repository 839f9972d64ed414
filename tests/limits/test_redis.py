"""What only the Redis limiter promises: one round trip, Redis's clock, TTLs, revocation markers,
several instances sharing it, settlements never lost, and a documented policy when Redis is down.

Outage tests run their own throwaway ``redis-server`` (never the shared one), killed and restarted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from quotagate.keys.models import PERIODS
from quotagate.limits import scripts
from quotagate.limits.errors import LimiterUnavailable
from quotagate.limits.periods import period_bounds
from quotagate.limits.redis import RedisLimiter
from tests.fakes.redis_server import RedisServer
from tests.limits.conftest import REDIS_URL, make_key, redis_prefix

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''")]


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def shared() -> AsyncIterator[RedisLimiter]:
    """A limiter on the shared Redis, on Redis's own clock, under a prefix of its own."""
    async with redis_prefix() as prefix:
        limiter = RedisLimiter.from_url(REDIS_URL, prefix=prefix)
        yield limiter
        await limiter.close()


# --- the script's own calendar ------------------------------------------------------------------


async def test_lua_periods_match_python(shared: RedisLimiter) -> None:
    rng = random.Random(5)
    moments = [rng.randrange(0, 4_102_444_800) for _ in range(3000)]
    moments += [period_bounds("month", t)[0] + d for t in range(0, 4_102_444_800, 86_400 * 29) for d in (-1, 0)]
    bounds = shared.client.register_script(scripts.BOUNDS)
    pipe = shared.client.pipeline(transaction=False)
    cases = [(p, t) for t in moments for p in PERIODS]
    for p, t in cases:
        await bounds(args=[p, t], client=pipe)
    results = await pipe.execute()
    for (p, t), got in zip(cases, results, strict=True):
        assert tuple(got) == period_bounds(p, t), (p, t)


# --- one round trip, Redis's clock, TTLs -------------------------------------------------------


async def test_one_round_trip_per_admission(own_redis: RedisServer) -> None:
    limiter = RedisLimiter.from_url(own_redis.url, settle_delay=60)
    probe = Redis.from_url(own_redis.url)
    try:
        key = make_key(rpm=1000, tpm=10**6, token_limit=10**7)
        await limiter.settle(key, await limiter.admit(key, 1, 1), 1)
        await limiter.flush()  # the scripts are loaded (once per Redis server)
        async with probe.monitor() as monitor:
            await probe.ping()  # MONITOR is on: the connection is ready
            for i in range(20):
                adm = await limiter.admit(key, 10, 10)
                assert adm.admitted
                if i % 2:
                    await limiter.settle(key, adm, 5)  # rides inside the key's next admission
            await limiter.admit(key, 1, 1)  # also carries the last queued settlement
            seen = []
            while True:
                cmd = await asyncio.wait_for(monitor.next_command(), 5)
                name = cmd["command"].split()[0].upper()
                if cmd["client_type"] != "lua" and name not in ("HELLO", "PING"):  # the probe's own
                    seen.append(name)
                if len(seen) == 21:
                    break
        # 21 admissions, one EVALSHA each, and nothing else (no SCRIPT EXISTS, no separate settle)
        assert set(seen) == {"EVALSHA"}
        assert limiter.pending_settlements() == 0
        # 1 + 10 x 5 settled, 10 x 20 still reserved, + 2 reserved by the last one
        assert (await limiter.state(key)).tokens_in_window == 1 + 50 + 200 + 2
    finally:
        await probe.aclose()
        await limiter.close()


async def test_other_keys_settlements_are_written_in_one_pipeline(shared: RedisLimiter) -> None:
    keys = [make_key(tpm=10_000) for _ in range(30)]
    for key in keys:
        await shared.settle(key, await shared.admit(key, 10, 10), 3)
    deadline = time.monotonic() + 2
    while shared.pending_settlements() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)  # the background writer, a few ms later
    for key in keys:
        assert (await shared.state(key)).tokens_in_window == 3


async def test_uses_redis_clock_and_every_key_expires(shared: RedisLimiter) -> None:
    key = make_key(rpm=10, tpm=10_000, token_limit=10_000, period="month")
    a = await shared.admit(key, 100, 100)
    server_now = float((await shared.client.time())[0])
    assert a.admitted and a.budget is not None
    _, end = period_bounds("month", server_now)
    assert a.budget.resets_at == end
    await shared.settle(key, a, 50)
    await shared.flush()
    names = [k async for k in shared.client.scan_iter(match=shared.key_prefix(key.id) + "*")]
    assert {n.decode().rsplit(":", 1)[-1] for n in names} >= {"rpm", "tpm", "tpmh", "month"}
    for name in names:
        ttl = await shared.client.pttl(name)
        assert ttl > 0, name
        if name.endswith((b"rpm", b"tpm", b"tpmh")):
            assert ttl <= 61_000
        else:
            assert ttl <= (end - server_now + 61) * 1000


# --- revocation --------------------------------------------------------------------------------


async def test_a_revocation_marker_refuses_the_key_everywhere(shared: RedisLimiter) -> None:
    other = RedisLimiter(shared.client, prefix=shared.key_prefix("x").split(":")[0])  # a second instance
    for key in (make_key(), make_key(rpm=5, token_limit=1000)):
        assert (await other.admit(key, 1, 1)).admitted
        await shared.mark_revoked(key.id)
        await shared.mark_revoked(key.id)  # idempotent
        refused = await other.admit(key, 1, 1)
        assert not refused.admitted and refused.refusal == "key_revoked" and refused.reservation is None
        assert await shared.client.pttl(shared.key_prefix(key.id) + "revoked") == -1  # for good


# --- several instances -------------------------------------------------------------------------


async def test_two_instances_never_exceed_any_limit() -> None:
    async with redis_prefix() as prefix:
        a = RedisLimiter.from_url(REDIS_URL, prefix=prefix)
        b = RedisLimiter.from_url(REDIS_URL, prefix=prefix)
        try:
            rng = random.Random(1)
            budget_key = make_key(token_limit=60_000, period="month")
            tpm_key = make_key(tpm=50_000)
            rpm_key = make_key(rpm=173)
            calls = []
            for i in range(500):
                lim = a if i % 2 else b
                for key in (budget_key, tpm_key, rpm_key):
                    calls.append((key.id, lim.admit(key, rng.randint(1, 200), rng.randint(1, 400))))
            results = await asyncio.gather(*(c for _, c in calls))
            by_key: dict[str, list[int]] = {}
            for (kid, _), adm in zip(calls, results, strict=True):
                if adm.admitted:
                    by_key.setdefault(kid, []).append(adm.reserved_tokens)
            assert 60_000 - 201 < sum(by_key[budget_key.id]) <= 60_000
            assert 50_000 - 201 < sum(by_key[tpm_key.id]) <= 50_000
            assert len(by_key[rpm_key.id]) == 173
            # and the stored state agrees with what was handed out
            state = await a.state(budget_key)
            assert state.budget is not None and state.budget.reserved == sum(by_key[budget_key.id])
        finally:
            await a.close()
            await b.close()


async def test_concurrent_settlements_from_two_instances_add_up() -> None:
    async with redis_prefix() as prefix:
        a = RedisLimiter.from_url(REDIS_URL, prefix=prefix)
        b = RedisLimiter.from_url(REDIS_URL, prefix=prefix)
        key = make_key(tpm=10**6, token_limit=30_000, period="month")
        rng = random.Random(2)

        async def one(lim: RedisLimiter) -> int:
            adm = await lim.admit(key, rng.randint(1, 50), rng.randint(1, 200))
            if not adm.admitted:
                return 0
            await asyncio.sleep(rng.random() / 100)
            actual = rng.randint(0, adm.reserved_tokens)
            await lim.settle(key, adm, actual)
            await lim.settle(key, adm, actual + 1)  # a duplicate must change nothing
            return actual

        try:
            charged = sum(await asyncio.gather(*(one(a if i % 2 else b) for i in range(500))))
            await a.flush()
            await b.flush()
            state = await a.state(key)
            assert state.budget is not None
            assert (state.budget.used, state.budget.reserved) == (charged, 0)
            assert state.tokens_in_window == charged
        finally:
            await a.close()
            await b.close()


# --- Redis down --------------------------------------------------------------------------------


async def test_redis_down_fails_closed_then_recovers_without_restart(own_redis: RedisServer,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisLimiter.from_url(own_redis.url)
    try:
        key = make_key(rpm=100)
        assert (await limiter.admit(key, 1, 1)).admitted
        own_redis.kill()
        with pytest.raises(LimiterUnavailable) as info:
            await limiter.admit(key, 1, 1)
        assert info.value.code == "limiter_unavailable" and info.value.retry_after > 0
        with pytest.raises(LimiterUnavailable):
            await limiter.state(key)
        assert limiter.unavailable_total == 1
        assert any("Redis limiter unavailable" in r.getMessage() for r in caplog.records)
        own_redis.start()  # empty: no data, no scripts loaded
        adm = await limiter.admit(key, 1, 1)
        assert adm.admitted and adm.remaining_requests == 99
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await limiter.close()


async def test_failure_policies(own_redis: RedisServer) -> None:
    rates_only, budgeted, free = make_key(rpm=5, tpm=100), make_key(rpm=5, token_limit=100), make_key()
    own_redis.kill()
    closed = RedisLimiter.from_url(own_redis.url)
    open_rates = RedisLimiter.from_url(own_redis.url, failure_policy="open-rates")
    open_all = RedisLimiter.from_url(own_redis.url, failure_policy="open")
    try:
        for key in (rates_only, budgeted, free):
            with pytest.raises(LimiterUnavailable):
                await closed.admit(key, 1, 1)
        adm = await open_rates.admit(rates_only, 1, 1)
        assert adm.admitted and adm.reservation is None and adm.granted is None
        with pytest.raises(LimiterUnavailable):
            await open_rates.admit(budgeted, 1, 1)
        assert (await open_all.admit(budgeted, 1, 1)).admitted
        with pytest.raises(ValueError, match="policy"):
            RedisLimiter(open_all.client, failure_policy="sometimes")  # type: ignore[arg-type]
    finally:
        for lim in (closed, open_rates, open_all):
            await lim.close()


async def test_settlements_survive_an_outage(persistent_redis: RedisServer) -> None:
    limiter = RedisLimiter.from_url(persistent_redis.url, settle_delay=0.001)
    try:
        key = make_key(token_limit=1000, period="month")
        adm = await limiter.admit(key, 100, 400)
        assert adm.admitted and adm.reserved_tokens == 500
        persistent_redis.kill()
        await limiter.settle(key, adm, 123)
        await asyncio.sleep(0.2)  # the background flush fails, retries, keeps it queued
        assert limiter.pending_settlements() == 1
        persistent_redis.start()  # the same data back (append-only file)
        deadline = time.monotonic() + 10
        while limiter.pending_settlements() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        state = await limiter.state(key)
        assert state.budget is not None and (state.budget.used, state.budget.reserved) == (123, 0)
    finally:
        await limiter.close()


async def test_close_flushes_queued_settlements(shared: RedisLimiter) -> None:
    other = RedisLimiter.from_url(REDIS_URL, prefix=shared.key_prefix("x").split(":")[0], settle_delay=60)
    key = make_key(tpm=10_000)
    adm = await other.admit(key, 100, 100)
    await other.settle(key, adm, 7)
    assert other.pending_settlements() == 1
    await other.close()
    assert (await shared.state(key)).tokens_in_window == 7


# --- replies lost on the way back ----------------------------------------------------------------


class ReplyDropper:
    """A TCP proxy in front of the shared Redis that, while ``drop`` > 0, cuts the connection instead of
    passing a reply on: the command has run in Redis, but its caller never hears so."""

    def __init__(self) -> None:
        self.drop = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return REDIS_URL.replace(REDIS_URL.split("//", 1)[1].split("/", 1)[0], f"127.0.0.1:{port}")

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = REDIS_URL.split("//", 1)[1].split("/", 1)[0].split(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            try:
                while data := await src.read(65536):
                    if replies and self.drop > 0:
                        self.drop -= 1
                        self.dropped += 1
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                for w in (writer, up_writer):
                    w.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))


async def test_an_admission_whose_reply_is_lost_is_cancelled() -> None:
    """Redis ran the admission but the reply never arrived (Redis died, or the network cut, in
    between): the request is refused with 503, so its slot and tokens must come back."""
    proxy = ReplyDropper()
    url = await proxy.start()
    async with redis_prefix() as prefix:
        limiter = RedisLimiter.from_url(url, prefix=prefix, settle_delay=0.001)
        try:
            warm = make_key(rpm=1)
            assert (await limiter.admit(warm, 1, 1)).admitted  # the script is loaded
            key = make_key(rpm=2, tpm=10_000, token_limit=1000, period="day")
            proxy.drop = 2  # the first attempt and redis-py's retry on a fresh connection
            with pytest.raises(LimiterUnavailable):
                await limiter.admit(key, 100, 400)
            assert proxy.dropped == 2
            await limiter.flush()
            state = await limiter.state(key)
            assert state.budget is not None and (state.budget.used, state.budget.reserved) == (0, 0)
            assert (state.requests_in_window, state.tokens_in_window) == (0, 0)
            # and the key has its whole allowance: two requests of 500 tokens each
            for _ in range(2):
                adm = await limiter.admit(key, 100, 400)
                assert adm.admitted and adm.reserved_tokens == 500
                await limiter.settle(key, adm, 500)
            assert not (await limiter.admit(key, 1, 1)).admitted
        finally:
            await limiter.close()
            await proxy.stop()


async def test_an_admission_sent_twice_counts_once() -> None:
    """redis-py sends a command again on a fresh connection when the first reply was lost; the
    admission ran both times, with the same id, and must count and reserve once."""
    proxy = ReplyDropper()
    url = await proxy.start()
    async with redis_prefix() as prefix:
        limiter = RedisLimiter.from_url(url, prefix=prefix, settle_delay=0.001)
        try:
            assert (await limiter.admit(make_key(rpm=1), 1, 1)).admitted  # the script is loaded
            key = make_key(rpm=2, tpm=10_000, token_limit=1000, period="day")
            proxy.drop = 1
            adm = await limiter.admit(key, 100, 400)
            assert proxy.dropped == 1
            assert adm.admitted and adm.reserved_tokens == 500 and adm.granted == 400
            state = await limiter.state(key)
            assert state.budget is not None and (state.budget.used, state.budget.reserved) == (0, 500)
            assert (state.requests_in_window, state.tokens_in_window) == (1, 500)
            await limiter.settle(key, adm, 321)
            state = await limiter.state(key)
            assert state.budget is not None and (state.budget.used, state.budget.reserved) == (321, 0)
            assert (state.requests_in_window, state.tokens_in_window) == (1, 321)
        finally:
            await limiter.close()
            await proxy.stop()


async def test_a_cancelled_admission_still_queued_in_redis_refuses_itself(shared: RedisLimiter) -> None:
    """The cancel can overtake its admission (sent on another connection while the first waits in a
    slow Redis): the admission then finds the tombstone and counts nothing."""
    key = make_key(rpm=5, token_limit=1000)
    k = shared.key_prefix(key.id)
    settle = shared.client.register_script(scripts.SETTLE)
    admit = shared.client.register_script(scripts.ADMIT)
    assert await settle(keys=[k + "rpm", k + "pend", k + "tpm", k + "tpmh", k + "b:day"], args=["r1", -1]) == 0
    reply = await admit(keys=[k + "revoked", k + "rpm", k + "tpm", k + "tpmh", k + "pend", k + "b:day"],
                        args=[10, 10, 1, "r1", "", 1, 5, 0, 1000, "day", 0])
    assert (reply[0], reply[1]) == (0, 4)
    state = await shared.state(key)
    assert state.requests_in_window == 0 and state.budget is not None and state.budget.reserved == 0
    assert 0 < await shared.client.pttl(k + "pend") <= 61_000
