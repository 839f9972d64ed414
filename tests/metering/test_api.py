"""The usage and activity API's input checks and access rules, on a real console server."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import Engine

from quotagate.metering.store import store_batch
from quotagate.store.engine import make_engine
from tests.metering.conftest import Key, event
from tests.support import Gateway


@pytest.fixture
def store(gateway_console: Gateway, database_url: str) -> Engine:
    return make_engine(database_url)


@pytest.mark.parametrize(("params", "field"), [
    ({"start": "yesterday"}, "start"),
    ({"end": "2026-13-01T00:00:00Z"}, "end"),
    ({"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "end"),
    ({"granularity": "week"}, "granularity"),
    ({"granularity": "minute", "start": "2026-01-01T00:00:00Z", "end": "2026-01-03T00:00:00Z"}, "granularity"),
    ({"granulartiy": "hour"}, "granulartiy"),
])
def test_bad_usage_queries_are_400_naming_the_field(gateway_console: Gateway, params: dict[str, str],
                                                     field: str) -> None:
    owner = gateway_console.user("owner@example.com")
    key = owner.mint(owner.project()["id"])
    for path in (f"/v1/inference/keys/{key['id']}/usage", f"/v1/projects/{key['project_id']}/usage"):
        r = owner.request("GET", path, params=params)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == field


@pytest.mark.parametrize(("params", "field"), [({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"),
                                               ({"limit": "ten"}, "limit"), ({"page": "2"}, "page")])
def test_bad_activity_queries_are_400(gateway_console: Gateway, params: dict[str, str], field: str) -> None:
    owner = gateway_console.user("owner@example.com")
    key = owner.mint(owner.project()["id"])
    r = owner.request("GET", f"/v1/inference/keys/{key['id']}/activity", params=params)
    assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text


def test_another_users_key_and_project_are_404(gateway_console: Gateway, store: Engine) -> None:
    owner = gateway_console.user("owner@example.com")
    stranger = gateway_console.user("stranger@example.com")
    key = owner.mint(owner.project()["id"])
    store_batch(store, [event(Key(key["id"], key["project_id"]))])
    for path in (f"/v1/inference/keys/{key['id']}/usage", f"/v1/inference/keys/{key['id']}/activity",
                 f"/v1/projects/{key['project_id']}/usage", "/v1/inference/keys/key_nope/usage"):
        r = stranger.request("GET", path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "not_found"  # the same answer as for a key that does not exist


def test_usage_and_activity_shapes(gateway_console: Gateway, store: Engine) -> None:
    owner = gateway_console.user("owner@example.com")
    project = owner.project()
    key = owner.mint(project["id"], rpm=10, token_limit=1000, token_limit_period="day")
    k = Key(key["id"], key["project_id"])
    now = time.time()
    events = [event(k, created_at=now - 120 + i, prompt_tokens=i, completion_tokens=2 * i) for i in range(5)]
    events.append(event(k, created_at=now - 10, status_code=429, error_code="rate_limit_exceeded",
                        prompt_tokens=0, completion_tokens=0))
    store_batch(store, events)
    usage = owner.ok("GET", f"/v1/inference/keys/{key['id']}/usage")
    assert usage["granularity"] == "hour" and usage["key_id"] == key["id"]
    assert usage["totals"] == {"requests": 6, "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
                               "errors": 0, "rate_limited": 1}
    assert {"start", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens"} <= set(
        usage["data"][0])
    limits = usage["limits"]
    assert limits["rpm"]["limit"] == 10 and limits["budget"]["limit"] == 1000
    assert limits["budget"]["period"] == "day"
    if limits["live"]:  # the limiter is wired: its live figures
        assert {"used", "remaining", "resets_at"} <= set(limits["budget"])
    minute = owner.ok("GET", f"/v1/inference/keys/{key['id']}/usage",
                      params={"granularity": "minute", "start": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                              time.gmtime(now - 600))})
    assert minute["totals"] == usage["totals"] and minute["start"].endswith(":00Z")
    page = owner.ok("GET", f"/v1/inference/keys/{key['id']}/activity", params={"limit": 4})
    assert [r["request_id"] for r in page["data"]] == [e.request_id for e in reversed(events)][:4]
    assert page["has_more"] and page["next_cursor"] == page["data"][-1]["request_id"]
    rest = owner.ok("GET", f"/v1/inference/keys/{key['id']}/activity",
                    params={"starting_after": page["next_cursor"]})
    assert [r["request_id"] for r in rest["data"]] == [e.request_id for e in reversed(events)][4:]
    one = owner.ok("GET", f"/v1/inference/keys/{key['id']}/activity", params={"request_id": events[2].request_id})
    assert [r["prompt_tokens"] for r in one["data"]] == [2]


def test_metrics_on_the_console_port_are_for_instance_admins(gateway: Gateway) -> None:
    gw = gateway
    # It shows every project's ids and model names; it was open to anyone who could reach the port.
    assert httpx.get(f"{gw.console_url}/metrics", timeout=10).status_code == 401
    member = gw.user("not-an-admin@example.com")
    r = httpx.get(f"{gw.console_url}/metrics", headers={"Authorization": f"Bearer {member.token}"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert "quotagate_journal_backlog_records" in gw.metrics()
