"""How issue 4 is checked: real traffic through a real gateway with the official SDK — successes,
refusals (401/403/404/429), streams cut short — then the usage API compared with what the clients were
actually sent, token for token; then the same with a kill -9 of the gateway in the middle of traffic."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.fakes.upstream import FakeUpstream
from tests.support import Console, Gateway, free_port, start_gateway

CONFIG = """
[[models]]
id = "chat"
type = "chat"
upstreams = ["{main}"]

[[models]]
id = "chat-b"
type = "chat"
upstreams = ["{main}"]
"""


@dataclass
class Seen:
    """What one client was sent for one request."""

    request_id: str
    status: int
    prompt: int = 0
    completion: int = 0


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def config(tmp_path: Path, upstream: FakeUpstream) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(main=upstream.base_url))
    return path


def client(gw: Gateway, secret: str) -> OpenAI:
    return OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0, timeout=30)


def call(gw: Gateway, secret: str, kind: str, rng: random.Random) -> Seen:
    """One request of ``kind``; returns what the client saw (raises on a transport failure)."""
    sdk = client(gw, secret)
    model = "chat-b" if kind == "forbidden" else "nope" if kind == "unknown" else "chat"
    fake: dict[str, Any] = {"tokens": rng.randint(1, 12)}
    if kind == "cut":
        fake["die_after"] = rng.randint(1, 3)
        fake["tokens"] = 8
    messages = [{"role": "user", "content": "x" * rng.randint(1, 40)}]
    try:
        if kind in ("stream", "cut"):
            stream = sdk.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"fake": fake})
            seen = Seen(stream.response.headers["x-request-id"], stream.response.status_code)
            try:
                for chunk in stream:
                    if chunk.usage is not None:
                        seen.prompt, seen.completion = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
            except openai.APIError:
                assert kind == "cut"  # the error event after the usage of what was generated
            return seen
        r = sdk.chat.completions.with_raw_response.create(model=model, messages=messages,  # type: ignore[arg-type]
                                                          extra_body={"fake": fake})
        completion = r.parse()
        assert completion.usage is not None
        return Seen(r.headers["x-request-id"], r.status_code, completion.usage.prompt_tokens,
                    completion.usage.completion_tokens)
    except openai.APIStatusError as exc:
        assert exc.request_id, "every answer carries x-request-id"
        return Seen(exc.request_id, exc.status_code)
    finally:
        sdk.close()


def expected(seen: list[Seen]) -> dict[str, int]:
    out = {"requests": len(seen), "prompt_tokens": sum(s.prompt for s in seen),
           "completion_tokens": sum(s.completion for s in seen),
           "rate_limited": sum(s.status == 429 for s in seen)}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def usage_of(admin: Console, key_id: str) -> dict[str, Any]:
    result: dict[str, Any] = admin.ok("GET", f"/v1/inference/keys/{key_id}/usage",
                                      params={"granularity": "minute", "start": time.strftime(
                                          "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))})
    return result


def activity_of(admin: Console, key_id: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    before = None
    while True:
        params = {"limit": 1000, **({"before": before} if before else {})}
        page = admin.ok("GET", f"/v1/inference/keys/{key_id}/activity", params=params)
        for row in page["data"]:
            assert row["request_id"] not in rows
            rows[row["request_id"]] = row
        if not page["has_more"]:
            return rows
        before = page["next_cursor"]


def check(admin: Console, key_id: str, seen: list[Seen], *, extra_ok: int = 0) -> None:
    """The usage API and the activity log agree with what clients were sent (``extra_ok`` requests
    may have been metered without their client hearing back: in flight at a kill)."""
    rows = activity_of(admin, key_id)
    for s in seen:
        row = rows.get(s.request_id)
        assert row is not None, f"request {s.request_id} missing from the activity log"
        assert (row["status_code"], row["prompt_tokens"], row["completion_tokens"]) == (
            s.status, s.prompt, s.completion), row
    totals = usage_of(admin, key_id)["totals"]
    if extra_ok == 0:
        assert len(rows) == len(seen)
        assert {k: totals[k] for k in expected(seen)} == expected(seen)
    else:
        assert len(seen) <= len(rows) <= len(seen) + extra_ok
    # Nothing counted twice: the totals are exactly the sum of the activity rows.
    assert totals["requests"] == len(rows)
    assert totals["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows.values())
    assert totals["completion_tokens"] == sum(r["completion_tokens"] for r in rows.values())


def test_usage_equals_what_clients_received(tmp_path: Path, database_url: str, config: Path) -> None:
    gw = start_gateway(tmp_path / "data", database_url, config)
    try:
        admin = gw.user("owner@example.com", admin=True)
        project = admin.project("metering-e2e")
        main = admin.mint(project["id"], name="main")
        limited = admin.mint(project["id"], name="limited", rpm=4)
        narrow = admin.mint(project["id"], name="narrow", allowed_models=["chat"])
        rng = random.Random(4)
        kinds = ["plain"] * 12 + ["stream"] * 8 + ["cut"] * 6 + ["unknown"] * 2
        rng.shuffle(kinds)
        with ThreadPoolExecutor(8) as pool:
            seen_main = list(pool.map(lambda k: call(gw, main["secret"], k, random.Random(hash(k))), kinds))
        seen_limited = [call(gw, limited["secret"], "plain", rng) for _ in range(7)]
        seen_narrow = [call(gw, narrow["secret"], k, rng) for k in ("plain", "forbidden", "forbidden")]
        admin.ok("DELETE", f"/v1/inference/keys/{narrow['id']}")
        seen_narrow.append(call(gw, narrow["secret"], "plain", rng))
        bad = call(gw, "qgk_not-a-real-key", "plain", rng)

        assert sorted({s.status for s in seen_main}) == [200, 404]
        assert [s.status for s in seen_limited] == [200] * 4 + [429] * 3
        assert [s.status for s in seen_narrow] == [200, 403, 403, 401]
        assert bad.status == 401
        assert any(0 < s.completion < 8 for s, k in zip(seen_main, kinds, strict=True) if k == "cut")

        check(admin, main["id"], seen_main)
        check(admin, limited["id"], seen_limited)
        check(admin, narrow["id"], seen_narrow)
        usage = usage_of(admin, limited["id"])
        assert usage["totals"]["rate_limited"] == 3 and usage["totals"]["errors"] == 0
        assert usage["limits"]["rpm"]["limit"] == 4
        narrow_totals = usage_of(admin, narrow["id"])["totals"]
        assert narrow_totals["errors"] == 3
        cut = sum(k == "cut" for k in kinds)
        assert usage_of(admin, main["id"])["totals"]["errors"] == cut + kinds.count("unknown")
        # The project view adds up its keys.
        proj = admin.ok("GET", f"/v1/projects/{project['id']}/usage", params={"granularity": "hour"})
        assert proj["totals"]["requests"] == len(seen_main) + len(seen_limited) + len(seen_narrow)
        assert {k["key_id"] for k in proj["keys"]} == {main["id"], limited["id"], narrow["id"]}
        # last_used_at moved, and /metrics counts by model and project, never by key.
        assert admin.ok("GET", f"/v1/inference/keys/{main['id']}")["last_used_at"] is not None
        metrics = admin.request("GET", "/metrics").text
        assert 'quotagate_requests_total{code="429",model="chat",project="' + project["id"] in metrics
        refused = f'quotagate_refusals_total{{model="chat",project="{project["id"]}",reason="rate_limit_exceeded"}} 3.0'
        assert refused in metrics
        assert main["id"] not in metrics and "quotagate_journal_backlog_records" in metrics
    finally:
        gw.stop()


def test_kill_9_in_the_middle_of_traffic(tmp_path: Path, database_url: str, config: Path) -> None:
    data = tmp_path / "data"
    console_port, llm_port = free_port(), free_port()
    gw = start_gateway(data, database_url, config, console_port=console_port, llm_port=llm_port)
    admin = gw.user("owner@example.com", admin=True)
    project = admin.project("metering-kill")
    key = admin.mint(project["id"], name="busy")
    seen: list[Seen] = []
    failed = 0
    lock = threading.Lock()
    stop = threading.Event()

    def traffic(worker: int) -> None:
        nonlocal failed
        rng = random.Random(worker)
        while not stop.is_set():
            kind = rng.choice(["plain", "plain", "stream", "cut"])
            try:
                s = call(gw, key["secret"], kind, rng)
            except (openai.APIConnectionError, AssertionError):
                with lock:
                    failed += 1
                continue
            with lock:
                seen.append(s)

    try:
        with ThreadPoolExecutor(6) as pool:
            for w in range(6):
                pool.submit(traffic, w)
            while len(seen) < 150:
                time.sleep(0.01)
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait()
            time.sleep(0.3)
            stop.set()
        before_kill = len(seen)
        assert before_kill >= 150
        # Restart on the same data dir and database: the journal left behind is shipped first.
        gw = start_gateway(data, database_url, config, console_port=console_port, llm_port=llm_port)
        rng = random.Random(99)
        seen += [call(gw, key["secret"], rng.choice(["plain", "stream", "cut"]), rng) for _ in range(20)]
        # Requests in flight at the kill may have been metered without their client hearing back.
        try:
            check(admin, key["id"], seen, extra_ok=failed + 6)
        except AssertionError as exc:
            # This failed twice in ~20 CI runs (a request answered just before the kill missing after the
            # restart) and never when run alone: say whether it arrives late (a flush that gave up) or
            # never (lost), and what the journal and the logs held, so that the next failure tells which.
            time.sleep(20)
            missing = [s.request_id for s in seen if s.request_id not in activity_of(admin, key["id"])]
            journal = sorted(p.name for p in (data / "journal").iterdir()) if (data / "journal").exists() else []
            raise AssertionError(f"{exc}\nstill missing 20 s later: {missing}\njournal: {journal}\n"
                                 f"gateway log:\n{gw.log_path.read_text(errors='replace')[-20000:]}") from None
        print(f"\nkill -9 after {before_kill} answered requests ({failed} cut off in flight); after restart "
              f"{len(seen)} answered, all present exactly once")
    finally:
        stop.set()
        gw.stop()
