"""Concurrent writes to one key or one project's members: each runs as if alone (row locks on
PostgreSQL, BEGIN IMMEDIATE on SQLite)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.console.conftest import UserFactory, email_of
from tests.support import Console


def _parallel(calls: list[tuple[Console, str, str, Any]]) -> list[httpx.Response]:
    def one(call: tuple[Console, str, str, Any]) -> httpx.Response:
        user, method, path, body = call
        with httpx.Client(base_url=str(user.http.base_url), headers=dict(user.http.headers), timeout=60) as c:
            return c.request(method, path, json=body)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def test_concurrent_rotations_of_one_key_mint_one_successor(alice: Console) -> None:
    pid = alice.project("race-rotate")["id"]
    key = alice.mint(pid)
    results = _parallel([(alice, "POST", f"/v1/inference/keys/{key['id']}/rotate", {})] * 8)
    assert sorted(r.status_code for r in results) == [201] + [409] * 7
    listed = alice.ok("GET", f"/v1/projects/{pid}/inference/keys")["data"]
    assert len(listed) == 2 and [k["status"] for k in listed] == ["active", "revoked"]


def test_concurrent_revokes_record_one_event(alice: Console) -> None:
    pid = alice.project("race-revoke")["id"]
    key = alice.mint(pid)
    results = _parallel([(alice, "DELETE", f"/v1/inference/keys/{key['id']}", None)] * 8)
    assert all(r.status_code == 200 for r in results)
    assert len({r.json()["revoked_at"] for r in results}) == 1
    actions = [e["action"] for e in alice.ok("GET", f"/v1/projects/{pid}/audit-log")["data"]]
    assert actions.count("key.revoked") == 1


def test_two_owners_stepping_down_at_once_leave_one_owner(alice: Console, make_user: UserFactory) -> None:
    frank = make_user("frank")
    pid = alice.project("race-owners")["id"]
    alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": email_of(frank), "role": "owner"})
    frank.join(pid)
    alice_id, frank_id = alice.ok("GET", "/v1/me")["id"], frank.ok("GET", "/v1/me")["id"]
    for _ in range(3):
        results = _parallel([(alice, "PATCH", f"/v1/projects/{pid}/members/{alice_id}", {"role": "member"}),
                             (frank, "PATCH", f"/v1/projects/{pid}/members/{frank_id}", {"role": "member"})])
        assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
        members = alice.ok("GET", f"/v1/projects/{pid}/members")["data"]
        assert [m["role"] for m in members].count("owner") == 1
        # restore two owners for the next round
        owner = alice if any(m["user_id"] == alice_id and m["role"] == "owner" for m in members) else frank
        other = frank_id if owner is alice else alice_id
        owner.ok("PATCH", f"/v1/projects/{pid}/members/{other}", json={"role": "owner"})
