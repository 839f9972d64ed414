"""The webhook API (CONTRACT §6): create with the secret shown once, list, get, edit, delete, the test
event and the delivery log; validation naming the field; roles and other projects; the audit log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support import Console, Gateway
from tests.webhooks.receiver import Receiver, verified

ALL_EVENTS = ["key.budget_threshold", "project.budget_threshold", "key.revoked", "key.expiring", "key.leaked"]


def hooks(project_id: str) -> str:
    return f"/v1/projects/{project_id}/webhooks"


def test_create_shows_the_secret_once_and_the_rest_never_does(owner: Console, receiver: Receiver) -> None:
    project = owner.project("hooks")
    made = owner.ok("POST", hooks(project["id"]), 201, json={"url": receiver.url, "events": ["key.revoked"],
                                                              "budget_thresholds": [1.0, 0.5]})
    secret = made.pop("secret")
    assert secret.startswith("whsec_") and len(secret) > 40
    assert made["secret_prefix"] == secret[:10]
    assert made["events"] == ["key.revoked"] and made["budget_thresholds"] == [0.5, 1.0]  # sorted
    assert made["enabled"] is True and made["object"] == "webhook" and made["project_id"] == project["id"]
    got = owner.ok("GET", f"{hooks(project['id'])}/{made['id']}")
    listed = owner.ok("GET", hooks(project["id"]))["data"]
    assert got == made and listed == [made]
    for shown in (got, listed, owner.ok("GET", f"/v1/projects/{project['id']}/audit-log")["data"]):
        assert secret not in str(shown) and secret[10:] not in str(shown)
    defaults = owner.ok("POST", hooks(project["id"]), 201, json={"url": receiver.url})
    assert defaults["events"] == ALL_EVENTS and defaults["budget_thresholds"] == [0.5, 0.8, 1.0]
    assert defaults["secret"] != secret


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "ftp://example.com/hook"}, "url"),
    ({"url": "file:///etc/passwd"}, "url"),
    ({"url": "http://"}, "url"),
    ({"url": "http://user:pw@example.com/"}, "url"),
    ({"url": "http://example.com:99999/"}, "url"),
    ({"url": "http://example.com/a b"}, "url"),
    ({"url": "https://example.com/" + "a" * 2000}, "url"),
    ({}, "url"),
    ({"url": "https://example.com/", "events": ["key.deleted"]}, "events"),
    ({"url": "https://example.com/", "events": []}, "events"),
    ({"url": "https://example.com/", "events": ["key.revoked", "key.revoked"]}, "events"),
    ({"url": "https://example.com/", "budget_thresholds": [1.5]}, "budget_thresholds"),
    ({"url": "https://example.com/", "budget_thresholds": [0]}, "budget_thresholds"),
    ({"url": "https://example.com/", "budget_thresholds": ["0.5"]}, "budget_thresholds"),
    ({"url": "https://example.com/", "budget_thresholds": [0.5, 0.5]}, "budget_thresholds"),
    ({"url": "https://example.com/", "secret": "mine"}, "secret"),
])
def test_invalid_bodies_name_the_field(owner: Console, body: dict[str, Any], field: str) -> None:
    project = owner.project("invalid")
    r = owner.request("POST", hooks(project["id"]), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


def test_roles_and_other_projects(gw: Gateway, owner: Console, make_user: Callable[[str], Console],
                                  receiver: Receiver) -> None:
    project = owner.project("roles")
    hook = owner.ok("POST", hooks(project["id"]), 201, json={"url": receiver.url})
    member, viewer, stranger = make_user("member"), make_user("viewer"), make_user("stranger")
    for user, role in ((member, "member"), (viewer, "viewer")):
        me = user.ok("GET", "/v1/me")
        owner.ok("POST", f"/v1/projects/{project['id']}/members", 201, json={"email": me["email"], "role": role})
        user.join(project["id"])
    one = f"{hooks(project['id'])}/{hook['id']}"
    # A member reads (the list, one, its deliveries) but changes nothing; a viewer does not see webhooks.
    assert member.ok("GET", one)["id"] == hook["id"]
    member.ok("GET", f"{one}/deliveries")
    writes = (("POST", hooks(project["id"]), {"url": receiver.url}), ("PATCH", one, {"enabled": False}),
              ("DELETE", one, None), ("POST", f"{one}/test", None))
    for method, path, body in writes:
        assert member.request(method, path, json=body).status_code == 403
        assert viewer.request(method, path, json=body).status_code == 403
    assert viewer.request("GET", one).status_code == 403
    # A stranger, and another project's owner using its own project's path: 404, whatever the body.
    for method, path in (("GET", one), ("PATCH", one), ("DELETE", one), ("POST", f"{one}/test"),
                         ("GET", f"{one}/deliveries"), ("POST", hooks(project["id"])), ("GET", hooks(project["id"]))):
        assert stranger.request(method, path, json={"bogus": 1}).status_code == 404, (method, path)
    other = stranger.project("mine")
    crossed = f"{hooks(other['id'])}/{hook['id']}"
    for method in ("GET", "PATCH", "DELETE"):
        assert stranger.request(method, crossed, json={"enabled": False}).status_code == 404
    assert stranger.request("GET", f"{crossed}/deliveries").status_code == 404
    assert stranger.request("POST", f"{crossed}/test").status_code == 404
    assert owner.ok("GET", one)["enabled"] is True  # nothing of that changed it


def test_edit_rotate_delete_and_the_audit_log(owner: Console, receiver: Receiver) -> None:
    project = owner.project("edit")
    made = owner.ok("POST", hooks(project["id"]), 201, json={"url": receiver.url})
    one = f"{hooks(project['id'])}/{made['id']}"
    assert owner.request("PATCH", one, json={}).status_code == 400
    assert owner.request("PATCH", one, json={"url": None}).json()["error"]["field"] == "url"
    assert owner.request("PATCH", one, json={"url": "gopher://x/"}).json()["error"]["field"] == "url"
    edited = owner.ok("PATCH", one, json={"events": ["key.leaked", "key.revoked"], "budget_thresholds": [0.9],
                                          "enabled": False})
    assert "secret" not in edited
    assert edited["events"] == ["key.revoked", "key.leaked"] and edited["budget_thresholds"] == [0.9]
    assert edited["enabled"] is False and edited["secret_prefix"] == made["secret_prefix"]
    assert owner.request("POST", f"{one}/test").status_code == 409  # a disabled webhook sends nothing
    rotated = owner.ok("PATCH", one, json={"rotate_secret": True, "enabled": True})
    assert rotated["secret"] != made["secret"] and rotated["secret_prefix"] == rotated["secret"][:10]
    # Deliveries from now on are signed with the new secret only.
    owner.ok("POST", f"{one}/test", 201)
    got = receiver.wait_for(lambda rs: len(rs) == 1, what="the test event")[0]
    assert verified(rotated["secret"], got) and not verified(made["secret"], got)
    owner.ok("DELETE", one, 204)
    assert owner.request("GET", one).status_code == 404
    assert owner.request("DELETE", one).status_code == 404
    log = owner.ok("GET", f"/v1/projects/{project['id']}/audit-log")["data"]
    actions = [(e["action"], e["target_id"]) for e in log if e["target_type"] == "webhook"]
    assert actions == [("webhook.deleted", made["id"]), ("webhook.tested", made["id"]),
                       ("webhook.updated", made["id"]), ("webhook.updated", made["id"]),
                       ("webhook.created", made["id"])]
    updates = [e for e in log if e["action"] == "webhook.updated"]
    assert updates[0]["details"]["secret_rotated"] is True
    assert updates[1]["details"]["after"] == {"budget_thresholds": [0.9], "enabled": False,
                                              "events": ["key.revoked", "key.leaked"]}
    assert made["secret"] not in str(log) and rotated["secret"] not in str(log)
    # The URL's query (where receivers often keep a token) is not in the log, which viewers read too.
    created = next(e for e in log if e["action"] == "webhook.created")
    assert created["details"]["url"] == receiver.url.partition("?")[0] + "?…"
    assert "src=test" not in str(log)


def test_a_test_event_is_signed_retried_and_logged(owner: Console) -> None:
    receiver = Receiver(fail_first=2).start()
    try:
        project = owner.project("test-event")
        made = owner.ok("POST", hooks(project["id"]), 201, json={"url": receiver.url})
        one = f"{hooks(project['id'])}/{made['id']}"
        queued = owner.ok("POST", f"{one}/test", 201)
        assert queued["status"] == "pending" and queued["event_type"] == "webhook.test"
        got = receiver.wait_for(lambda rs: any(r.answered == 200 for r in rs), what="the test event, third try")
        assert [r.answered for r in got] == [500, 500, 200]
        assert {r.event_id for r in got} == {queued["id"]}           # one event id on every attempt
        assert len({r.body for r in got}) == 1                        # the same body too
        assert all(verified(made["secret"], r) for r in got)
        assert [r.path for r in got] == ["/hooks/quotagate?src=test"] * 3
        event = got[0].event
        assert event == {"id": queued["id"], "type": "webhook.test", "created_at": queued["created_at"],
                         "data": {"webhook_id": made["id"], "project_id": project["id"],
                                  "message": "a test event sent from quotagate"}}
        assert got[0].headers["content-type"] == "application/json"
        stamps = [int(r.headers["quotagate-signature"].split(",")[0].removeprefix("t=")) for r in got]
        assert all(abs(s - r.at) < 5 for s, r in zip(stamps, got, strict=True))
        log = _delivered(owner, one, queued["id"])
        assert log["attempts"] == 3 and log["response_code"] == 200 and log["last_error"] is None
        assert [a["response_code"] for a in log["attempt_log"]] == [500, 500, 200]
        assert log["attempt_log"][0]["error"] == "HTTP 500"
        assert owner.ok("GET", f"{one}/deliveries", params={"status": "failed"})["data"] == []
        for params, field in (({"status": "bogus"}, "status"), ({"page": "2"}, "page")):
            assert owner.request("GET", f"{one}/deliveries", params=params).json()["error"]["field"] == field
    finally:
        receiver.stop()


def _delivered(owner: Console, one: str, event_id: str, timeout: float = 20.0) -> dict[str, Any]:
    """The delivery ``event_id`` once it is no longer pending."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = [d for d in owner.ok("GET", f"{one}/deliveries")["data"] if d["id"] == event_id]
        if found and found[0]["status"] != "pending":
            return found[0]
        assert time.monotonic() < deadline, f"delivery {event_id} still pending: {found}"
        time.sleep(0.1)


