"""The usage and activity API's input checks and access rules, on a real console server."""

from __future__ import annotations

import csv
import io
import time

import httpx
import pytest
from sqlalchemy import Engine

from quotagate.metering.api import EARLIEST, LATEST, parse_time
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


def test_project_usage_by_model_and_csv_exports(gateway_console: Gateway, store: Engine) -> None:
    owner = gateway_console.user("owner@example.com")
    project = owner.project()
    first = owner.mint(project["id"])
    second = owner.mint(project["id"])
    other_project = owner.project("elsewhere")
    stranger_key = owner.mint(other_project["id"])
    a, b = Key(first["id"], project["id"]), Key(second["id"], project["id"])
    now = time.time()
    events = [event(a, created_at=now - 300 + i, prompt_tokens=10, completion_tokens=5) for i in range(3)]
    events += [event(b, created_at=now - 200 + i, model="bge-m3", endpoint="embeddings", prompt_tokens=7,
                     completion_tokens=0, user_agent="=HYPERLINK(\"http://evil\")") for i in range(2)]
    events.append(event(Key(stranger_key["id"], other_project["id"]), created_at=now - 100))
    store_batch(store, events)

    usage = owner.ok("GET", f"/v1/projects/{project['id']}/usage")
    assert usage["totals"]["requests"] == 5 and usage["totals"]["total_tokens"] == 3 * 15 + 2 * 7
    assert [(m["model"], m["requests"], m["total_tokens"]) for m in usage["models"]] == [
        ("qwen3.6-27b", 3, 45), ("bge-m3", 2, 14)]
    assert {k["key_id"]: k["requests"] for k in usage["keys"]} == {first["id"]: 3, second["id"]: 2}

    as_csv = owner.request("GET", f"/v1/projects/{project['id']}/usage", params={"format": "csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["content-disposition"]
    lines = as_csv.text.splitlines()
    assert lines[0] == "start,model,requests,prompt_tokens,completion_tokens,total_tokens,errors,rate_limited," \
                       "avg_latency_ms"
    assert sum(int(line.split(",")[2]) for line in lines[1:]) == 5

    activity = owner.ok("GET", f"/v1/projects/{project['id']}/activity", params={"limit": 3})
    assert [r["request_id"] for r in activity["data"]] == [e.request_id for e in reversed(events[:5])][:3]
    assert activity["has_more"]
    rest = owner.ok("GET", f"/v1/projects/{project['id']}/activity", params={"before": activity["next_cursor"]})
    assert [r["request_id"] for r in rest["data"]] == [e.request_id for e in reversed(events[:5])][3:]
    window = owner.ok("GET", f"/v1/projects/{project['id']}/activity", params={
        "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 250))})
    assert len(window["data"]) == 2  # the embeddings only

    exported = owner.request("GET", f"/v1/projects/{project['id']}/activity", params={"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["request_id"] for r in rows] == [e.request_id for e in reversed(events[:5])]
    # A caller's text that a spreadsheet would run as a formula is written as text.
    assert rows[0]["user_agent"] == "'=HYPERLINK(\"http://evil\")" and rows[0]["stream"] == "false"

    stranger = gateway_console.user("stranger@example.com")
    for params in ({}, {"format": "csv"}):
        assert stranger.request("GET", f"/v1/projects/{project['id']}/activity", params=params).status_code == 404
    bad = owner.request("GET", f"/v1/projects/{project['id']}/activity", params={"format": "xml"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "format"


def test_project_usage_and_activity_filtered_by_key_metadata(gateway_console: Gateway, store: Engine) -> None:
    """``metadata=KEY=VALUE`` (repeatable: a key must have every entry) narrows project usage and activity,
    JSON and CSV, to the keys tagged so; keys may hold ``:`` and ``/`` in their metadata keys."""
    owner = gateway_console.user("owner@example.com")
    project = owner.project()
    search = owner.mint(project["id"], name="search-prod", metadata={"team": "search", "env": "prod",
                                                                     "cost.center:eu/1": "a=b"})
    search_dev = owner.mint(project["id"], name="search-dev", metadata={"team": "search", "env": "dev"})
    ads = owner.mint(project["id"], name="ads", metadata={"team": "ads"})
    bare = owner.mint(project["id"], name="bare")
    now = time.time()
    events = []
    for i, (key, count) in enumerate(((search, 1), (search_dev, 2), (ads, 4), (bare, 8))):
        events += [event(Key(key["id"], project["id"]), created_at=now - 100 + i, prompt_tokens=10 ** i,
                         completion_tokens=1) for _ in range(count)]
    store_batch(store, events)
    path = f"/v1/projects/{project['id']}/usage"

    def requests(*filters: str) -> int:
        usage = owner.ok("GET", path, params=[("metadata", f) for f in filters])
        assert usage["metadata"] == (dict(f.split("=", 1) for f in filters) or None)
        assert sum(k["requests"] for k in usage["keys"]) == usage["totals"]["requests"]
        assert sum(m["requests"] for m in usage["models"]) == usage["totals"]["requests"]
        return int(usage["totals"]["requests"])

    assert requests() == 15
    assert requests("team=search") == 3
    assert requests("team=search", "env=prod") == 1
    assert requests("team=ads") == 4
    assert requests("team=nobody") == 0
    assert requests("cost.center:eu/1=a=b") == 1  # split at the first "=": a key holds none
    assert requests("team=") == 0  # an empty value is a value: no key has team=""
    tagged = owner.ok("GET", path, params={"metadata": "team=search"})
    assert {k["key_id"]: k["metadata"] for k in tagged["keys"]} == {
        search["id"]: search["metadata"], search_dev["id"]: search_dev["metadata"]}
    assert tagged["totals"]["prompt_tokens"] == 1 * 1 + 2 * 10

    as_csv = owner.request("GET", path, params={"format": "csv", "metadata": "team=ads"})
    assert sum(int(r["requests"]) for r in csv.DictReader(io.StringIO(as_csv.text))) == 4
    activity = owner.ok("GET", f"/v1/projects/{project['id']}/activity", params=[("metadata", "team=search")])
    assert sorted(r["key_id"] for r in activity["data"]) == sorted([search["id"]] + [search_dev["id"]] * 2)
    exported = owner.request("GET", f"/v1/projects/{project['id']}/activity",
                             params=[("format", "csv"), ("metadata", "team=search"), ("metadata", "env=dev")])
    assert [r["key_id"] for r in csv.DictReader(io.StringIO(exported.text))] == [search_dev["id"]] * 2

    # The filter follows the key's metadata as it is now.
    owner.ok("PATCH", f"/v1/inference/keys/{bare['id']}", json={"metadata": {"team": "ads"}})
    assert requests("team=ads") == 12

    for bad in ("team", "=x", "te am=x", "team=a&metadata=team=b", "k=" + "v" * 257):
        params = [("metadata", p) for p in bad.split("&metadata=")]
        for endpoint in ("usage", "activity"):
            r = owner.request("GET", f"/v1/projects/{project['id']}/{endpoint}", params=params)
            assert r.status_code == 400 and r.json()["error"]["field"] == "metadata", (bad, r.text)
    too_many = [("metadata", f"k{i}=v") for i in range(17)]
    assert owner.request("GET", path, params=too_many).json()["error"]["field"] == "metadata"
    # A key's own usage has no such filter (it is one key).
    r = owner.request("GET", f"/v1/inference/keys/{search['id']}/usage", params={"metadata": "team=search"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "metadata"


@pytest.mark.parametrize(("raw", "expected"), [
    ("0001-01-01T00:00:00Z", EARLIEST), ("0001-01-01T00:00:00+01:00", EARLIEST),
    ("9999-12-31T23:59:59-23:59", LATEST), ("9999-12-31T23:00:00Z", LATEST),
])
def test_a_time_beyond_any_usage_is_taken_as_the_edge_of_the_range(raw: str, expected: object) -> None:
    # At the ends of what datetime holds, a day before `end` or the last point after it would not exist:
    # these were 500s (found by probing what Schemathesis sends: any date-time).
    assert parse_time("end", raw) == expected


def test_ranges_at_the_ends_of_time_are_answered(gateway_console: Gateway) -> None:
    owner = gateway_console.user("owner@example.com")
    key = owner.mint(owner.project()["id"])
    ranges = ({"end": "0001-01-01T00:00:00Z"},
              {"start": "9998-12-30T00:00:00Z", "end": "9999-12-31T23:00:00Z", "granularity": "day"},
              {"end": "9999-12-31T23:59:59-23:59", "granularity": "day"})
    for query in ranges:
        for path in (f"/v1/inference/keys/{key['id']}/usage", f"/v1/projects/{key['project_id']}/usage",
                     f"/v1/projects/{key['project_id']}/activity"):
            params = {k: v for k, v in query.items() if not (path.endswith("/activity") and k == "granularity")}
            r = owner.request("GET", path, params=params)
            assert r.status_code == 200, (path, params, r.text)
