"""A key's ``allowed_networks`` (requests from elsewhere get 403 ``network_not_allowed``) and ``metadata``
(the operator's tags), CONTRACT §6; the client's address taken from X-Forwarded-For of a trusted proxy."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import Mint
from tests.gateway.helpers import hi
from tests.support import Console, Gateway


def chat(gw: Gateway, secret: str, client: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"}
    if client is not None:
        headers["X-Forwarded-For"] = client  # the tests' peer is loopback: a trusted proxy by default
    return httpx.post(f"{gw.llm_url}/chat/completions", headers=headers,
                      json={"model": "chat", "messages": hi(), "max_tokens": 1})


def test_a_key_is_used_only_from_its_networks(gw: Gateway, mint: Mint, admin: Console) -> None:
    secret, key = mint(allowed_networks=["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"], metadata={"team": "search"})
    assert key["allowed_networks"] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
    assert key["metadata"] == {"team": "search"}
    for client in ("10.1.2.3", "2001:db8::5", "192.0.2.7", "198.51.100.1, 10.9.9.9"):
        assert chat(gw, secret, client).status_code == 200, client
    for client in ("192.168.1.1", "192.0.2.8", "2001:db9::1", "10.1.2.3, 198.51.100.1", None):
        r = chat(gw, secret, client)
        assert r.status_code == 403, client
        assert r.json()["error"]["code"] == "network_not_allowed"
    # Cleared with PATCH: usable from anywhere on the very next request.
    admin.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"allowed_networks": None})
    assert chat(gw, secret, "192.168.1.1").status_code == 200


def test_the_activity_shows_the_forwarded_address(gw: Gateway, mint: Mint, admin: Console) -> None:
    secret, key = mint()
    assert chat(gw, secret, "203.0.113.9").status_code == 200
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    while not rows and time.monotonic() < deadline:
        rows = admin.ok("GET", f"/v1/inference/keys/{key['id']}/activity")["data"]
        time.sleep(0.05)
    assert rows[0]["client_ip"] == "203.0.113.9"


def test_rotation_keeps_networks_and_metadata(gw: Gateway, mint: Mint, admin: Console) -> None:
    _, key = mint(allowed_networks=["10.0.0.0/8"], metadata={"cost-center": "42"})
    rotated = admin.ok("POST", f"/v1/inference/keys/{key['id']}/rotate", 201, json={})
    assert rotated["allowed_networks"] == ["10.0.0.0/8"] and rotated["metadata"] == {"cost-center": "42"}
    edited = admin.ok("PATCH", f"/v1/inference/keys/{rotated['id']}", json={"metadata": {"team": "x"}})
    assert edited["metadata"] == {"team": "x"}


@pytest.mark.parametrize(("body", "needle"), [
    ({"allowed_networks": ["10.0.0.5/8"]}, "host bits set; the network is 10.0.0.0/8"),
    ({"allowed_networks": ["not-a-network"]}, "not an IP network"),
    ({"allowed_networks": []}, "allowed_networks"),
    ({"allowed_networks": [f"10.0.{i}.0/24" for i in range(65)]}, "allowed_networks"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"team": 5}}, "metadata"),
    ({"metadata": {"bad key!": "v"}}, "metadata"),
    ({"metadata": {"team": "x" * 257}}, "metadata"),
])
def test_bad_networks_and_metadata_are_refused(admin: Console, project: dict[str, Any], body: dict[str, Any],
                                               needle: str) -> None:
    r = admin.request("POST", f"/v1/projects/{project['id']}/inference/keys", json={"name": "k", **body})
    assert r.status_code == 400, r.text
    assert needle in r.text
