"""Revocation and expiry mid-traffic, edits taking effect at once, and the key cache's own guarantees."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import create_engine, text

from quotagate.gateway.keycache import KeyCache
from quotagate.keys.events import KeyChanged
from quotagate.keys.models import KeyRecord
from quotagate.keys.secrets import INFERENCE_KEY_KIND, generate
from tests.conftest import BACKEND, PG_ADMIN_URL
from tests.gateway.conftest import Mint
from tests.gateway.helpers import hi, metric, raw
from tests.support import Console, Gateway


def test_revocation_mid_traffic_refuses_the_very_next_request(gw: Gateway, mint: Mint, admin: Console) -> None:
    secret, key = mint()
    revoked_at: list[float] = []
    results: list[tuple[float, int, str | None]] = []

    async def traffic() -> None:
        async with httpx.AsyncClient(base_url=gw.llm_url, headers={"Authorization": f"Bearer {secret}"},
                                     timeout=30) as client:
            async def worker() -> None:
                for _ in range(400):
                    started = time.monotonic()
                    r = await client.post("/chat/completions", json={"model": "chat", "messages": hi()})
                    code = r.json()["error"]["code"] if r.status_code != 200 else None
                    results.append((started, r.status_code, code))
                    if revoked_at and started > revoked_at[0] + 0.2:
                        return

            await asyncio.gather(*(worker() for _ in range(8)))

    def revoke() -> None:
        time.sleep(0.5)
        admin.ok("DELETE", f"/v1/inference/keys/{key['id']}")
        revoked_at.append(time.monotonic())

    thread = threading.Thread(target=revoke)
    thread.start()
    asyncio.run(traffic())
    thread.join()
    before = [r for r in results if r[0] < revoked_at[0]]
    after = [r for r in results if r[0] > revoked_at[0]]
    assert any(status == 200 for _, status, _ in before)
    assert after, "traffic went on after the revocation"
    assert all((status, code) == (401, "key_revoked") for _, status, code in after)


def test_expiry_takes_effect_without_any_event(gw: Gateway, mint: Mint) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2)
    secret, _ = mint(expires_at=expires.isoformat())
    with raw(gw, secret) as client:
        assert client.post("/chat/completions", json={"model": "chat", "messages": hi()}).status_code == 200
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
        r = client.post("/chat/completions", json={"model": "chat", "messages": hi()})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "key_expired"


def test_edits_take_effect_on_the_next_request(gw: Gateway, mint: Mint, admin: Console) -> None:
    secret, key = mint()
    with raw(gw, secret) as client:
        assert client.post("/chat/completions", json={"model": "chat-b", "messages": hi()}).status_code == 200
        admin.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"allowed_models": ["chat"], "rpm": 5})
        r = client.post("/chat/completions", json={"model": "chat-b", "messages": hi()})
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        r = client.post("/chat/completions", json={"model": "chat", "messages": hi()})
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "5"


# -- the cache itself, in process ------------------------------------------------------------------------

def _record(secret_hash: str, revoked: bool = False) -> KeyRecord:
    return KeyRecord(id="key_1", project_id="proj_1", secret_hash=secret_hash, rpm=None, tpm=None,
                     token_limit=None, token_limit_period=None, models=None, expires_at=None, revoked=revoked,
                     version=1)


class _Store:
    def __init__(self) -> None:
        self.calls = 0
        self.revoked = False
        self.gate = threading.Event()
        self.gate.set()

    def resolve(self, secret_hash: str) -> KeyRecord | None:
        self.calls += 1
        self.gate.wait(5)
        return _record(secret_hash, self.revoked) if secret_hash.startswith("known") else None


def test_concurrent_misses_share_one_lookup_and_unknown_keys_are_cached() -> None:
    store = _Store()
    cache = KeyCache(store.resolve)

    async def go() -> None:
        store.gate.clear()
        tasks = [asyncio.create_task(cache.get("known-1")) for _ in range(50)]
        await asyncio.sleep(0.05)
        store.gate.set()
        assert all(r is not None for r in await asyncio.gather(*tasks))
        assert store.calls == 1
        for _ in range(100):
            assert await cache.get("garbage") is None
        assert store.calls == 2

    asyncio.run(go())


def test_an_invalidation_during_a_load_is_not_lost() -> None:
    store = _Store()
    cache = KeyCache(store.resolve)

    async def go() -> None:
        store.gate.clear()
        task = asyncio.create_task(cache.get("known-2"))
        await asyncio.sleep(0.05)
        # The key is revoked while the (old) row is being read: the stale answer must not be cached.
        store.revoked = True
        cache.invalidate(KeyChanged(key_id="key_1", secret_hash="known-2", project_id="proj_1"))
        store.gate.set()
        assert (await task) is not None
        record = await cache.get("known-2")
        assert record is not None and record.revoked

    asyncio.run(go())


def test_stale_entries_refresh_in_the_background() -> None:
    now = [0.0]
    store = _Store()
    cache = KeyCache(store.resolve, refresh_after=5.0, clock=lambda: now[0])

    async def go() -> None:
        first = await cache.get("known-3")
        assert first is not None and not first.revoked
        store.revoked = True  # changed by another process: no event reaches this one
        now[0] = 6.0
        assert not (await cache.get("known-3")).revoked  # type: ignore[union-attr]  # served from cache at once
        for _ in range(100):
            await asyncio.sleep(0.01)
            record = await cache.get("known-3")
            if record is not None and record.revoked:
                return
        pytest.fail("the stale entry was never refreshed")

    asyncio.run(go())


def test_the_key_cache_counts_hits_and_misses(gw: Gateway, mint: Mint) -> None:
    secret, _ = mint()
    unknown = generate(INFERENCE_KEY_KIND)  # well formed, in no store
    hits, misses = metric(gw, "quotagate_key_cache_hits"), metric(gw, "quotagate_key_cache_misses")
    with raw(gw, secret) as known, raw(gw, unknown) as stranger:
        for _ in range(4):
            assert known.post("/chat/completions", json={"model": "chat", "messages": hi()}).status_code == 200
        for _ in range(3):
            assert stranger.get("/models").status_code == 401
    assert metric(gw, "quotagate_key_cache_misses") - misses == 2  # one load of each
    assert metric(gw, "quotagate_key_cache_hits") - hits == 5
    ratio = metric(gw, "quotagate_key_cache_hit_ratio")
    assert 0 < ratio < 1


@pytest.mark.skipif(BACKEND != "postgres", reason="needs a store that can be cut off and given back (PostgreSQL)")
def test_a_key_store_that_is_down_answers_503_with_retry_after_and_cached_keys_keep_working(
        gateway: Gateway, database_url: str) -> None:
    admin = gateway.user("admin@example.com", admin=True)
    project = admin.project("store-down")
    cached, fresh = admin.mint(project["id"])["secret"], admin.mint(project["id"])["secret"]
    with raw(gateway, cached) as client:
        assert client.get("/models").status_code == 200  # now in the gateway's key cache

    name = database_url.rsplit("/", 1)[1]
    pg = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with pg.connect() as conn:  # no new connections, and the gateway's pooled ones cut
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
        with raw(gateway, fresh) as client:
            r = client.get("/models")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        assert r.headers["retry-after"] == "1" and r.headers["x-request-id"]
        with raw(gateway, cached) as client:
            assert client.get("/models").status_code == 200, "a cached key must not need the store"
    finally:
        with pg.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        pg.dispose()
    with raw(gateway, fresh) as client:  # the store is back: the key resolves (the failure was not cached)
        assert client.get("/models").status_code == 200


def test_two_authorization_headers_are_a_400_on_both_apis(gw: Gateway, mint: Mint, admin: Console) -> None:
    # The LLM API read the last of them and the console the first: a proxy that adds one could be bypassed.
    secret, _ = mint()
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'
    with httpx.Client(timeout=10) as client:
        r = client.post(f"{gw.llm_url}/chat/completions", content=body, headers=[
            ("Authorization", f"Bearer {secret}"), ("Authorization", "Bearer qgk_other"),
            ("Content-Type", "application/json")])
        assert r.status_code == 400 and "more than one Authorization" in r.json()["error"]["message"]
        r = client.get(f"{gw.console_url}/v1/projects", headers=[
            ("Authorization", f"Bearer {admin.token}"), ("Authorization", "Bearer qgt_other")])
        assert r.status_code == 400 and "more than one Authorization" in r.json()["error"]["message"]
