"""Projects and members: roles owner/member/viewer, the last owner, the role matrix, instance admins."""

from __future__ import annotations

import re
import secrets
from typing import Any

import httpx
import pytest

from tests.console.conftest import UserFactory, email_of
from tests.support import Console, Gateway


@pytest.fixture(scope="module")
def team(make_user: UserFactory) -> dict[str, Console]:
    return {role: make_user(role) for role in ("owner", "member", "viewer", "stranger")} | {
        "admin": make_user("admin", admin=True)}


@pytest.fixture
def shared(team: dict[str, Console]) -> dict[str, Any]:
    """A project of team["owner"] with the member and the viewer in it, and one key."""
    owner = team["owner"]
    project = owner.project("shared")
    for role in ("member", "viewer"):
        owner.ok("POST", f"/v1/projects/{project['id']}/members", 201,
                 json={"email": email_of(team[role]), "role": role})
        team[role].join(project["id"])
    key = owner.mint(project["id"], name="shared-key")
    return {"project": project, "key": key}


def test_creating_a_project_makes_the_caller_owner(alice: Console) -> None:
    project = alice.project("mine")
    assert project["object"] == "project" and project["id"].startswith("proj_") and project["role"] == "owner"
    assert project["name"] == "mine" and project["models"] is None
    members = alice.ok("GET", f"/v1/projects/{project['id']}/members")["data"]
    assert [(m["email"], m["role"]) for m in members] == [(email_of(alice), "owner")]
    listed = alice.ok("GET", "/v1/projects")
    assert listed["object"] == "list" and project["id"] in [p["id"] for p in listed["data"]]
    assert alice.ok("GET", f"/v1/projects/{project['id']}") == project


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"), ({"name": ""}, "name"), ({"name": 5}, "name"), ({"name": "x" * 201}, "name"),
    ({"name": "a\u0000b"}, "name"), ({"name": "ok", "models": []}, "models"),
    ({"name": "ok", "models": ["gpt-4o"]}, "models"), ({"name": "ok", "plan": "pro"}, "plan"),
])
def test_project_validation(alice: Console, body: dict[str, Any], field: str) -> None:
    r = alice.request("POST", "/v1/projects", json=body)
    assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text


def test_members_list_add_change_remove(alice: Console, make_user: UserFactory) -> None:
    dave = make_user("dave")
    dave_email = email_of(dave)
    pid = alice.project("team")["id"]
    assert dave.request("GET", f"/v1/projects/{pid}").status_code == 404
    added = alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": dave_email.upper(), "role": "viewer"})
    assert added["object"] == "project_member" and added["email"] == dave_email and added["role"] == "viewer"
    # Invited, not added: nothing is granted until dave accepts (issue 13: no one is added without consent).
    assert added["status"] == "invited"
    assert dave.request("GET", f"/v1/projects/{pid}").status_code == 404
    invitations = dave.ok("GET", "/v1/me/invitations")["data"]
    assert [(i["project_id"], i["project_name"], i["role"]) for i in invitations] == [(pid, "team", "viewer")]
    assert dave.join(pid)["role"] == "viewer"
    assert dave.ok("GET", "/v1/me/invitations")["data"] == []
    assert dave.ok("GET", f"/v1/projects/{pid}")["role"] == "viewer"
    assert dave.request("POST", f"/v1/me/invitations/{pid}/accept").status_code == 404  # once
    members = alice.ok("GET", f"/v1/projects/{pid}/members")["data"]
    assert sorted((m["email"], m["role"], m["status"]) for m in members) == sorted([
        (email_of(alice), "owner", "active"), (dave_email, "viewer", "active")])
    r = alice.request("POST", f"/v1/projects/{pid}/members", json={"email": dave_email, "role": "member"})
    assert r.status_code == 409  # already a member: change the role with PATCH
    changed = alice.ok("PATCH", f"/v1/projects/{pid}/members/{added['user_id']}", json={"role": "member"})
    assert changed["role"] == "member"
    assert dave.ok("GET", f"/v1/projects/{pid}")["role"] == "member"
    alice.ok("DELETE", f"/v1/projects/{pid}/members/{added['user_id']}", 204)
    assert dave.request("GET", f"/v1/projects/{pid}").status_code == 404
    assert pid not in [p["id"] for p in dave.ok("GET", "/v1/projects")["data"]]
    r = alice.request("DELETE", f"/v1/projects/{pid}/members/{added['user_id']}")
    assert r.status_code == 404


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"email": "not-an-email", "role": "member"}, 400, "email"),
    ({"email": "a\u0000b@example.com", "role": "member"}, 400, "email"),
    ({"email": "x@example.com", "role": "admin"}, 400, "role"),
    ({"email": "x@example.com", "role": "Owner"}, 400, "role"),
    ({"role": "member"}, 400, "email"),
    ({"email": "x@example.com", "role": "member", "extra": 1}, 400, "extra"),
])
def test_add_member_validation(alice: Console, body: dict[str, Any], status: int, field: str) -> None:
    pid = alice.project("member-validation")["id"]
    r = alice.request("POST", f"/v1/projects/{pid}/members", json=body)
    assert r.status_code == status and r.json()["error"]["field"] == field, r.text
    assert len(alice.ok("GET", f"/v1/projects/{pid}/members")["data"]) == 1


