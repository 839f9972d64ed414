"""Three real ``quotagate serve`` processes on one PostgreSQL database and one Redis, no load balancer:
``Spread`` sends each request to the next instance in turn and keeps what every client was sent, so that
tests can hold the limits, the revocation bound and the usage API against it."""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from redis import Redis
from sqlalchemy import create_engine, text

from quotagate.gateway.parsing import parse_chat
from tests.conftest import PG_ADMIN_URL
from tests.support import Console, Gateway, start_gateway

CONFIG = """
[gateway]
default_max_tokens = 8

[[models]]
id = "chat"
type = "chat"
upstreams = ["{upstream}"]

[[models]]
id = "chat-b"
type = "chat"
upstreams = ["{upstream}"]
"""

MESSAGES = [{"role": "user", "content": "hello"}]
MAX_TOKENS = 8
# The most one request can reserve: the gateway's prompt bound plus its completion allowance. When a
# limit refuses everything with nothing in flight, less than this is left of it.
# (Every field of the body counts into the bound, the fake server's instructions too: the body as sent.)
ONE_REQUEST = parse_chat(orjson.dumps({"model": "chat", "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                                       "fake": {"tokens": 8, "token_delay": 0.0}})).prompt_bound + MAX_TOKENS
# The same for the second model (its longer name is in the body too).
ONE_REQUEST_B = parse_chat(orjson.dumps({"model": "chat-b", "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                                         "fake": {"tokens": 8, "token_delay": 0.0}})).prompt_bound + MAX_TOKENS


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """An empty PostgreSQL database of the test's own (whatever store the rest of the run is on: scale-out
    means PostgreSQL); the instances migrate it themselves, all at once. Dropped afterwards."""
    name = f"qg_so_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Cluster:
    instances: list[Gateway]
    redis_url: str
    admin: Console = field(init=False)
    project_id: str = field(init=False)
    key_ids: list[str] = field(default_factory=list)
    project_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.admin = self.instances[0].user("admin@example.com", admin=True)
        self.project_id = self.admin.project("scale-out")["id"]

    def new_project(self, name: str) -> str:
        """Another project (through instance 0's console), for limits of its own."""
        project_id: str = self.admin.project(name)["id"]
        self.project_ids.append(project_id)
        return project_id

    def mint(self, project_id: str | None = None, **limits: Any) -> tuple[str, dict[str, Any]]:
        """A new key (through instance 0's console): (secret, key object)."""
        key = self.admin.mint(project_id or self.project_id, **limits)
        self.key_ids.append(key["id"])
        return key.pop("secret"), key

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.instances)) as pool:
            list(pool.map(Gateway.stop, self.instances))

    def forget_keys(self) -> None:
        """Delete this cluster's keys from Redis (revocation markers have no expiry); never a flush."""
        client = Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        try:
            for key_id in [*self.key_ids, *self.project_ids]:
                names = list(client.scan_iter(match=f"qg:{{{key_id}}}:*"))
                if names:
                    client.delete(*names)
        finally:
            client.close()


def start_cluster(directory: Path, database_url: str, redis_url: str, upstream_url: str, n: int = 3,
                  extra_env: dict[str, str] | None = None) -> Cluster:
    """``n`` instances (role all: each serves the console and the LLM API), started at the same moment on
    one empty database, so they run its migrations concurrently; ``extra_env``: more settings for all."""
    config = directory / "gateway.toml"
    config.write_text(CONFIG.format(upstream=upstream_url))
    env = {"QUOTAGATE_REDIS_URL": redis_url, **(extra_env or {})}
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(start_gateway, directory / f"instance-{i}", database_url, config, extra_env=env)
                   for i in range(n)]
        instances = [f.result() for f in futures]
    return Cluster(instances, redis_url)


@dataclass
class Seen:
    """What one client was sent for one request (times are ``time.monotonic()``)."""

    instance: int
    started: float
    ended: float
    status: int
    request_id: str
    code: str | None = None
    prompt: int = 0
    completion: int = 0
    limit_requests: int | None = None
    retry_after: str | None = None
    param: str | None = None

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion


class Spread:
    """Async clients to every instance's LLM API; ``chat`` goes to the next instance round-robin."""

    def __init__(self, cluster: Cluster) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=2.0)
        self._instances = cluster.instances
        self._clients = [httpx.AsyncClient(base_url=gw.llm_url, timeout=60, limits=limits)
                         for gw in cluster.instances]
        self._turn = itertools.count()

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def chat(self, secret: str, *, stream: bool = False, instance: int | None = None,
                   tokens: int = 8, token_delay: float = 0.0, model: str = "chat") -> Seen:
        i = next(self._turn) % len(self._clients) if instance is None else instance
        body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                                "fake": {"tokens": tokens, "token_delay": token_delay}}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        headers = {"Authorization": f"Bearer {secret}"}
        started = time.monotonic()
        try:
            return await self._chat(i, body, headers, stream, started)
        except httpx.ConnectError:
            # Not a limit's doing: say which instance, whether it is still running, and what it logged.
            gw = self._instances[i]
            raise AssertionError(f"instance {i} refused a connection (exit code {gw.proc.poll()}); its log:\n"
                                 f"{gw.log()[-4000:]}") from None

    async def _chat(self, i: int, body: dict[str, Any], headers: dict[str, str], stream: bool,
                    started: float) -> Seen:
        async with self._clients[i].stream("POST", "/chat/completions", json=body, headers=headers) as r:
            seen = Seen(i, started, 0.0, r.status_code, r.headers.get("x-request-id", ""),
                        retry_after=r.headers.get("retry-after"))
            if "x-ratelimit-limit-requests" in r.headers:
                seen.limit_requests = int(r.headers["x-ratelimit-limit-requests"])
            if r.status_code != 200:
                error = orjson.loads(await r.aread())["error"]
                seen.code, seen.param = error["code"], error.get("param")
            elif not stream:
                usage = orjson.loads(await r.aread())["usage"]
                seen.prompt, seen.completion = usage["prompt_tokens"], usage["completion_tokens"]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = orjson.loads(line[6:])
                    if event.get("error"):
                        seen.code = event["error"].get("code") or "stream_error"
                    if event.get("usage"):
                        seen.prompt = event["usage"]["prompt_tokens"]
                        seen.completion = event["usage"]["completion_tokens"]
        seen.ended = time.monotonic()
        return seen


@contextlib.asynccontextmanager
async def spread(cluster: Cluster) -> AsyncIterator[Spread]:
    s = Spread(cluster)
    try:
        yield s
    finally:
        await s.close()


def served(seen: list[Seen]) -> list[Seen]:
    return [s for s in seen if s.status == 200]


def assert_nothing_lost(cluster: Cluster, key_id: str, seen: list[Seen], timeout: float = 20.0) -> None:
    """The usage API (once every instance's shipper has caught up) equals, request for request and token
    for token, what the clients were sent through all the instances."""
    expected = {"requests": len(seen), "prompt_tokens": sum(s.prompt for s in seen),
                "completion_tokens": sum(s.completion for s in seen)}
    deadline = time.monotonic() + timeout
    while True:
        totals = cluster.admin.ok("GET", f"/v1/inference/keys/{key_id}/usage")["totals"]
        got = {k: totals[k] for k in expected}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == expected, f"usage API {got} != what the clients were sent {expected}"
    ids: list[str] = []
    cursor: str | None = None
    while True:
        page = cluster.admin.ok("GET", f"/v1/inference/keys/{key_id}/activity",
                                params={"limit": 1000, **({"before": cursor} if cursor else {})})
        ids += [row["request_id"] for row in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert len(ids) == len(set(ids)), "a request was stored twice"
    assert set(ids) == {s.request_id for s in seen}, "the activity does not list exactly the requests sent"
