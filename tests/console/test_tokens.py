"""Access tokens: created (shown once), listed, revoked (at once); and what a bad token hears."""

from __future__ import annotations

import httpx
import pytest

from quotagate.keys import secrets
from tests.support import Console, Gateway


def client(server: Gateway, token: str | None = None, scheme: str = "Bearer") -> httpx.Client:
    headers = {"Authorization": f"{scheme} {token}".encode()} if token is not None else {}
    return httpx.Client(base_url=server.console_url, headers=headers)


def test_tokens_are_shown_once_listed_masked_and_revocable(server: Gateway, alice: Console) -> None:
    created = alice.ok("POST", "/v1/me/access-tokens", 201, json={"name": "ci"})
    token = created["token"]
    assert created["object"] == "access_token" and created["id"].startswith("tok_") and created["name"] == "ci"
    assert token.startswith("qgt_") and secrets.is_well_formed(token, secrets.ACCESS_TOKEN_KIND)
    assert created["prefix"].endswith("…") and token.startswith(created["prefix"][:-1])
    assert created["status"] == "active"
    second = client(server, token)
    assert second.get("/v1/me").json()["email"] == alice.ok("GET", "/v1/me")["email"]
    listed = alice.request("GET", "/v1/me/access-tokens")
    assert token not in listed.text
    by_id = {t["id"]: t for t in listed.json()["data"]}
    assert created["id"] in by_id and "token" not in by_id[created["id"]]
    assert by_id[created["id"]]["last_used_at"] is not None  # it was just used
    # Revoke it with the other token: it stops working at once.
    revoked = alice.ok("DELETE", f"/v1/me/access-tokens/{created['id']}")
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
    r = second.get("/v1/me")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    assert alice.ok("DELETE", f"/v1/me/access-tokens/{created['id']}")["revoked_at"] == revoked["revoked_at"]


def test_a_token_can_revoke_itself(server: Gateway, alice: Console) -> None:
    created = alice.ok("POST", "/v1/me/access-tokens", 201, json={})
    assert created["name"] == "console"
    c = client(server, created["token"])
    assert c.delete(f"/v1/me/access-tokens/{created['id']}").status_code == 200
    assert c.get("/v1/me").status_code == 401


def test_other_users_tokens_are_not_found(alice: Console, bob: Console) -> None:
    bobs = bob.ok("POST", "/v1/me/access-tokens", 201, json={"name": "bob's"})
    r = alice.request("DELETE", f"/v1/me/access-tokens/{bobs['id']}")
    assert r.status_code == 404
    assert bobs["id"] not in alice.request("GET", "/v1/me/access-tokens").text
    assert bob.ok("GET", "/v1/me/access-tokens")["data"][0]["status"] == "active"


@pytest.mark.parametrize(("body", "field"), [({"name": ""}, "name"), ({"name": 3}, "name"),
                                             ({"name": "x", "scopes": ["all"]}, "scopes")])
def test_token_validation(alice: Console, body: dict[str, object], field: str) -> None:
    r = alice.request("POST", "/v1/me/access-tokens", json=body)
    assert r.status_code == 400 and r.json()["error"]["field"] == field


def _typo(token: str) -> str:
    i = 10
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]


def test_bad_tokens_get_401_in_the_console_error_shape(server: Gateway, alice: Console) -> None:
    made_up = secrets.generate(secrets.ACCESS_TOKEN_KIND)  # well formed, never issued
    key_shaped = secrets.generate(secrets.INFERENCE_KEY_KIND)  # an inference key is not an access token
    cases = {
        "no header": client(server),
        "bare scheme": httpx.Client(base_url=server.console_url, headers={"Authorization": "Bearer"}),
        "basic scheme": client(server, alice.token, scheme="Basic"),
        "garbage": client(server, "hello"),
        "typo": client(server, _typo(alice.token)),
        "truncated": client(server, alice.token[:-1]),
        "masked prefix": client(server, alice.token[:8] + "…"),
        "prefix alone": client(server, alice.token[:8]),
        "unknown": client(server, made_up),
        "inference key": client(server, key_shaped),
    }
    for name, c in cases.items():
        for method, path in (("GET", "/v1/projects"), ("POST", "/v1/projects"), ("GET", "/v1/me"),
                             ("DELETE", "/v1/inference/keys/key_x"), ("GET", "/v1/projects/proj_x/audit-log")):
            r = c.request(method, path, json={"name": "x"} if method == "POST" else None)
            assert r.status_code == 401, (name, method, path, r.text)
            body = r.json()
            assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
            assert body["error"]["code"] == "unauthenticated" and body["error"]["message"]
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert client(server, alice.token).get("/v1/me").status_code == 200


def test_unknown_endpoints_and_methods_answer_in_the_error_shape(alice: Console) -> None:
    r = alice.request("GET", "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = alice.request("PUT", "/v1/projects")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD", "POST"}  # RFC 9110


def test_head_is_answered_like_get(alice: Console) -> None:
    r = alice.request("HEAD", "/v1/projects")
    assert r.status_code == 200 and r.content == b""
    assert alice.request("HEAD", "/v1/inference/keys/key_nothere").status_code == 404