# -- an email with or without an account: the same answer (issue 13) ------------------------------------

def _fresh_email(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}@example.com"


def _shape(r: httpx.Response, email: str, user_id: str) -> tuple[int, str, bytes]:
    """The status, the headers that are not per response, and the body with the email, the user id and the
    timestamps blanked: what must not depend on whether the email has an account."""
    headers = "\n".join(f"{k}: {v}" for k, v in sorted(r.headers.items())
                        if k not in {"date", "x-request-id", "content-length"})
    body = r.content.replace(email.encode(), b"EMAIL").replace(user_id.encode(), b"USER_ID")
    return r.status_code, headers, re.sub(rb'"\d{4}-\d\d-\d\dT[^"]+Z"', b'"TIME"', body)


def test_adding_a_member_answers_the_same_whether_or_not_the_email_has_an_account(
        alice: Console, make_user: UserFactory) -> None:
    pid = alice.project("same-answer")["id"]
    known = email_of(make_user("known"))  # "known-xxxxxxxx@example.com"
    unknown = _fresh_email("nokno")  # the same length, and no account
    assert len(known) == len(unknown)
    answers = {}
    for email in (known, unknown):
        r = alice.request("POST", f"/v1/projects/{pid}/members", json={"email": email.upper(), "role": "viewer"})
        assert r.status_code == 201, r.text
        answers[email] = r
    a, b = answers[known], answers[unknown]
    assert a.headers["content-length"] == b.headers["content-length"]
    ja, jb = a.json(), b.json()
    assert list(ja) == list(jb) == ["object", "user_id", "email", "role", "status", "created_at"]
    assert ja["status"] == jb["status"] == "invited"
    assert re.fullmatch(r"usr_[0-9A-Za-z]{20}", ja["user_id"]) and re.fullmatch(r"usr_[0-9A-Za-z]{20}", jb["user_id"])
    assert (ja["email"], jb["email"]) == (known, unknown)
    assert _shape(a, known, ja["user_id"]) == _shape(b, unknown, jb["user_id"])
    # adding either again is the same conflict
    again = [alice.request("POST", f"/v1/projects/{pid}/members", json={"email": e, "role": "member"})
             for e in (known, unknown)]
    assert [r.status_code for r in again] == [409, 409]
    assert _shape(again[0], known, ja["user_id"]) == _shape(again[1], unknown, jb["user_id"])
    # the member list shows both alike
    listed = {m["email"]: m for m in alice.ok("GET", f"/v1/projects/{pid}/members")["data"]}
    assert listed[known] == ja and listed[unknown] == jb
    # and so does the audit log
    log = [e for e in alice.ok("GET", f"/v1/projects/{pid}/audit-log")["data"] if e["action"] == "member.added"]
    by_target = {e["target_id"]: e for e in log}
    ea, eb = by_target[ja["user_id"]], by_target[jb["user_id"]]
    assert sorted(ea) == sorted(eb) and ea["details"] == {"email": known, "role": "viewer"}
    assert eb["details"] == {"email": unknown, "role": "viewer"}


