"""The LLM API over the Redis limiter: a Redis outage is a clean 503 (never a 500, nothing forwarded,
metered) and recovers without a restart; a key refused as revoked by the limiter (another instance's
marker) is a 401 ``key_revoked``, and the key cache learns it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import update

from quotagate.store.engine import make_engine
from quotagate.store.tables import inference_keys
from tests.fakes.redis_server import RedisServer
from tests.fakes.upstream import FakeUpstream
from tests.gateway.helpers import hi, metric, raw
from tests.limits.conftest import REDIS_URL
from tests.support import Gateway, start_gateway

pytestmark = pytest.mark.skipif(not REDIS_URL, reason="QUOTAGATE_TEST_REDIS_URL=''")

CONFIG = """
[[models]]
id = "chat"
type = "chat"
upstreams = ["{upstream}"]
"""


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


def serve(tmp_path: Path, database_url: str, upstream: FakeUpstream, redis_url: str) -> Gateway:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(upstream=upstream.base_url))
    return start_gateway(tmp_path / "data", database_url, config, extra_env={"QUOTAGATE_REDIS_URL": redis_url})


def test_redis_down_is_a_503_with_retry_after_then_recovers(tmp_path: Path, database_url: str,
                                                              upstream: FakeUpstream, own_redis: RedisServer) -> None:
    gw = serve(tmp_path, database_url, upstream, own_redis.url)
    try:
        admin = gw.user("admin@example.com", admin=True)
        key = admin.mint(admin.project("p")["id"], rpm=100, token_limit=100_000, token_limit_period="day")
        secret = key["secret"]
        with raw(gw, secret) as client:
            assert client.post("/chat/completions", json={"model": "chat", "messages": hi()}).status_code == 200
            forwarded = len(upstream.requests)
            own_redis.kill()
            for body in ({"model": "chat", "messages": hi()}, {"model": "chat", "messages": hi(), "stream": True}):
                r = client.post("/chat/completions", json=body)
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/json"
                assert r.json() == {"error": {"message": "Rate limits cannot be checked right now; retry shortly.",
                                              "type": "server_error", "code": "limiter_unavailable",
                                              "param": None}}
                assert int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"].startswith("req_")
            assert len(upstream.requests) == forwarded, "a request was forwarded unchecked"
            # Listing models needs no limiter: it still answers (without rate-limit headers).
            models = client.get("/models")
            assert models.status_code == 200 and "x-ratelimit-limit-requests" not in models.headers
            assert metric(gw, "quotagate_limiter_redis_unavailable_total") >= 2
            assert metric(gw, "quotagate_requests_total", code="503") == 2
            assert metric(gw, "quotagate_refusals_total", reason="limiter_unavailable") == 2
            assert "Redis limiter unavailable" in gw.log()

            own_redis.start()  # an empty Redis on the same port: no scripts, no counters
            r = client.post("/chat/completions", json={"model": "chat", "messages": hi()})
            assert r.status_code == 200, r.text
            assert len(upstream.requests) == forwarded + 1
        activity = admin.ok("GET", f"/v1/inference/keys/{key['id']}/activity")["data"]
        assert [(a["endpoint"], a["status_code"], a["error_code"]) for a in activity] == [  # newest first
            ("chat.completions", 200, None), ("models", 200, None), ("chat.completions", 503, "limiter_unavailable"),
            ("chat.completions", 503, "limiter_unavailable"), ("chat.completions", 200, None)]
        usage = admin.ok("GET", f"/v1/inference/keys/{key['id']}/usage")["totals"]
        assert usage["requests"] == 5 and usage["errors"] == 2 and usage["rate_limited"] == 0
        assert "reachable again" in gw.log()
    finally:
        gw.stop()


def test_a_revocation_marker_is_a_401_and_the_cache_learns_it(tmp_path: Path, database_url: str,
                                                               upstream: FakeUpstream) -> None:
    gw = serve(tmp_path, database_url, upstream, REDIS_URL)
    redis = Redis.from_url(REDIS_URL)
    engine = make_engine(database_url)
    key_id = ""
    try:
        admin = gw.user("admin@example.com", admin=True)
        key = admin.mint(admin.project("p")["id"], rpm=100)
        key_id = key["id"]
        marker = f"qg:{{{key_id}}}:revoked"
        with raw(gw, key["secret"]) as client:
            assert client.post("/chat/completions", json={"model": "chat", "messages": hi()}).status_code == 200
            forwarded = len(upstream.requests)
            # What another instance's revocation leaves when its broadcast never reaches this one: the
            # store says revoked, the marker is set, and no key event arrives here.
            with engine.begin() as conn:
                conn.execute(update(inference_keys).where(inference_keys.c.id == key_id)
                             .values(revoked_at=datetime.now(UTC)))
            redis.set(marker, b"1")
            r = client.post("/chat/completions", json={"model": "chat", "messages": hi()})
            assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked", r.text
            # From now on the cache itself knows: without the marker the key is still refused.
            redis.delete(marker)
            for _ in range(3):
                r = client.post("/chat/completions", json={"model": "chat", "messages": hi()})
                assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked", r.text
                time.sleep(0.1)  # past the background reload from the store, which says revoked too
            assert len(upstream.requests) == forwarded
        assert metric(gw, "quotagate_refusals_total", reason="key_revoked") == 4
    finally:
        gw.stop()
        engine.dispose()
        if key_id:
            keys = list(redis.scan_iter(match=f"qg:{{{key_id}}}:*"))
            if keys:
                redis.delete(*keys)
        redis.close()
