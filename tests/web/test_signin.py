"""Signing in to the web console under attack (issue 13), against real `quotagate serve` processes: no
browser needed. Each test signs in from its own made-up client addresses (X-Forwarded-For, believed from
a proxy on loopback by default), so the per-address counts of one test do not reach another."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DEFAULT_CONFIG, fresh_database
from tests.support import Gateway, free_port, start_gateway

PASSWORD = "correct horse battery"
_addresses = itertools.count(1)


def address() -> str:
    """A client address no other test in this module uses."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def serve(directory: Path, template: str | None, **settings: str) -> Iterator[Gateway]:
    config = directory / "quotagate.toml"
    config.write_text(DEFAULT_CONFIG.format(upstream_port=free_port()))
    with fresh_database(directory, template, "s") as url:
        gw = start_gateway(directory / "data", url, config, role="console", extra_env=settings)
        try:
            yield gw
        finally:
            gw.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None) -> Iterator[Gateway]:
    # One password check at a time and two waiting: a flood shows the bound at once.
    yield from serve(tmp_path_factory.mktemp("signin"), _pg_template,
                     QUOTAGATE_LOGIN_HASH_CONCURRENCY="1", QUOTAGATE_LOGIN_HASH_QUEUE="2")


@pytest.fixture(scope="module")
def short_sessions(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None) -> Iterator[Gateway]:
    yield from serve(tmp_path_factory.mktemp("sessions"), _pg_template,
                     QUOTAGATE_SESSION_IDLE_SECONDS="1", QUOTAGATE_SESSION_MAX_AGE_SECONDS="3")


_users = itertools.count(1)


def new_user(gw: Gateway) -> str:
    email = f"user{next(_users)}-{time.monotonic_ns()}@example.com"
    gw.user(email, password=PASSWORD)
    return email


def login(gw: Gateway, email: str, password: str = PASSWORD, *, client: str | None = None,
          **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.console_url}/login", data={"email": email, "password": password},
                      headers={"X-Forwarded-For": client or address(), **headers}, follow_redirects=False)


async def flood(gw: Gateway, bodies: list[tuple[str, str]]) -> list[int]:
    """Every sign-in at once, each from the address given with it."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=gw.console_url, limits=limits, timeout=60) as http:
        async def one(email: str, client: str) -> int:
            r = await http.post("/login", data={"email": email, "password": "wrong password"},
                                headers={"X-Forwarded-For": client})
            return r.status_code

        return await asyncio.gather(*(one(email, client) for email, client in bodies))


def test_simultaneous_attempts_are_counted_before_the_password_is_checked(server: Gateway) -> None:
    """200 attempts at once used to be checked all (limit 5)."""
    email, client = new_user(server), address()
    statuses = Counter(asyncio.run(flood(server, [(email, client)] * 200)))
    assert statuses[401] <= 5, statuses
    assert statuses[401] + statuses[429] + statuses[503] == 200, statuses


def test_the_delays_are_per_email_and_address_so_a_stranger_locks_nobody_out(server: Gateway) -> None:
    owner = new_user(server)
    stranger = address()
    statuses = [login(server, owner, "guess", client=stranger).status_code for _ in range(7)]
    assert statuses[:5] == [401] * 5 and statuses[5:] == [429, 429], statuses
    refused = login(server, owner, client=stranger)  # even the right password waits, from there
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "Too many failed attempts" in refused.text
    r = login(server, owner)  # the owner, from their own address
    assert r.status_code == 303 and "qg_session" in r.cookies


def test_a_flood_of_bad_sign_ins_waits_for_few_password_checks(server: Gateway) -> None:
    """300 concurrent bad sign-ins used to run 40 argon2 checks at once (64 MiB each: 2.7 GB) on the event
    loop's thread pool; now one runs (this server's setting), two wait, the rest get 503 at once."""
    email = new_user(server)
    rss_before = peak_rss_mib(server)
    started = time.monotonic()
    statuses = Counter(asyncio.run(flood(server, [(email, address()) for _ in range(100)])))
    assert statuses[503] >= 90 and statuses[401] >= 1, statuses
    assert statuses[401] + statuses[503] == 100, statuses
    assert time.monotonic() - started < 5
    assert peak_rss_mib(server) - rss_before < 300
    # ... and a 503 does not count against the user: they sign in right after.
    assert login(server, email).status_code == 303


def peak_rss_mib(gw: Gateway) -> float:
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_sign_in_from_another_sites_page_is_refused(server: Gateway) -> None:
    """Login CSRF: a foreign page's form must not sign a browser in as the attacker."""
    email = new_user(server)
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site", "Origin": server.console_url},
                    {"Sec-Fetch-Site": "same-site"}):
        r = login(server, email, **headers)
        assert r.status_code == 403, (headers, r.status_code)
        assert "qg_session" not in r.cookies and "set-cookie" not in r.headers
    ours = login(server, email, Origin=server.console_url, **{"Sec-Fetch-Site": "same-origin"})
    assert ours.status_code == 303 and "qg_session" in ours.cookies
    assert login(server, email).status_code == 303  # no Origin at all: not a browser, nothing to forge


def test_a_huge_sign_in_body_is_refused_unread(server: Gateway) -> None:
    r = httpx.post(f"{server.console_url}/login", content=b"email=" + b"a" * 100_000,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413


def test_a_web_session_is_no_api_bearer_token(server: Gateway) -> None:
    email = new_user(server)
    session = login(server, email).cookies["qg_session"]
    r = httpx.get(f"{server.console_url}/v1/me", headers={"Authorization": f"Bearer {session}"})
    assert r.status_code == 401
    page = httpx.get(f"{server.console_url}/projects", cookies={"qg_session": session}, follow_redirects=False)
    assert page.status_code == 200  # still a good session in the web console
    # Nor is an API access token a web session.
    token = server.cli("tokens", "create", email).stdout.strip()
    assert httpx.get(f"{server.console_url}/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    r = httpx.get(f"{server.console_url}/projects", cookies={"qg_session": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    listed = httpx.get(f"{server.console_url}/v1/me/access-tokens",
                       headers={"Authorization": f"Bearer {token}"}).json()["data"]
    assert {t["kind"] for t in listed} == {"session", "api"}
    assert next(t for t in listed if t["kind"] == "session")["expires_at"] is not None


def signed_in(gw: Gateway, session: str) -> bool:
    r = httpx.get(f"{gw.console_url}/projects", cookies={"qg_session": session}, follow_redirects=False)
    return r.status_code == 200


def test_sessions_end_on_the_server_when_idle_and_at_their_absolute_age(short_sessions: Gateway) -> None:
    """Idle 1 s and at most 3 s here (24 h and 14 days by default); the cookie is only a hint."""
    gw = short_sessions
    email = new_user(gw)
    idle = login(gw, email)
    assert idle.cookies["qg_session"] and "max-age=3" in idle.headers["set-cookie"].lower()
    busy = login(gw, email).cookies["qg_session"]
    start = time.monotonic()
    checks = []
    while time.monotonic() - start < 2.4:  # used every 0.3 s: never idle for 1 s
        checks.append(signed_in(gw, busy))
        time.sleep(0.3)
    assert all(checks), checks
    assert not signed_in(gw, idle.cookies["qg_session"])  # unused for over 1 s
    time.sleep(max(0.0, 3.2 - (time.monotonic() - start)))
    assert not signed_in(gw, busy)  # 3 s after sign-in, however busy
