"""GET /v1/projects/{projectId}/audit-log: every key event and membership change, with who, when, where."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.console.conftest import UserFactory, email_of
from tests.support import Console

UA = {"User-Agent": "audit-test/1.0 (+tests)"}


def events(user: Console, project_id: str, query: str = "") -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = user.ok("GET", f"/v1/projects/{project_id}/audit-log{query}")["data"]
    return data


def test_every_key_event_is_recorded_with_who_when_and_where(alice: Console) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    project = alice.project("audited")
    pid = project["id"]
    key = alice.ok("POST", f"/v1/projects/{pid}/inference/keys", 201, json={"name": "k", "rpm": 5}, headers=UA)
    alice.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"rpm": 7, "name": "k2"}, headers=UA)
    rotated = alice.ok("POST", f"/v1/inference/keys/{key['id']}/rotate", 201, json={"grace_period_seconds": 60},
                       headers=UA)
    alice.ok("DELETE", f"/v1/inference/keys/{key['id']}", headers=UA)
    alice.ok("DELETE", f"/v1/inference/keys/{key['id']}", headers=UA)  # a repeat records nothing new
    alice.ok("POST", f"/v1/inference/keys/{key['id']}/archive", headers=UA)
    alice.ok("POST", f"/v1/inference/keys/{key['id']}/unarchive", headers=UA)
    # refused writes leave no trace
    alice.request("POST", f"/v1/inference/keys/{rotated['id']}/archive", headers=UA)
    alice.request("PATCH", f"/v1/inference/keys/{key['id']}", json={"rpm": 1}, headers=UA)

    log = events(alice, pid)
    actions = [(e["action"], e["target_id"]) for e in log]
    assert actions == [
        ("key.unarchived", key["id"]),
        ("key.archived", key["id"]),
        ("key.revoked", key["id"]),
        ("key.rotated", key["id"]),
        ("key.minted", rotated["id"]),
        ("key.edited", key["id"]),
        ("key.minted", key["id"]),
        ("project.created", pid),
    ]
    me = email_of(alice)
    for e in log:
        assert e["object"] == "audit_event" and e["project_id"] == pid and e["id"].startswith("evt_")
        assert e["actor"]["email"] == me and e["actor"]["id"].startswith("usr_")
        assert e["client_ip"] == "127.0.0.1"
        assert start <= datetime.fromisoformat(e["created_at"].replace("Z", "+00:00")) <= datetime.now(UTC)
    assert all(e["user_agent"] == UA["User-Agent"] for e in log[:-1])
    edited = log[5]["details"]
    assert edited["before"] == {"name": "k", "rpm": 5} and edited["after"] == {"name": "k2", "rpm": 7}
    assert log[3]["details"]["new_key_id"] == rotated["id"] and log[3]["details"]["grace_period_seconds"] == 60
    assert log[4]["details"]["rotated_from"] == key["id"]
    assert log[6]["details"]["rpm"] == 5
    text = alice.request("GET", f"/v1/projects/{pid}/audit-log").text
    assert key["secret"] not in text and rotated["secret"] not in text


def test_membership_changes_are_recorded(alice: Console, make_user: UserFactory) -> None:
    carol = make_user("carol")
    carol_email = email_of(carol)
    pid = alice.project("audited-members")["id"]
    member = alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": carol_email, "role": "viewer"})
    alice.ok("PATCH", f"/v1/projects/{pid}/members/{member['user_id']}", json={"role": "owner"})
    alice.ok("DELETE", f"/v1/projects/{pid}/members/{member['user_id']}", 204)
    log = events(alice, pid)
    assert [e["action"] for e in log] == ["member.removed", "member.role_changed", "member.added",
                                          "project.created"]
    assert log[0]["target_id"] == member["user_id"] and log[0]["details"]["email"] == carol_email
    assert log[1]["details"] == {"email": carol_email, "from": "viewer", "to": "owner"}
    assert log[2]["details"] == {"email": carol_email, "role": "viewer"}
    # The removed member no longer sees the project or its log.
    assert carol.request("GET", f"/v1/projects/{pid}/audit-log").status_code == 404


def test_audit_log_pages_with_limit_and_before(alice: Console) -> None:
    pid = alice.project("audit-pages")["id"]
    for i in range(5):
        alice.mint(pid, name=f"k{i}")
    everything = events(alice, pid)
    assert len(everything) == 6
    first = events(alice, pid, "?limit=2")
    assert first == everything[:2]
    second = events(alice, pid, f"?limit=2&before={first[-1]['id']}")
    assert second == everything[2:4]
    for bad in ("0", "-1", "abc", "100000"):
        r = alice.request("GET", f"/v1/projects/{pid}/audit-log?limit={bad}")
        assert r.status_code == 400 and r.json()["error"]["field"] == "limit"


def test_client_ip_is_the_peer_or_a_local_proxys_forwarded_address(alice: Console) -> None:
    pid = alice.project("audit-proxy")["id"]
    alice.ok("POST", f"/v1/projects/{pid}/inference/keys", 201, json={"name": "via-proxy"},
             headers={"X-Forwarded-For": "203.0.113.7"})
    assert events(alice, pid)[0]["client_ip"] == "203.0.113.7"
    alice.ok("POST", f"/v1/projects/{pid}/inference/keys", 201, json={"name": "direct"})
    assert events(alice, pid)[0]["client_ip"] == "127.0.0.1"