def test_an_endpoint_that_keeps_failing_is_given_up_after_the_attempts(owner: Console) -> None:
    receiver = Receiver(status=503).start()
    try:
        project = owner.project("failing")
        made = owner.ok("POST", hooks(project["id"]), 201, json={"url": receiver.url})
        one = f"{hooks(project['id'])}/{made['id']}"
        queued = owner.ok("POST", f"{one}/test", 201)
        log = _delivered(owner, one, queued["id"])
        assert log["status"] == "failed" and log["attempts"] == 4 and log["response_code"] == 503
        assert len(receiver.snapshot()) == 4
        gaps = [b.at - a.at for a, b in zip(receiver.snapshot(), receiver.snapshot()[1:], strict=False)]
        assert gaps[0] >= 0.2 and gaps[2] >= 0.8, f"no backoff between attempts: {gaps}"
    finally:
        receiver.stop()


def test_an_unreachable_endpoint_is_logged_with_its_error(owner: Console) -> None:
    from tests.support import free_port

    project = owner.project("unreachable")
    made = owner.ok("POST", hooks(project["id"]), 201, json={"url": f"http://127.0.0.1:{free_port()}/x"})
    one = f"{hooks(project['id'])}/{made['id']}"
    queued = owner.ok("POST", f"{one}/test", 201)
    log = _delivered(owner, one, queued["id"])
    assert log["status"] == "failed" and log["response_code"] is None
    assert "ConnectionRefused" in log["last_error"] or "refused" in log["last_error"].lower(), log["last_error"]