def test_a_user_created_later_finds_the_invitations(alice: Console, server: Gateway) -> None:
    pid = alice.project("waiting")["id"]
    other = alice.project("waiting-too")["id"]
    email = _fresh_email("later")
    added = alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": email, "role": "member"})
    again = alice.ok("POST", f"/v1/projects/{other}/members", 201, json={"email": email.upper(), "role": "viewer"})
    assert again["user_id"] == added["user_id"]  # one email, one user id, as for a user who exists
    # the role of a member who has no account yet can be changed like anyone's
    assert alice.ok("PATCH", f"/v1/projects/{other}/members/{added['user_id']}",
                    json={"role": "owner"})["role"] == "owner"
    later = server.user(email.upper())  # created with another case: emails are compared case-insensitively
    me = later.ok("GET", "/v1/me")
    assert me["id"] == added["user_id"] and me["email"] == email
    assert later.request("GET", f"/v1/projects/{pid}").status_code == 404  # invited, not yet a member
    assert {i["project_id"]: i["role"] for i in later.ok("GET", "/v1/me/invitations")["data"]} == {
        pid: "member", other: "owner"}
    later.join(pid)
    later.join(other)
    assert later.ok("GET", f"/v1/projects/{pid}")["role"] == "member"
    assert later.ok("GET", f"/v1/projects/{other}")["role"] == "owner"
    assert {pid, other} <= {p["id"] for p in later.ok("GET", "/v1/projects")["data"]}
    members = [m for m in alice.ok("GET", f"/v1/projects/{pid}/members")["data"] if m["email"] == email]
    assert [{**m, "created_at": None} for m in members] == [{**added, "status": "active", "created_at": None}]
    # now a member like any other: it can mint and leave
    later.mint(pid, name="from-a-later-user")
    later.ok("DELETE", f"/v1/projects/{pid}/members/{me['id']}", 204)
    assert later.request("GET", f"/v1/projects/{pid}").status_code == 404


def test_a_member_without_an_account_can_be_removed(alice: Console, server: Gateway) -> None:
    pid = alice.project("removed-before-signup")["id"]
    email = _fresh_email("gone")
    added = alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": email, "role": "viewer"})
    alice.ok("DELETE", f"/v1/projects/{pid}/members/{added['user_id']}", 204)
    assert email not in [m["email"] for m in alice.ok("GET", f"/v1/projects/{pid}/members")["data"]]
    assert alice.request("DELETE", f"/v1/projects/{pid}/members/{added['user_id']}").status_code == 404
    log = alice.ok("GET", f"/v1/projects/{pid}/audit-log")["data"]
    assert log[0]["action"] == "member.removed" and log[0]["details"] == {"email": email, "role": "viewer"}
    user = server.user(email)
    assert user.request("GET", f"/v1/projects/{pid}").status_code == 404
    assert pid not in [p["id"] for p in user.ok("GET", "/v1/projects")["data"]]


def test_the_last_owner_rule_does_not_tell_whether_the_other_owner_has_an_account(
        alice: Console, make_user: UserFactory) -> None:
    """An invited owner does not hold the project, whether or not the email has an account: stepping down is
    refused the same way in both cases; once the co-owner has accepted, it succeeds."""
    me = alice.ok("GET", "/v1/me")["id"]
    co_owner = make_user("co-owner")
    answers = []
    for email in (email_of(co_owner), _fresh_email("co-owner")):
        pid = alice.project("two-owners")["id"]
        alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": email, "role": "owner"})
        r = alice.request("PATCH", f"/v1/projects/{pid}/members/{me}", json={"role": "member"})
        answers.append((r.status_code, r.json()))
    assert answers[0] == answers[1] and answers[0][0] == 409
    first = co_owner.ok("GET", "/v1/me/invitations")["data"][0]["project_id"]
    co_owner.join(first)
    assert alice.ok("PATCH", f"/v1/projects/{first}/members/{me}", json={"role": "member"})["role"] == "member"


