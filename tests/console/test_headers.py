"""Security headers on every answer of the console listener: the JSON API, the web console, Starlette's
own 404s and redirects, static files (issue 13)."""

from __future__ import annotations

import httpx

from quotagate.web import charts
from tests.support import Console, Gateway


def assert_secure(r: httpx.Response, *, cached_ok: bool = False) -> None:
    assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, dict(r.headers))
    assert r.headers.get("x-frame-options") == "DENY"
    csp = r.headers.get("content-security-policy", "")
    assert "form-action 'self'" in csp and "base-uri 'none'" in csp and "frame-ancestors 'none'" in csp, csp
    if not cached_ok:
        assert r.headers.get("cache-control") == "no-store", (r.request.url, dict(r.headers))


def test_starlettes_own_404s_405s_and_redirects_carry_the_headers(server: Gateway) -> None:
    with httpx.Client(base_url=server.console_url, follow_redirects=False) as http:
        for r in (http.get("/no/such/page"), http.get("/v1/nothing-here"), http.request("PUT", "/login"),
                  http.get("/"), http.get("/projects"), http.get("/login"), http.get("/healthz")):
            assert r.status_code in (200, 303, 404, 405), r
            assert_secure(r)
        assert http.get("/").headers["location"].startswith("/login")


def test_answers_carrying_a_secret_are_never_stored(alice: Console) -> None:
    project = alice.project("headers")
    minted = alice.request("POST", f"/v1/projects/{project['id']}/inference/keys", json={"name": "k"})
    assert minted.status_code == 201 and "secret" in minted.json()
    assert_secure(minted)
    rotated = alice.request("POST", f"/v1/inference/keys/{minted.json()['id']}/rotate", json={})
    assert rotated.status_code == 201 and "secret" in rotated.json()
    assert_secure(rotated)
    token = alice.request("POST", "/v1/me/access-tokens", json={"name": "ci"})
    assert token.status_code == 201 and "token" in token.json()
    assert_secure(token)
    denied = alice.request("GET", "/v1/me", headers={"Authorization": "Bearer nope"})
    assert denied.status_code == 401
    assert_secure(denied)


def test_static_files_are_not_sniffed_but_may_be_cached(server: Gateway) -> None:
    r = httpx.get(f"{server.console_url}/static/app.css")
    assert r.status_code == 200
    assert_secure(r, cached_ok=True)
    assert r.headers.get("cache-control") != "no-store"


def test_the_budget_gauge_needs_no_inline_style() -> None:
    """The CSP refuses inline styles; the gauge used one and was always drawn full."""
    gauge = charts.meter_bar(250, 1000, label="Budget used this month")
    assert "style=" not in gauge
    assert 'width="25.0"' in gauge