def test_bodies_are_bounded(owner: Console) -> None:
    project = owner.project("bounded")
    r = owner.request("POST", hooks(project["id"]), content=b'{"url": "' + b"a" * 100_000 + b'"}')
    assert r.status_code == 413


def test_an_answer_of_any_size_is_not_read(owner: Console) -> None:
    """A receiver that answers with an endless body: the status is recorded, the body never read."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    sent = [0]

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
        try:
            while sent[0] < 50_000_000:
                conn.sendall(b"x" * 65536)
                sent[0] += 65536
        except OSError:
            pass
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    project = owner.project("endless")
    made = owner.ok("POST", hooks(project["id"]), 201,
                    json={"url": f"http://127.0.0.1:{server.getsockname()[1]}/"})
    one = f"{hooks(project['id'])}/{made['id']}"
    queued = owner.ok("POST", f"{one}/test", 201)
    log = _delivered(owner, one, queued["id"])
    assert log["status"] == "delivered" and log["response_code"] == 200
    thread.join(10)
    assert sent[0] < 50_000_000, "the gateway kept reading the answer's body"
    server.close()


def test_the_api_refuses_without_a_token(gw: Gateway) -> None:
    assert httpx.get(f"{gw.console_url}/v1/projects/proj_x/webhooks").status_code == 401