def test_a_project_never_loses_its_last_owner(alice: Console, make_user: UserFactory) -> None:
    erin = make_user("erin")
    pid = alice.project("owned")["id"]
    me = alice.ok("GET", "/v1/me")["id"]
    for method, body in (("PATCH", {"role": "member"}), ("PATCH", {"role": "viewer"}), ("DELETE", None)):
        r = alice.request(method, f"/v1/projects/{pid}/members/{me}", json=body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict", r.text
    erin_member = alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": email_of(erin),
                                                                              "role": "owner"})
    erin.join(pid)
    # with a second owner, the first may step down; then the second is the last and is protected
    assert alice.ok("PATCH", f"/v1/projects/{pid}/members/{me}", json={"role": "member"})["role"] == "member"
    r = erin.request("PATCH", f"/v1/projects/{pid}/members/{erin_member['user_id']}", json={"role": "viewer"})
    assert r.status_code == 409
    r = erin.request("DELETE", f"/v1/projects/{pid}/members/{erin_member['user_id']}")
    assert r.status_code == 409
    roles = {m["email"]: m["role"] for m in erin.ok("GET", f"/v1/projects/{pid}/members")["data"]}
    assert sorted(roles.values()) == ["member", "owner"]


def test_anyone_may_leave_a_project(team: dict[str, Console], shared: dict[str, Any]) -> None:
    pid = shared["project"]["id"]
    viewer_id = team["viewer"].ok("GET", "/v1/me")["id"]
    team["viewer"].ok("DELETE", f"/v1/projects/{pid}/members/{viewer_id}", 204)
    assert team["viewer"].request("GET", f"/v1/projects/{pid}").status_code == 404


def _attempts(shared: dict[str, Any], target_user_id: str, email: str) -> dict[str, tuple[str, str, Any]]:
    """Every write of the console API on one project, by name: (method, path, body)."""
    pid, kid = shared["project"]["id"], shared["key"]["id"]
    return {
        "rename project": ("PATCH", f"/v1/projects/{pid}", {"name": "hijacked"}),
        "add member": ("POST", f"/v1/projects/{pid}/members", {"email": email, "role": "viewer"}),
        "change member": ("PATCH", f"/v1/projects/{pid}/members/{target_user_id}", {"role": "owner"}),
        "remove member": ("DELETE", f"/v1/projects/{pid}/members/{target_user_id}", None),
        "mint": ("POST", f"/v1/projects/{pid}/inference/keys", {"name": "x"}),
        "edit key": ("PATCH", f"/v1/inference/keys/{kid}", {"rpm": 1}),
        "rotate key": ("POST", f"/v1/inference/keys/{kid}/rotate", {"grace_period_seconds": 60}),
        "revoke key": ("DELETE", f"/v1/inference/keys/{kid}", None),
    }


READS = ("/v1/projects/{pid}", "/v1/projects/{pid}/members", "/v1/projects/{pid}/inference/keys",
         "/v1/projects/{pid}/inference/keys?include_archived=true", "/v1/projects/{pid}/audit-log",
         "/v1/inference/keys/{kid}")


def test_viewer_reads_but_cannot_write(team: dict[str, Console], shared: dict[str, Any],
                                       make_user: UserFactory) -> None:
    viewer = team["viewer"]
    pid, kid = shared["project"]["id"], shared["key"]["id"]
    for path in READS:
        assert viewer.request("GET", path.format(pid=pid, kid=kid)).status_code == 200, path
    member_id = team["member"].ok("GET", "/v1/me")["id"]
    for name, (method, path, body) in _attempts(shared, member_id, email_of(team["stranger"])).items():
        r = viewer.request(method, path, json=body)
        assert r.status_code == 403, (name, r.text)
        assert r.json()["error"]["code"] == "forbidden"
    # even with a bad body, the role is checked first
    r = viewer.request("POST", f"/v1/projects/{pid}/inference/keys", json={"rpm": "bad"})
    assert r.status_code == 403
    assert team["owner"].ok("GET", f"/v1/inference/keys/{kid}")["status"] == "active"
    assert len(team["owner"].ok("GET", f"/v1/projects/{pid}/inference/keys")["data"]) == 1


