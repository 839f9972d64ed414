"""POST /v1/inference/keys/{keyId}/rotate: a new key with the same settings, the old one on a grace period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.console.test_keys import PRODUCT_PAGE_BODY, keys_url, parse
from tests.support import Console

SETTINGS = ("project_id", "rpm", "tpm", "token_limit", "token_limit_period", "allowed_models", "expires_at")


@pytest.fixture
def key(alice: Console) -> dict[str, Any]:
    project = alice.project("rotation")
    r = alice.request("POST", keys_url(project), content=PRODUCT_PAGE_BODY)
    assert r.status_code == 201
    result: dict[str, Any] = r.json()
    return result


def test_rotate_with_grace_keeps_the_old_key_until_it_expires(alice: Console, key: dict[str, Any]) -> None:
    before = datetime.now(UTC)
    r = alice.request("POST", f"/v1/inference/keys/{key['id']}/rotate", json={"grace_period_seconds": 3600})
    after = datetime.now(UTC)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["id"] != key["id"] and new["secret"] != key["secret"] and new["secret"].startswith("qgk_")
    assert new["prefix"] != key["prefix"] or new["secret"] != key["secret"]
    assert new["status"] == "active" and new["name"] == key["name"] and new["rotated_from"] == key["id"]
    assert {f: new[f] for f in SETTINGS} == {f: key[f] for f in SETTINGS}
    old = new["previous_key"]
    assert old["id"] == key["id"] and old["status"] == "active" and old["revoked_at"] is None
    expires = parse(old["expires_at"])
    assert before + timedelta(seconds=3600) - timedelta(seconds=1) <= expires <= after + timedelta(seconds=3601)
    assert "secret" not in old
    # The old key, as stored, says the same; the new one is first in the list.
    assert alice.ok("GET", f"/v1/inference/keys/{key['id']}")["expires_at"] == old["expires_at"]
    listed = alice.ok("GET", f"/v1/projects/{key['project_id']}/inference/keys")["data"]
    assert [k["id"] for k in listed] == [new["id"], key["id"]]
    assert alice.ok("GET", f"/v1/inference/keys/{new['id']}") == {k: v for k, v in new.items()
                                                                     if k not in ("secret", "previous_key")}


def test_rotate_without_grace_revokes_the_old_key_now(alice: Console, key: dict[str, Any]) -> None:
    for body in ({"grace_period_seconds": 0}, {}, None):
        r = alice.request("POST", f"/v1/inference/keys/{key['id']}/rotate", json=body)
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["previous_key"]["status"] == "revoked" and new["previous_key"]["revoked_at"] is not None
        assert alice.ok("GET", f"/v1/inference/keys/{key['id']}")["status"] == "revoked"
        # rotating the revoked key again is a conflict; the new key is the one to rotate next
        r = alice.request("POST", f"/v1/inference/keys/{key['id']}/rotate", json={})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        key = new


def test_rotate_can_rename_and_keeps_an_earlier_expiry(alice: Console) -> None:
    project = alice.project("rotation-expiry")
    soon = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    key = alice.mint(project["id"], name="short-lived", expires_at=soon)
    new = alice.ok("POST", f"/v1/inference/keys/{key['id']}/rotate", 201,
                   json={"grace_period_seconds": 86400, "name": "next"})
    assert new["name"] == "next" and new["expires_at"] == key["expires_at"]
    # the grace period never extends a key's life beyond its own expiry
    assert new["previous_key"]["expires_at"] == key["expires_at"]


@pytest.mark.parametrize(("body", "field"), [
    ({"grace_period_seconds": -1}, "grace_period_seconds"),
    ({"grace_period_seconds": 1.5}, "grace_period_seconds"),
    ({"grace_period_seconds": "60"}, "grace_period_seconds"),
    ({"grace_period_seconds": True}, "grace_period_seconds"),
    ({"grace_period_seconds": 10**12}, "grace_period_seconds"),
    ({"name": ""}, "name"),
    ({"rpm": 5}, "rpm"),
])
def test_rotate_validation(alice: Console, key: dict[str, Any], body: dict[str, Any], field: str) -> None:
    r = alice.request("POST", f"/v1/inference/keys/{key['id']}/rotate", json=body)
    assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
    listed = alice.ok("GET", f"/v1/projects/{key['project_id']}/inference/keys")["data"]
    assert [k["id"] for k in listed] == [key["id"]] and listed[0]["expires_at"] is None


def test_rotate_unknown_key_is_404(alice: Console) -> None:
    r = alice.request("POST", "/v1/inference/keys/key_nothere/rotate", json={})
    assert r.status_code == 404
