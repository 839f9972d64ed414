"""The web console in a real browser, as the product page describes it: sign in, pick a project,
create a key, copy the secret once, revoke, archive, find it under "Show archived"."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.support import Gateway

pytestmark = pytest.mark.browser

PASSWORD = "correct horse battery"


def sign_in(page: Any, gw: Gateway, email: str, password: str = PASSWORD) -> None:
    page.goto(f"{gw.console_url}/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def test_create_copy_revoke_archive(gateway_console: Gateway, browser: Any, shot: Any) -> None:
    gw = gateway_console
    owner = gw.user("owner@example.com", password=PASSWORD)
    project = owner.project("acme")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.console_url)
    page = context.new_page()

    page.goto(f"{gw.console_url}/projects")
    assert "/login" in page.url
    shot(page, "01-sign-in")
    page.get_by_label("Email").fill("owner@example.com")
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "Wrong email or password."
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/projects"))

    page.goto(f"{gw.console_url}/")
    page.wait_for_url(re.compile(rf"/projects/{project['id']}/keys"))
    assert page.get_by_text("Inference API → Keys").first.is_visible()
    shot(page, "02-keys-empty")

    # A validation error is shown next to its field, with the API's message.
    page.get_by_label("Name", exact=True).fill("production-backend")
    page.get_by_label("Requests per minute").fill("-5")
    page.get_by_role("button", name="Create key").click()
    assert page.locator(".field.invalid .field-error").inner_text() == "Input should be greater than 0"
    shot(page, "03-create-error")

    page.get_by_label("Name", exact=True).fill("production-backend")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_label("Tokens per minute").fill("200000")
    page.get_by_label("Token budget").fill("5000000")
    page.get_by_label("Budget period").select_option("month")
    page.get_by_label("qwen3.6-27b").check()
    page.get_by_label("bge-m3").check()
    page.get_by_role("button", name="Create key").click()

    dialog = page.get_by_role("dialog")
    assert "only time" in dialog.inner_text()
    secret = dialog.get_by_label("Secret").input_value()
    assert secret.startswith("qgk_") and len(secret) >= 40
    shot(page, "04-secret-once")
    dialog.get_by_role("button", name="Copy").click()
    page.wait_for_function("document.querySelector('[data-copied]').textContent.length > 0")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    dialog.get_by_role("link", name="Done").click()

    # Afterwards only the masked prefix: the secret is nowhere on the page.
    row = page.locator("tr", has_text="production-backend")
    assert "600 rpm, 200k tpm, 5M tokens / month" in row.inner_text()
    assert secret[:8] + "…" in row.inner_text()
    assert secret not in page.content()
    shot(page, "05-keys-list")

    # The key works against the API (the console lists it as active) ...
    key_id = row.get_attribute("data-key-id")
    assert owner.ok("GET", f"/v1/inference/keys/{key_id}")["status"] == "active"

    # Revoke, with a confirmation naming the key.
    row.get_by_role("button", name="Revoke").click()
    confirm = page.get_by_role("dialog")
    assert "production-backend" in confirm.inner_text()
    shot(page, "06-revoke-confirm")
    with page.expect_navigation():
        confirm.get_by_role("button", name="Revoke").click()
    assert owner.ok("GET", f"/v1/inference/keys/{key_id}")["status"] == "revoked"
    row = page.locator("tr", has_text="production-backend")
    assert "revoked" in row.inner_text()

    with page.expect_navigation():
        row.get_by_role("button", name="Archive").click()
    assert page.locator("tr", has_text="production-backend").count() == 0
    page.get_by_label("Show archived").check()
    page.wait_for_url(re.compile(r"archived=1"))
    row = page.locator("tr", has_text="production-backend")
    assert "archived" in row.inner_text()
    shot(page, "07-show-archived")
    with page.expect_navigation():
        row.get_by_role("button", name="Unarchive").click()
    assert owner.ok("GET", f"/v1/inference/keys/{key_id}")["archived"] is False

    # Phone-sized viewport: the page still renders its table and form.
    page.set_viewport_size({"width": 390, "height": 844})
    for path in (f"/projects/{project['id']}/keys", "/tokens", f"/keys/{key_id}"):
        page.goto(gw.console_url + path)
        # Nothing sticks out sideways: wide tables scroll inside their own box.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    shot(page, "08-phone")
    context.close()


def test_viewer_sees_no_write_buttons_and_server_refuses(gateway_console: Gateway, browser: Any, shot: Any) -> None:
    gw = gateway_console
    owner = gw.user("owner@example.com", password=PASSWORD)
    viewer = gw.user("viewer@example.com", password=PASSWORD)
    project = owner.project("acme")
    key = owner.mint(project["id"], name="backend")
    owner.ok("POST", f"/v1/projects/{project['id']}/members", 201, json={"email": "viewer@example.com",
                                                                          "role": "viewer"})
    viewer.join(project["id"])
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, gw, "viewer@example.com")
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    assert page.locator("tr", has_text="backend").is_visible()
    assert page.get_by_role("button", name="Revoke").count() == 0
    assert page.get_by_role("button", name="Create key").count() == 0
    shot(page, "viewer")
    # A forged form post with the viewer's own valid CSRF token is still refused by the server.
    csrf = page.locator("form.signout input[name=csrf]").input_value()
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    r = httpx.post(f"{gw.console_url}/keys/{key['id']}/revoke", data={"csrf": csrf}, cookies=cookies)
    assert r.status_code == 403
    assert owner.ok("GET", f"/v1/inference/keys/{key['id']}")["status"] == "active"
    context.close()


def test_csrf_and_session_cookie(gateway_console: Gateway, browser: Any) -> None:
    gw = gateway_console
    owner = gw.user("owner@example.com", password=PASSWORD)
    project = owner.project("acme")
    key = owner.mint(project["id"], name="backend")
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, gw, "owner@example.com")
    page.wait_for_url(re.compile(r"/projects/"))
    cookie = next(c for c in context.cookies() if c["name"] == "qg_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == ""  # not readable by scripts
    # A post without the CSRF token (as another site would send) changes nothing.
    r = httpx.post(f"{gw.console_url}/keys/{key['id']}/revoke", data={}, cookies={"qg_session": cookie["value"]})
    assert r.status_code == 403
    assert owner.ok("GET", f"/v1/inference/keys/{key['id']}")["status"] == "active"
    # Signing out ends the session for good.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/login"))
    r = httpx.get(f"{gw.console_url}/projects", cookies={"qg_session": cookie["value"]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    context.close()


def test_sign_in_is_throttled(gateway_console: Gateway) -> None:
    gw = gateway_console
    gw.user("owner@example.com", password=PASSWORD)
    statuses = []
    for _ in range(7):
        r = httpx.post(f"{gw.console_url}/login", data={"email": "owner@example.com", "password": "nope"})
        statuses.append(r.status_code)
    assert statuses[:5] == [401] * 5
    assert statuses[5:] == [429, 429]
    # Even the right password waits out the throttle.
    r = httpx.post(f"{gw.console_url}/login", data={"email": "owner@example.com", "password": PASSWORD})
    assert r.status_code == 429 and "Too many failed attempts" in r.text


def test_a_long_key_list_comes_in_pages(gateway_console: Gateway, browser: Any) -> None:
    gw = gateway_console
    owner = gw.user("owner@example.com", password=PASSWORD)
    project = owner.project("acme")
    for i in range(103):
        owner.mint(project["id"], name=f"key-{i:03d}")
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, gw, "owner@example.com")
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    rows = page.locator("table.keys tbody tr[data-key-id]")
    assert rows.count() == 100
    assert rows.first.inner_text().startswith("key-102")  # newest first
    assert page.get_by_role("link", name="← Newest keys").count() == 0
    page.get_by_role("link", name="Older keys →").click()
    page.wait_for_url(re.compile(r"before="))
    assert [rows.nth(i).inner_text().split()[0] for i in range(rows.count())] == ["key-002", "key-001", "key-000"]
    assert page.get_by_role("link", name="Older keys →").count() == 0
    page.get_by_role("link", name="← Newest keys").click()
    page.wait_for_url(f"{gw.console_url}/projects/{project['id']}/keys")  # not the old page, half gone
    assert rows.count() == 100
    # A cursor that is not a key of this project: a clear error, not a 500.
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    r = httpx.get(f"{gw.console_url}/projects/{project['id']}/keys?before=key_nope", cookies=cookies)
    assert r.status_code == 400 and "no key" in r.text
    context.close()


def test_an_invited_user_accepts_or_declines_in_the_console(gateway_console: Gateway, browser: Any,
                                                             shot: Any) -> None:
    gw = gateway_console
    owner = gw.user("inviter@example.com", password=PASSWORD)
    gw.user("invitee@example.com", password=PASSWORD)
    wanted, unwanted = owner.project("wanted"), owner.project("unwanted")
    for project in (wanted, unwanted):
        owner.ok("POST", f"/v1/projects/{project['id']}/members", 201,
                 json={"email": "invitee@example.com", "role": "member"})
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    sign_in(page, gw, "invitee@example.com")
    page.wait_for_url(re.compile(r"/projects$"))  # invitations waiting: the projects page, not a project
    invitations = page.get_by_role("region", name="Invitations")
    assert invitations.get_by_text("wanted", exact=True).is_visible()
    shot(page, "invitations")
    row = invitations.locator("li", has_text="unwanted")
    row.get_by_role("button", name="Decline").click()
    page.wait_for_url(re.compile(r"/projects$"))
    assert page.get_by_role("region", name="Invitations").locator("li").count() == 1
    page.get_by_role("region", name="Invitations").get_by_role("button", name="Accept").click()
    page.wait_for_url(re.compile(rf"/projects/{wanted['id']}/keys"))
    assert page.get_by_role("button", name="Create key").count() == 1  # a member: may create keys
    members = {m["email"]: m["status"] for m in owner.ok("GET", f"/v1/projects/{wanted['id']}/members")["data"]}
    assert members["invitee@example.com"] == "active"
    assert "invitee@example.com" not in [m["email"] for m in
                                         owner.ok("GET", f"/v1/projects/{unwanted['id']}/members")["data"]]