def test_member_manages_keys_but_not_members(team: dict[str, Console], shared: dict[str, Any]) -> None:
    member = team["member"]
    pid = shared["project"]["id"]
    viewer_id = team["viewer"].ok("GET", "/v1/me")["id"]
    attempts = _attempts(shared, viewer_id, email_of(team["stranger"]))
    for name in ("rename project", "add member", "change member", "remove member"):
        method, path, body = attempts[name]
        r = member.request(method, path, json=body)
        assert r.status_code == 403, (name, r.text)
    key = member.mint(pid, name="members-key", rpm=3)
    member.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"rpm": 4})
    rotated = member.ok("POST", f"/v1/inference/keys/{key['id']}/rotate", 201, json={})
    member.ok("DELETE", f"/v1/inference/keys/{rotated['id']}")
    member.ok("POST", f"/v1/inference/keys/{rotated['id']}/archive")
    member.ok("POST", f"/v1/inference/keys/{rotated['id']}/unarchive")
    log = member.ok("GET", f"/v1/projects/{pid}/audit-log")["data"]
    assert log[0]["actor"]["email"] == email_of(member)


def test_owner_and_instance_admin_may_do_everything(team: dict[str, Console], shared: dict[str, Any]) -> None:
    pid = shared["project"]["id"]
    viewer_id = team["viewer"].ok("GET", "/v1/me")["id"]
    for who in ("admin", "owner"):
        user = team[who]
        assert user.ok("GET", f"/v1/projects/{pid}")["role"] == "owner"
        key = user.mint(pid, name=f"{who}-key")
        user.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"rpm": 9})
        user.ok("DELETE", f"/v1/inference/keys/{key['id']}")
        user.ok("PATCH", f"/v1/projects/{pid}", json={"name": f"renamed by {who}"})
        user.ok("PATCH", f"/v1/projects/{pid}/members/{viewer_id}", json={"role": "member"})
        user.ok("PATCH", f"/v1/projects/{pid}/members/{viewer_id}", json={"role": "viewer"})
    # the admin sees every project without being a member of it
    assert pid in [p["id"] for p in team["admin"].ok("GET", "/v1/projects")["data"]]
    assert email_of(team["admin"]) not in [m["email"] for m in
                                           team["owner"].ok("GET", f"/v1/projects/{pid}/members")["data"]]
    team["admin"].ok("DELETE", f"/v1/projects/{pid}/members/{viewer_id}", 204)


