"""The project's Webhooks page in Debian's Chromium against one real ``quotagate serve``: add a webhook (its
secret shown once, in the dialog), "Send test event" reaches a real receiver on loopback signed with that
secret, the delivery log shows it; form errors next to their field with the input kept; a member sees the
log but no buttons; the page fits a phone."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import fresh_database
from tests.support import Gateway, free_port, start_gateway
from tests.web.test_console_browser import PASSWORD, sign_in
from tests.webhooks.conftest import FAST
from tests.webhooks.receiver import Receiver, verified

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("web-webhooks")
    config = directory / "gateway.toml"
    config.write_text(f'[[models]]\nid = "chat"\ntype = "chat"\nupstreams = ["http://127.0.0.1:{free_port()}/v1"]\n')
    with fresh_database(directory, _pg_template, "wh") as url:
        gateway = start_gateway(directory / "data", url, config, role="console", extra_env=FAST)
        try:
            yield gateway
        finally:
            gateway.stop()


def test_add_a_webhook_see_its_secret_once_and_send_a_test_event(gw: Gateway, browser: Any, shot: Any) -> None:
    receiver = Receiver(fail_first=1).start()
    try:
        owner = gw.user("owner-web@example.com", password=PASSWORD)
        project = owner.project("acme")
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        sign_in(page, gw, "owner-web@example.com")
        page.wait_for_url(re.compile(r"/projects/"))
        page.get_by_role("link", name="Webhooks").first.click()
        page.wait_for_url(re.compile(r"/webhooks$"))
        assert page.get_by_text("No webhooks yet.").is_visible()

        # A bad URL: the API's message next to the field, what was typed kept, nothing made.
        page.get_by_label("Endpoint URL").fill("ftp://example.com/hook")
        page.get_by_role("button", name="Add webhook").click()
        assert page.locator("#wh-url-error").inner_text() == "Must be an http:// or https:// URL"
        assert page.get_by_label("Endpoint URL").input_value() == "ftp://example.com/hook"
        assert owner.ok("GET", f"/v1/projects/{project['id']}/webhooks")["data"] == []

        page.get_by_label("Endpoint URL").fill(receiver.url)
        page.get_by_label("key.expiring").uncheck()
        page.get_by_label("Budget thresholds (percent)").fill("50, 90")
        page.get_by_role("button", name="Add webhook").click()
        dialog = page.locator("dialog[data-secret-dialog]")
        secret = dialog.locator("[data-secret]").input_value()
        assert secret.startswith("whsec_")
        shot(page, "secret")
        dialog.get_by_role("link", name="Done").click()
        page.reload()
        assert page.locator("dialog[data-secret-dialog]").count() == 0  # shown once
        assert secret not in page.content()
        made = owner.ok("GET", f"/v1/projects/{project['id']}/webhooks")["data"]
        assert len(made) == 1 and made[0]["url"] == receiver.url
        assert made[0]["budget_thresholds"] == [0.5, 0.9] and "key.expiring" not in made[0]["events"]

        card = page.locator(f"[data-webhook-id='{made[0]['id']}']")
        card.get_by_role("button", name="Send test event").click()
        got = receiver.wait_for(lambda rs: any(r.answered == 200 for r in rs), what="the test event")
        assert [r.answered for r in got] == [500, 200] and all(verified(secret, r) for r in got)
        deadline = time.monotonic() + 20
        while "delivered" not in card.locator("table.deliveries").inner_text():
            assert time.monotonic() < deadline, card.inner_text()
            time.sleep(0.2)
            page.reload()
            card = page.locator(f"[data-webhook-id='{made[0]['id']}']")
        row = card.locator(f"tr[data-delivery-id='{got[0].event_id}']")
        assert "webhook.test" in row.inner_text() and "200" in row.inner_text()
        assert row.locator("td[data-label='Attempts']").inner_text() == "2"
        shot(page, "delivered")

        # Disable: the test button is off; a new secret is shown once and signs from then on.
        card.get_by_role("button", name="Disable").click()
        card = page.locator(f"[data-webhook-id='{made[0]['id']}']")
        assert card.get_by_role("button", name="Send test event").is_disabled()
        card.get_by_role("button", name="Enable").click()
        card = page.locator(f"[data-webhook-id='{made[0]['id']}']")
        card.get_by_role("button", name="New secret").click()
        fresh = page.locator("dialog[data-secret-dialog] [data-secret]").input_value()
        assert fresh.startswith("whsec_") and fresh != secret

        # On a phone the page fits the screen's width.
        phone = browser.new_context(viewport={"width": 390, "height": 844})
        small = phone.new_page()
        sign_in(small, gw, "owner-web@example.com")
        small.wait_for_url(re.compile(r"/projects/"))
        small.goto(f"{gw.console_url}/projects/{project['id']}/webhooks")
        assert small.evaluate("document.documentElement.scrollWidth") <= 390
        shot(small, "phone")
        phone.close()
        context.close()
    finally:
        receiver.stop()


def test_a_member_sees_the_log_but_no_buttons(gw: Gateway, browser: Any) -> None:
    owner = gw.user("owner-web2@example.com", password=PASSWORD)
    member = gw.user("member-web2@example.com", password=PASSWORD)
    project = owner.project("team")
    owner.ok("POST", f"/v1/projects/{project['id']}/members", 201,
             json={"email": "member-web2@example.com", "role": "member"})
    member.join(project["id"])
    owner.ok("POST", f"/v1/projects/{project['id']}/webhooks", 201, json={"url": "https://hooks.example.com/x"})
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, gw, "member-web2@example.com")
    page.wait_for_url(re.compile(r"/projects/"))
    page.goto(f"{gw.console_url}/projects/{project['id']}/webhooks")
    assert "https://hooks.example.com/x" in page.content()
    assert page.get_by_role("button", name="Send test event").count() == 0
    assert page.get_by_role("button", name="Add webhook").count() == 0
    context.close()
