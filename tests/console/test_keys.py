"""The inference-key lifecycle over the console API: mint, list, get, edit, revoke, archive, expiry."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from quotagate.keys import secrets
from tests.support import Console

# The product page's request body, byte for byte (seed/console-inference-keys.txt).
PRODUCT_PAGE_BODY = """{
    "name": "production-backend",
    "rpm": 600,
    "tpm": 200000,
    "token_limit": 5000000,
    "token_limit_period": "month",
    "allowed_models": ["qwen3.6-27b", "bge-m3"]
  }"""

KEY_FIELDS = {"id", "object", "project_id", "name", "prefix", "rpm", "tpm", "token_limit", "token_limit_period",
              "allowed_models", "expires_at", "status", "archived", "created_at", "revoked_at", "last_used_at"}


def future(seconds: int = 3600) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


@pytest.fixture
def project(alice: Console) -> dict[str, Any]:
    return alice.project("keys-test")


def keys_url(project: dict[str, Any]) -> str:
    return f"/v1/projects/{project['id']}/inference/keys"


def test_product_page_request_mints_a_key_and_shows_the_secret_once(alice: Console, project: dict[str, Any]) -> None:
    r = alice.request("POST", keys_url(project), content=PRODUCT_PAGE_BODY,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    key = r.json()
    assert set(key) >= KEY_FIELDS
    assert key["object"] == "inference_key" and key["id"].startswith("key_")
    assert key["project_id"] == project["id"]
    assert key["name"] == "production-backend"
    assert (key["rpm"], key["tpm"], key["token_limit"], key["token_limit_period"]) == (600, 200000, 5000000, "month")
    assert key["allowed_models"] == ["qwen3.6-27b", "bge-m3"]
    assert key["status"] == "active" and key["archived"] is False
    assert key["expires_at"] is None and key["revoked_at"] is None and key["last_used_at"] is None
    secret = key["secret"]
    assert secret.startswith("qgk_") and secrets.is_well_formed(secret, secrets.INFERENCE_KEY_KIND)
    # The masked prefix: recognisable, the start of the secret, an ellipsis; never usable as a key.
    prefix = key["prefix"]
    assert prefix.startswith("qgk_") and prefix.endswith("…") and len(prefix) == len("qgk_xxxx…")
    assert secret.startswith(prefix[:-1])
    assert not secrets.is_well_formed(prefix, secrets.INFERENCE_KEY_KIND)
    assert not secrets.is_well_formed(prefix[:-1], secrets.INFERENCE_KEY_KIND)
    # Never again: not on get, not in the list, not in the audit log.
    got = alice.request("GET", f"/v1/inference/keys/{key['id']}")
    assert got.status_code == 200 and "secret" not in got.json() and secret not in got.text
    assert got.json() == {k: v for k, v in key.items() if k != "secret"}
    listed = alice.request("GET", keys_url(project))
    assert secret not in listed.text and all("secret" not in k for k in listed.json()["data"])
    assert secret not in alice.request("GET", f"/v1/projects/{project['id']}/audit-log").text


def test_every_limit_is_optional(alice: Console, project: dict[str, Any]) -> None:
    key = alice.mint(project["id"], name="unlimited")
    assert [key[f] for f in ("rpm", "tpm", "token_limit", "token_limit_period", "allowed_models", "expires_at")] == \
        [None] * 6
    # Explicit nulls mean the same as absent fields.
    key = alice.mint(project["id"], name="nulls", rpm=None, tpm=None, token_limit=None, token_limit_period=None,
                     allowed_models=None, expires_at=None)
    assert key["rpm"] is None and key["allowed_models"] is None


def test_each_secret_is_unique_and_well_formed(alice: Console, project: dict[str, Any]) -> None:
    minted = [alice.mint(project["id"], name=f"k{i}") for i in range(5)]
    assert len({k["secret"] for k in minted}) == 5
    assert len({k["id"] for k in minted}) == 5


@pytest.mark.parametrize(("body", "field"), [
    ({"rpm": 0}, "rpm"),
    ({"rpm": -5}, "rpm"),
    ({"rpm": 1.5}, "rpm"),
    ({"rpm": 10.0}, "rpm"),
    ({"rpm": "600"}, "rpm"),
    ({"rpm": True}, "rpm"),
    ({"rpm": [1]}, "rpm"),
    ({"rpm": 2**64}, "rpm"),
    ({"tpm": 0}, "tpm"),
    ({"tpm": "lots"}, "tpm"),
    ({"tpm": False}, "tpm"),
    ({"token_limit": 0, "token_limit_period": "day"}, "token_limit"),
    ({"token_limit": "5", "token_limit_period": "day"}, "token_limit"),
    ({"token_limit": True, "token_limit_period": "day"}, "token_limit"),
    ({"token_limit": 1000}, "token_limit_period"),
    ({"token_limit_period": "month"}, "token_limit"),
    ({"token_limit": 1000, "token_limit_period": "year"}, "token_limit_period"),
    ({"token_limit": 1000, "token_limit_period": "Month"}, "token_limit_period"),
    ({"token_limit": 1000, "token_limit_period": 30}, "token_limit_period"),
    ({"allowed_models": []}, "allowed_models"),
    ({"allowed_models": ["gpt-4o"]}, "allowed_models"),
    ({"allowed_models": ["qwen3.6-27b", "nope"]}, "allowed_models"),
    ({"allowed_models": "qwen3.6-27b"}, "allowed_models"),
    ({"allowed_models": [""]}, "allowed_models"),
    ({"allowed_models": [42]}, "allowed_models"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_at": "2099-01-01T00:00:00"}, "expires_at"),
    ({"expires_at": "next tuesday"}, "expires_at"),
    ({"expires_at": "2099-13-45T00:00:00Z"}, "expires_at"),
    ({"expires_at": True}, "expires_at"),
    ({"expires_at": 1e300}, "expires_at"),
    ({"expires_at": "0001-01-01T00:00:00+01:00"}, "expires_at"),
    ({"expires_at": {"at": "2099-01-01T00:00:00Z"}}, "expires_at"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": None}, "name"),
    ({"name": 7}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": "nul\u0000byte"}, "name"),
    ({"colour": "blue"}, "colour"),
    ({"secret": "qgk_chosen-by-me"}, "secret"),
])
def test_mint_validation_names_the_field(alice: Console, project: dict[str, Any], body: dict[str, Any],
                                         field: str) -> None:
    payload = {"name": "bad", **body}
    r = alice.request("POST", keys_url(project), json=payload)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert field in error["message"]
    # Nothing half-written: the refused key does not exist.
    assert alice.ok("GET", keys_url(project) + "?include_archived=true")["data"] == []


def test_name_is_required(alice: Console, project: dict[str, Any]) -> None:
    r = alice.request("POST", keys_url(project), json={"rpm": 5})
    assert r.status_code == 400 and r.json()["error"]["field"] == "name"


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"name": "x",', "JSON"),
    (b"not json at all", "JSON"),
    (b'["name", "x"]', "object"),
    (b'"a string"', "object"),
    (b"42", "object"),
    (b"null", "object"),
    (b"\xff\xfe\x00garbage", "JSON"),
])
def test_wrong_json_or_a_non_object_body_is_400(alice: Console, project: dict[str, Any], content: bytes,
                                                needle: str) -> None:
    r = alice.request("POST", keys_url(project), content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request" and needle in r.json()["error"]["message"]


def test_oversized_body_is_413(alice: Console, project: dict[str, Any]) -> None:
    big = {"name": "big", "allowed_models": ["qwen3.6-27b"] * 10_000}
    r = alice.request("POST", keys_url(project), json=big)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Any:  # no Content-Length: refused while streaming in
        yield b'{"name": "big", "pad": "'
        for _ in range(200):
            yield b"x" * 1024
        yield b'"}'

    r = alice.request("POST", keys_url(project), content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert alice.ok("GET", keys_url(project))["data"] == []


def test_models_outside_the_projects_are_refused(alice: Console) -> None:
    narrow = alice.project("narrow", models=["qwen3.6-27b"])
    assert narrow["models"] == ["qwen3.6-27b"]
    r = alice.request("POST", keys_url(narrow), json={"name": "k", "allowed_models": ["bge-m3"]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "allowed_models"
    assert "bge-m3" in r.json()["error"]["message"]
    key = alice.mint(narrow["id"], allowed_models=["qwen3.6-27b"])
    r = alice.request("PATCH", f"/v1/inference/keys/{key['id']}", json={"allowed_models": ["llama-3.1-8b"]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "allowed_models"


def test_project_models_can_be_narrowed_and_widened(alice: Console, project: dict[str, Any]) -> None:
    pid = project["id"]
    assert project["models"] is None  # every model of the catalog
    assert alice.mint(pid, allowed_models=["llama-3.1-8b"])["allowed_models"] == ["llama-3.1-8b"]
    narrowed = alice.ok("PATCH", f"/v1/projects/{pid}", json={"models": ["qwen3.6-27b", "bge-m3"]})
    assert narrowed["models"] == ["qwen3.6-27b", "bge-m3"]
    assert alice.ok("GET", f"/v1/projects/{pid}")["models"] == ["qwen3.6-27b", "bge-m3"]
    r = alice.request("POST", keys_url(project), json={"name": "k", "allowed_models": ["llama-3.1-8b"]})
    assert r.status_code == 400
    for bad, field in (({"models": []}, "models"), ({"models": ["gpt-4o"]}, "models"), ({"models": "x"}, "models"),
                       ({"name": ""}, "name"), ({"name": None}, "name"), ({"owner": "me"}, "owner")):
        r = alice.request("PATCH", f"/v1/projects/{pid}", json=bad)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (bad, r.text)
    widened = alice.ok("PATCH", f"/v1/projects/{pid}", json={"models": None, "name": "renamed"})
    assert widened["models"] is None and widened["name"] == "renamed"
    alice.mint(pid, allowed_models=["llama-3.1-8b"])


def test_list_is_newest_first_and_hides_archived(alice: Console, project: dict[str, Any]) -> None:
    ids = [alice.mint(project["id"], name=f"k{i}")["id"] for i in range(4)]
    listed = alice.ok("GET", keys_url(project))
    assert listed["object"] == "list"
    assert [k["id"] for k in listed["data"]] == ids[::-1]
    assert all(k["prefix"].endswith("…") and "secret" not in k for k in listed["data"])
    alice.ok("DELETE", f"/v1/inference/keys/{ids[1]}")
    alice.ok("POST", f"/v1/inference/keys/{ids[1]}/archive")
    assert [k["id"] for k in alice.ok("GET", keys_url(project))["data"]] == [ids[3], ids[2], ids[0]]
    assert [k["id"] for k in alice.ok("GET", keys_url(project) + "?include_archived=false")["data"]] == \
        [ids[3], ids[2], ids[0]]
    everything = alice.ok("GET", keys_url(project) + "?include_archived=true")["data"]
    assert [k["id"] for k in everything] == ids[::-1]
    assert [k["archived"] for k in everything] == [False, False, True, False]
    r = alice.request("GET", keys_url(project) + "?include_archived=maybe")
    assert r.status_code == 400 and r.json()["error"]["field"] == "include_archived"


def test_patch_changes_only_what_is_given(alice: Console, project: dict[str, Any]) -> None:
    key = alice.request("POST", keys_url(project), content=PRODUCT_PAGE_BODY).json()
    url = f"/v1/inference/keys/{key['id']}"
    edited = alice.ok("PATCH", url, json={"rpm": 100})
    assert edited["rpm"] == 100 and edited["tpm"] == 200000 and edited["token_limit"] == 5000000
    assert edited["id"] == key["id"] and edited["prefix"] == key["prefix"] and "secret" not in edited
    expiry = future(7200)
    edited = alice.ok("PATCH", url, json={"name": "renamed", "expires_at": expiry, "allowed_models": ["bge-m3"]})
    assert edited["name"] == "renamed" and parse(edited["expires_at"]) == parse(expiry)
    assert edited["allowed_models"] == ["bge-m3"] and edited["rpm"] == 100
    # null clears a limit, the expiry, the model list
    edited = alice.ok("PATCH", url, json={"rpm": None, "expires_at": None, "allowed_models": None})
    assert edited["rpm"] is None and edited["expires_at"] is None and edited["allowed_models"] is None
    assert edited["tpm"] == 200000
    # clearing token_limit clears its period
    edited = alice.ok("PATCH", url, json={"token_limit": None})
    assert edited["token_limit"] is None and edited["token_limit_period"] is None
    # a budget needs both halves
    r = alice.request("PATCH", url, json={"token_limit": 10})
    assert r.status_code == 400 and r.json()["error"]["field"] == "token_limit_period"
    r = alice.request("PATCH", url, json={"token_limit_period": "day"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "token_limit"
    edited = alice.ok("PATCH", url, json={"token_limit": 10, "token_limit_period": "week"})
    assert (edited["token_limit"], edited["token_limit_period"]) == (10, "week")
    edited = alice.ok("PATCH", url, json={"token_limit_period": "hour"})
    assert (edited["token_limit"], edited["token_limit_period"]) == (10, "hour")
    r = alice.request("PATCH", url, json={"token_limit_period": None})
    assert r.status_code == 400 and r.json()["error"]["field"] == "token_limit_period"
    assert alice.ok("GET", url)["token_limit"] == 10  # the refused edit left nothing behind


@pytest.mark.parametrize(("body", "field"), [
    ({"rpm": 0}, "rpm"), ({"tpm": "1"}, "tpm"), ({"rpm": False}, "rpm"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"), ({"expires_at": "2099-01-01"}, "expires_at"),
    ({"allowed_models": []}, "allowed_models"), ({"allowed_models": ["nope"]}, "allowed_models"),
    ({"name": None}, "name"), ({"name": "  "}, "name"), ({"status": "active"}, "status"),
    ({"id": "key_other"}, "id"), ({"secret": "x"}, "secret"),
])
def test_patch_validation_names_the_field(alice: Console, project: dict[str, Any], body: dict[str, Any],
                                          field: str) -> None:
    key = alice.mint(project["id"], rpm=5)
    r = alice.request("PATCH", f"/v1/inference/keys/{key['id']}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
    assert alice.ok("GET", f"/v1/inference/keys/{key['id']}")["rpm"] == 5


def test_empty_patch_is_400(alice: Console, project: dict[str, Any]) -> None:
    key = alice.mint(project["id"])
    for body in ({}, None):
        r = alice.request("PATCH", f"/v1/inference/keys/{key['id']}", json=body)
        assert r.status_code == 400, r.text
    r = alice.request("PATCH", f"/v1/inference/keys/{key['id']}", content=b"[]")
    assert r.status_code == 400


def test_revoke_is_immediate_idempotent_and_final(alice: Console, project: dict[str, Any]) -> None:
    key = alice.mint(project["id"], rpm=5)
    url = f"/v1/inference/keys/{key['id']}"
    revoked = alice.ok("DELETE", url)
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None and revoked["id"] == key["id"]
    again = alice.ok("DELETE", url)
    assert again["status"] == "revoked" and again["revoked_at"] == revoked["revoked_at"]
    assert alice.ok("GET", url)["status"] == "revoked"
    # Nothing revives it: not an edit, not an expiry, not archive + unarchive.
    for body in ({"rpm": 10}, {"expires_at": future()}, {"expires_at": None}, {"name": "alive"}):
        r = alice.request("PATCH", url, json=body)
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict", r.text
    alice.ok("POST", f"{url}/archive")
    unarchived = alice.ok("POST", f"{url}/unarchive")
    assert unarchived["status"] == "revoked" and unarchived["archived"] is False
    r = alice.request("POST", f"{url}/rotate", json={})
    assert r.status_code == 409
    final = alice.ok("GET", url)
    assert final["status"] == "revoked" and final["rpm"] == 5 and final["revoked_at"] == revoked["revoked_at"]


def test_archive_only_revoked_or_expired_keys(alice: Console, project: dict[str, Any]) -> None:
    key = alice.mint(project["id"])
    url = f"/v1/inference/keys/{key['id']}"
    r = alice.request("POST", f"{url}/archive")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    r = alice.request("POST", f"{url}/unarchive")
    assert r.status_code == 409
    assert alice.ok("GET", url)["archived"] is False
    alice.ok("DELETE", url)
    archived = alice.ok("POST", f"{url}/archive")
    assert archived["archived"] is True and archived["status"] == "revoked"
    assert alice.ok("POST", f"{url}/archive")["archived"] is True  # repeating is harmless
    assert alice.ok("GET", url)["archived"] is True  # an archived key is still readable by id
    r = alice.request("PATCH", url, json={"name": "x"})
    assert r.status_code == 409
    assert alice.ok("POST", f"{url}/unarchive")["archived"] is False
    assert alice.ok("POST", f"{url}/unarchive")["archived"] is False


def test_status_expired_is_derived_from_expires_at(alice: Console, project: dict[str, Any]) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2)
    key = alice.mint(project["id"], expires_at=expires.isoformat())
    url = f"/v1/inference/keys/{key['id']}"
    assert key["status"] == "active"
    assert abs(parse(key["expires_at"]) - expires) < timedelta(milliseconds=1)
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)
    got = alice.ok("GET", url)
    assert got["status"] == "expired" and got["revoked_at"] is None
    assert alice.ok("GET", keys_url(project))["data"][0]["status"] == "expired"
    r = alice.request("POST", f"{url}/rotate", json={})
    assert r.status_code == 409
    archived = alice.ok("POST", f"{url}/archive")
    assert archived["archived"] is True and archived["status"] == "expired"
    assert key["id"] not in [k["id"] for k in alice.ok("GET", keys_url(project))["data"]]
    alice.ok("POST", f"{url}/unarchive")
    # An expired key may be given a new expiry (unlike a revoked one, it was never cut off for good).
    assert alice.ok("PATCH", url, json={"expires_at": future()})["status"] == "active"
    assert alice.ok("DELETE", url)["status"] == "revoked"


def test_expires_at_accepts_offsets_and_reports_utc(alice: Console, project: dict[str, Any]) -> None:
    key = alice.mint(project["id"], expires_at="2099-06-01T12:00:00+02:00")
    assert key["expires_at"] == "2099-06-01T10:00:00Z"
    key = alice.mint(project["id"], expires_at="2099-06-01T12:00:00.123456Z")
    assert key["expires_at"] == "2099-06-01T12:00:00.123456Z"
    created = parse(key["created_at"])
    assert created.tzinfo is not None and abs(created - datetime.now(UTC)) < timedelta(minutes=5)


def test_unknown_key_and_malformed_ids_are_404(alice: Console) -> None:
    for path in ("/v1/inference/keys/key_doesnotexist", "/v1/inference/keys/%00", "/v1/inference/keys/a%27b",
                 "/v1/inference/keys/" + "k" * 300, "/v1/projects/proj_nope/inference/keys"):
        r = alice.request("GET", path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    for method in ("PATCH", "DELETE"):
        r = alice.request(method, "/v1/inference/keys/key_doesnotexist", json={"rpm": 1})
        assert r.status_code == 404


def test_a_second_client_sees_the_same_state(alice: Console, project: dict[str, Any]) -> None:
    """The console API is plain request/response over the store: a fresh connection sees every write."""
    key = alice.mint(project["id"])
    fresh = httpx.Client(base_url=str(alice.http.base_url), headers={"Authorization": f"Bearer {alice.token}"})
    alice.ok("DELETE", f"/v1/inference/keys/{key['id']}")
    assert fresh.get(f"/v1/inference/keys/{key['id']}").json()["status"] == "revoked"


def test_list_pages_with_limit_and_before(alice: Console, bob: Console, project: dict[str, Any]) -> None:
    ids = [alice.mint(project["id"], name=f"k{i}")["id"] for i in range(5)][::-1]  # newest first
    path = f"/v1/projects/{project['id']}/inference/keys"
    everything = alice.ok("GET", path)
    assert [k["id"] for k in everything["data"]] == ids and everything["has_more"] is False
    assert everything["next_cursor"] is None
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = alice.ok("GET", path, params=params)
        assert len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            break
        assert page["next_cursor"] == page["data"][-1]["id"]
        params["before"] = page["next_cursor"]
    assert seen == ids, "pages must add up to the whole list, in order, with nothing twice"
    assert alice.ok("GET", path, params={"limit": 2, "starting_after": ids[1]})["data"][0]["id"] == ids[2]
    for bad in ({"limit": "0"}, {"limit": "1001"}, {"limit": "two"}, {"limit": "-1"}, {"limit": "²"}):
        r = alice.request("GET", path, params=bad)
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"], (bad, r.text)
    r = alice.request("GET", path, params={"after": ids[0]})  # not a parameter here: said, not ignored
    assert r.status_code == 400 and "after" in r.json()["error"]["message"], r.text
    elsewhere = bob.project("other")["id"]
    stranger = bob.mint(elsewhere)["id"]
    for cursor in ("key_doesnotexist", stranger):  # another project's key is no cursor here, and says nothing
        r = alice.request("GET", path, params={"before": cursor})
        assert r.status_code == 400 and "before" in r.json()["error"]["message"], r.text