def test_a_stranger_gets_404_everywhere(team: dict[str, Console], shared: dict[str, Any]) -> None:
    """Not 403: another project's resources are never revealed, whatever the method or body."""
    stranger = team["stranger"]
    pid, kid = shared["project"]["id"], shared["key"]["id"]
    for path in (*READS, "/v1/inference/keys/{kid}/usage", "/v1/inference/keys/{kid}/activity",
                 "/v1/projects/{pid}/usage"):
        r = stranger.request("GET", path.format(pid=pid, kid=kid))
        assert r.status_code == 404, (path, r.text)
        assert "shared" not in r.text and shared["key"]["prefix"] not in r.text
    owner_id = team["owner"].ok("GET", "/v1/me")["id"]
    stranger_id = stranger.ok("GET", "/v1/me")["id"]
    attempts = _attempts(shared, owner_id, email_of(stranger))
    attempts.update({
        "archive": ("POST", f"/v1/inference/keys/{kid}/archive", None),
        "unarchive": ("POST", f"/v1/inference/keys/{kid}/unarchive", None),
        "remove self": ("DELETE", f"/v1/projects/{pid}/members/{stranger_id}", None),
        "bad mint body": ("POST", f"/v1/projects/{pid}/inference/keys", {"rpm": -1}),
        "bad edit body": ("PATCH", f"/v1/inference/keys/{kid}", {"nonsense": True}),
        "bad rotate body": ("POST", f"/v1/inference/keys/{kid}/rotate", {"grace_period_seconds": -1}),
        "bad member body": ("POST", f"/v1/projects/{pid}/members", {"email": "bad"}),
    })
    for name, (method, path, body) in attempts.items():
        r = stranger.request(method, path, json=body)
        assert r.status_code == 404, (name, r.text)
        assert r.json()["error"]["code"] == "not_found"
    # the stranger's project list does not include it, and nothing changed
    assert pid not in [p["id"] for p in stranger.ok("GET", "/v1/projects")["data"]]
    owner = team["owner"]
    assert owner.ok("GET", f"/v1/projects/{pid}")["name"] == "shared"
    key = owner.ok("GET", f"/v1/inference/keys/{kid}")
    assert key["status"] == "active" and key["rpm"] is None and key["archived"] is False
    assert len(owner.ok("GET", f"/v1/projects/{pid}/members")["data"]) == 3
    assert len(owner.ok("GET", f"/v1/projects/{pid}/inference/keys")["data"]) == 1
    assert all(e["actor"]["email"] != email_of(stranger)
               for e in owner.ok("GET", f"/v1/projects/{pid}/audit-log")["data"])


def test_a_stranger_cannot_tell_a_hidden_project_from_a_missing_one(team: dict[str, Console],
                                                                   shared: dict[str, Any]) -> None:
    stranger = team["stranger"]
    real = stranger.request("GET", f"/v1/projects/{shared['project']['id']}")
    fake = stranger.request("GET", "/v1/projects/proj_00000000000000000000")
    assert real.status_code == fake.status_code == 404
    assert real.json()["error"]["code"] == fake.json()["error"]["code"]
    real_key = stranger.request("DELETE", f"/v1/inference/keys/{shared['key']['id']}")
    fake_key = stranger.request("DELETE", "/v1/inference/keys/key_00000000000000000000")
    assert real_key.status_code == fake_key.status_code == 404


def test_an_invitation_can_be_declined_and_is_only_the_invited_users(alice: Console,
                                                                      make_user: UserFactory) -> None:
    grace, mallory = make_user("grace"), make_user("mallory")
    pid = alice.project("invite-only")["id"]
    invited = alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": email_of(grace), "role": "member"})
    # Someone else cannot take it, and learns nothing (the same 404 as for no invitation at all).
    taken = mallory.request("POST", f"/v1/me/invitations/{pid}/accept")
    none = mallory.request("POST", "/v1/me/invitations/proj_nothing/accept")
    assert taken.status_code == none.status_code == 404
    assert mallory.request("GET", f"/v1/projects/{pid}").status_code == 404
    # An invited member can do nothing in the project yet.
    assert grace.request("POST", f"/v1/projects/{pid}/inference/keys", json={"name": "k"}).status_code == 404
    grace.ok("DELETE", f"/v1/me/invitations/{pid}", 204)
    assert grace.ok("GET", "/v1/me/invitations")["data"] == []
    assert grace.request("POST", f"/v1/me/invitations/{pid}/accept").status_code == 404
    assert email_of(grace) not in [m["email"] for m in alice.ok("GET", f"/v1/projects/{pid}/members")["data"]]
    log = alice.ok("GET", f"/v1/projects/{pid}/audit-log")["data"]
    assert [(e["action"], e["target_id"], e["actor"]["email"]) for e in log[:2]] == [
        ("member.declined", invited["user_id"], email_of(grace)), ("member.added", invited["user_id"], email_of(alice))]
    # Invited again, accepted: recorded as joined, by the user who joined.
    alice.ok("POST", f"/v1/projects/{pid}/members", 201, json={"email": email_of(grace), "role": "viewer"})
    grace.join(pid)
    assert alice.ok("GET", f"/v1/projects/{pid}/audit-log")["data"][0]["action"] == "member.joined"
