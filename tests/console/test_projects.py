"""Many projects (issue 13): one user made 20,000 in a minute, then GET /v1/projects took 2 s (a query per
project) and every web page 1.7 s (the picker). The list is one query and paged; a user's projects are
capped by a setting (admins exempt)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from quotagate.accounts.models import Actor
from quotagate.accounts.passwords import Passwords
from quotagate.accounts.schemas import ProjectCreate
from quotagate.accounts.service import AccountService
from quotagate.store.engine import make_engine, migrate
from tests.conftest import DEFAULT_CONFIG, fresh_database
from tests.console.conftest import UserFactory
from tests.support import Console, Gateway, free_port, start_gateway

PASSWORD = "correct horse battery"


def all_pages(user: Console, limit: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        page = user.ok("GET", "/v1/projects", params=params)
        seen += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return seen
        assert len(page["data"]) == limit
        params["before"] = page["next_cursor"]


def test_the_project_list_comes_in_pages(make_user: UserFactory) -> None:
    user = make_user("pager")
    made = [user.project(f"p{i}")["id"] for i in range(5)]
    first = user.ok("GET", "/v1/projects", params={"limit": 2})
    assert [p["id"] for p in first["data"]] == made[::-1][:2] and first["has_more"] is True
    assert [p["id"] for p in all_pages(user, 2)] == made[::-1]  # newest first, each once
    assert user.ok("GET", "/v1/projects")["has_more"] is False
    # OpenAI's name for the cursor works too.
    after = user.ok("GET", "/v1/projects", params={"limit": 2, "starting_after": made[-1]})
    assert [p["id"] for p in after["data"]] == made[::-1][1:3]
    for params, field in (({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"before": "proj_nope"}, "before"),
                          ({"page": "2"}, "page")):
        r = user.request("GET", "/v1/projects", params=params)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (params, r.text)


def test_another_users_project_is_no_cursor(make_user: UserFactory) -> None:
    mine, theirs = make_user("mine"), make_user("theirs")
    mine.project("a")
    other = theirs.project("b")
    r = mine.request("GET", "/v1/projects", params={"before": other["id"]})
    assert r.status_code == 400  # the same answer as for a project that does not exist


def test_listing_projects_is_one_query_however_many_there_are(database_url: str) -> None:
    migrate(database_url)  # a no-op on the PostgreSQL run's migrated copy
    engine = make_engine(database_url)
    accounts = AccountService(engine, Passwords(), lambda: frozenset(), lambda _c, _p: lambda: None)
    user = accounts.create_user("many@example.com")
    admin = Actor(accounts.create_user("root@example.com", is_admin=True))
    for i in range(40):
        accounts.create_project(Actor(user), ProjectCreate(name=f"p{i}"))
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        for actor in (Actor(user), admin):
            statements.clear()
            found = accounts.list_projects(actor)
            assert len(found) == 40
            assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1, statements
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("quota")
    config = directory / "quotagate.toml"
    config.write_text(DEFAULT_CONFIG.format(upstream_port=free_port()))
    with fresh_database(directory, _pg_template, "q") as url:
        gw = start_gateway(directory / "data", url, config, role="console",
                           extra_env={"QUOTAGATE_MAX_PROJECTS_PER_USER": "3"})
        try:
            yield gw
        finally:
            gw.stop()


def test_a_user_may_create_only_so_many_projects(quota_server: Gateway) -> None:
    user = quota_server.user(f"quota-{secrets.token_hex(4)}@example.com")
    for i in range(3):
        user.project(f"p{i}")
    r = user.request("POST", "/v1/projects", json={"name": "one too many"})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "project_limit_reached" and "3" in error["message"]
    assert "QUOTAGATE_MAX_PROJECTS_PER_USER" in error["message"]
    # Being made a member (or owner) of others' projects does not count; admins have no limit.
    admin = quota_server.user(f"root-{secrets.token_hex(4)}@example.com", admin=True)
    for i in range(4):
        admin.project(f"admin-{i}")


def test_simultaneous_creations_cannot_pass_the_quota_together(quota_server: Gateway) -> None:
    user = quota_server.user(f"racer-{secrets.token_hex(4)}@example.com")
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: user.request("POST", "/v1/projects", json={"name": f"r{i}"}).status_code,
                                 range(12)))
    assert sorted(statuses) == [201] * 3 + [409] * 9, statuses
    assert len(user.ok("GET", "/v1/projects")["data"]) == 3


def test_the_web_console_pages_projects_and_keeps_the_picker_short(server: Gateway) -> None:
    email = f"picker-{secrets.token_hex(4)}@example.com"
    user = server.user(email, admin=True, password=PASSWORD)  # an admin: no project quota, sees every project
    with ThreadPoolExecutor(8) as pool:
        made = set(pool.map(lambda i: user.project(f"proj-{i:03d}")["id"], range(103)))
    newest = [p["id"] for p in user.ok("GET", "/v1/projects", params={"limit": 1000})["data"]]
    assert made <= set(newest) and set(newest[:103]) == made
    r = httpx.post(f"{server.console_url}/login", data={"email": email, "password": PASSWORD})
    with httpx.Client(base_url=server.console_url, cookies={"qg_session": r.cookies["qg_session"]}) as web:
        first = web.get("/projects")
        assert first.status_code == 200
        assert re.findall(r'<li><a href="/projects/(proj_\w+)/keys">', first.text) == newest[:100]
        older = re.search(r'href="/projects\?before=(proj_\w+)"', first.text)
        assert older is not None and older.group(1) == newest[99]
        rest = web.get("/projects", params={"before": older.group(1)})
        assert re.findall(r'<li><a href="/projects/(proj_\w+)/keys">', rest.text) == newest[100:200]
        # The picker on a key page: the newest 50, the project being shown, and "All projects…".
        shown = newest[102]
        page = web.get(f"/projects/{shown}/keys")
        assert page.status_code == 200
        options = re.findall(r'<option value="/projects/(proj_\w+)/keys"', page.text)
        assert options == [*newest[:50], shown] and "All projects" in page.text
        assert web.get("/projects?before=proj_nope").status_code == 400
