"""The web console as a product (issue 16), in Debian's Chromium against one real `quotagate serve` (console,
LLM API and the built-in simulated model server): reloading never posts a form again, the budget gauge
shows the usage, forms show every API message at once next to its field with the input kept, the charts
give their values on hover and focus, every page fits a phone, sessions are apart from API tokens."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import fresh_database
from tests.support import Console, Gateway, free_port, start_gateway
from tests.web.test_console_browser import PASSWORD, sign_in

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
_users = iter(range(1, 10_000))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None) -> Iterator[Gateway]:
    """One gateway for the module (each test signs in as a user of its own): two models on the simulator."""
    directory = tmp_path_factory.mktemp("product")
    sim = free_port()
    config = directory / "demo.toml"
    config.write_text(f"""
[simulator]
port = {sim}
tokens_per_second = 5000

[[models]]
id = "qwen3.6-27b"
type = "chat"
upstreams = ["http://127.0.0.1:{sim}/v1"]

[[models]]
id = "bge-m3"
type = "embedding"
upstreams = ["http://127.0.0.1:{sim}/v1"]
""")
    with fresh_database(directory, _pg_template, "web") as url:
        gateway = start_gateway(directory / "data", url, config)
        try:
            yield gateway
        finally:
            gateway.stop()


def new_owner(gw: Gateway) -> tuple[str, Console, dict[str, Any]]:
    email = f"owner{next(_users)}@example.com"
    owner = gw.user(email, password=PASSWORD)
    return email, owner, owner.project("acme")


def signed_in(browser: Any, gw: Gateway, email: str, viewport: dict[str, int] = DESKTOP) -> tuple[Any, Any]:
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    sign_in(page, gw, email)
    page.wait_for_url(re.compile(r"/projects/"))
    return context, page


def keys_of(owner: Console, project_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = owner.ok("GET", f"/v1/projects/{project_id}/inference/keys")["data"]
    return data


def chat(gw: Gateway, secret: str) -> openai.types.CompletionUsage:
    client = openai.OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0)
    reply = client.chat.completions.create(model="qwen3.6-27b", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=12)
    assert reply.usage is not None
    return reply.usage


# -- Post/Redirect/Get ------------------------------------------------------------------------------------

def test_reload_after_create_and_rotate_makes_nothing_twice(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    context, page = signed_in(browser, gw, email)
    keys_url = f"{gw.console_url}/projects/{project['id']}/keys"
    page.goto(keys_url)
    page.get_by_label("Name", exact=True).fill("backend")
    page.get_by_role("button", name="Create key").click()
    dialog = page.get_by_role("dialog")
    secret = dialog.get_by_label("Secret").input_value()
    assert secret.startswith("qgk_")
    assert page.url == keys_url  # redirected: the page with the secret is a GET
    assert len(keys_of(owner, project["id"])) == 1

    # F5: the page again, without the secret and without a second key.
    page.reload()
    assert page.get_by_role("dialog").count() == 0
    assert secret not in page.content()
    assert len(keys_of(owner, project["id"])) == 1
    # So do Back and Forward (the browser has no POST in its history to repeat).
    page.go_back()
    page.go_forward()
    assert len(keys_of(owner, project["id"])) == 1 and secret not in page.content()

    # Rotate: the new key's page shows its secret once; reloading rotates nothing again.
    key_id = keys_of(owner, project["id"])[0]["id"]
    page.goto(f"{gw.console_url}/keys/{key_id}")
    page.get_by_role("button", name="Rotate").click()
    page.wait_for_url(re.compile(r"/keys/key_"))
    new_id = page.url.rsplit("/", 1)[1]
    assert new_id != key_id
    rotated = page.get_by_role("dialog").get_by_label("Secret").input_value()
    assert rotated.startswith("qgk_") and rotated != secret
    shot(page, "rotated-secret")
    page.get_by_role("dialog").get_by_role("link", name="Done").click()
    assert page.url == f"{gw.console_url}/keys/{new_id}"  # not ".../keys?"
    assert page.get_by_role("dialog").count() == 0
    page.reload()
    assert page.get_by_role("dialog").count() == 0
    ids = sorted(k["id"] for k in keys_of(owner, project["id"]))
    assert ids == sorted([key_id, new_id])  # the old key (in its grace period) and one new one
    assert owner.ok("GET", f"/v1/inference/keys/{new_id}")["rotated_from"] == key_id

    # An access token: one, shown once.
    before = len(owner.ok("GET", "/v1/me/access-tokens")["data"])
    page.goto(f"{gw.console_url}/tokens")
    page.get_by_label("Name").fill("ci-deploy")
    with page.expect_navigation():
        page.get_by_role("button", name="Create token").click()
    assert page.url == f"{gw.console_url}/tokens"
    token = page.get_by_role("dialog").get_by_label("Secret").input_value()
    assert token.startswith("qgt_")
    page.reload()
    assert page.get_by_role("dialog").count() == 0 and token not in page.content()
    assert len(owner.ok("GET", "/v1/me/access-tokens")["data"]) == before + 1
    context.close()

    # The secrets never went into the server's log.
    log = gw.log()
    assert secret not in log and rotated not in log and token not in log


def test_the_secret_is_handed_only_to_the_session_that_made_it(gw: Gateway, browser: Any) -> None:
    """The hand-over is bound to the session: the same user signed in elsewhere opening the page at that
    moment does not get it (and does not use it up)."""
    email, owner, project = new_owner(gw)
    context, page = signed_in(browser, gw, email)
    other, other_page = signed_in(browser, gw, email)
    keys_url = f"{gw.console_url}/projects/{project['id']}/keys"
    page.goto(keys_url)
    page.get_by_label("Name", exact=True).fill("backend")
    csrf = page.locator("#create input[name=csrf]").input_value()
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    posted = httpx.post(keys_url, data={"csrf": csrf, "name": "backend"}, cookies=cookies)
    assert posted.status_code == 303 and posted.headers["location"] == f"/projects/{project['id']}/keys"
    assert "qgk_" not in posted.headers["location"] and "qgk_" not in posted.text
    other_page.goto(keys_url)
    assert other_page.get_by_role("dialog").count() == 0
    page.goto(keys_url)
    secret = page.get_by_role("dialog").get_by_label("Secret").input_value()
    assert secret.startswith("qgk_")
    assert keys_of(owner, project["id"])[0]["prefix"] == secret[:8] + "…"
    context.close()
    other.close()


# -- The budget gauge ------------------------------------------------------------------------------------

def test_the_budget_gauge_shows_the_share_used(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    key = owner.mint(project["id"], name="budgeted", token_limit=1000, token_limit_period="month")
    used = chat(gw, key["secret"]).total_tokens
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/keys/{key['id']}")
    gauge = page.get_by_role("meter")
    assert gauge.get_attribute("aria-valuenow") == str(used)
    track = page.locator(".meter-track").bounding_box()
    fill = page.locator(".meter-fill").bounding_box()
    assert track is not None and fill is not None
    assert fill["width"] / track["width"] == pytest.approx(used / 1000, abs=0.01)
    assert f"{used} of 1k tokens" in page.locator(".meter-text").inner_text()
    shot(page, "gauge")
    context.close()


# -- Forms -----------------------------------------------------------------------------------------------

def field_error(page: Any, label: str) -> str:
    """The error shown next to the field labelled ``label`` (its aria-describedby names it)."""
    field = page.get_by_label(label, exact=True)
    assert field.get_attribute("aria-invalid") == "true", label
    ids = (field.get_attribute("aria-describedby") or "").split()
    error_id = next(i for i in ids if i.endswith("-error"))
    text: str = page.locator(f"#{error_id}").inner_text()
    return text


def test_create_key_form_shows_every_error_at_once_and_keeps_the_input(gw: Gateway, browser: Any,
                                                                       shot: Any) -> None:
    email, owner, project = new_owner(gw)
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    page.get_by_label("Requests per minute").fill("-5")
    page.get_by_label("Tokens per minute").fill("lots")
    page.get_by_label("Token budget").fill("1,000,000")
    page.get_by_label("bge-m3").check()
    page.get_by_role("button", name="Create key").click()

    # The API's messages (pydantic's, as POST .../inference/keys answers them), each at its field.
    api = owner.request("POST", f"/v1/projects/{project['id']}/inference/keys", json={"name": "x", "rpm": -5})
    assert api.json()["error"]["message"] == "rpm: Input should be greater than 0"
    assert field_error(page, "Name") == "String should have at least 1 character"
    assert field_error(page, "Requests per minute") == "Input should be greater than 0"
    assert field_error(page, "Tokens per minute") == "Input should be a valid integer"
    assert field_error(page, "Budget period") == ("Token budget and budget period come together; "
                                                  "give both or neither")
    summary = page.get_by_role("alert").inner_text()
    assert "4 fields need a change" in summary
    assert not re.search(r"\b(rpm|tpm|token_limit|token_limit_period):", page.content())
    # What was typed is still there, wrong or not.
    assert page.get_by_label("Requests per minute").input_value() == "-5"
    assert page.get_by_label("Tokens per minute").input_value() == "lots"
    assert page.get_by_label("Token budget").input_value() == "1,000,000"
    assert page.get_by_label("bge-m3").is_checked()
    shot(page, "errors")
    assert keys_of(owner, project["id"]) == []

    # A blank name is flagged by the API's own check; a past expiry by the service, after the fields pass.
    page.get_by_label("Name", exact=True).fill("   ")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_label("Tokens per minute").fill("")
    page.get_by_label("Budget period").select_option("month")
    page.get_by_role("button", name="Create key").click()
    assert field_error(page, "Name") == "Must not be blank"
    assert page.get_by_label("Token budget").input_value() == "1,000,000"
    page.get_by_label("Name", exact=True).fill("backend")
    page.get_by_label("Expires (UTC)").fill("2001-01-01T00:00")
    page.get_by_role("button", name="Create key").click()
    assert field_error(page, "Expires (UTC)") == "Must be in the future"
    assert page.get_by_label("Name", exact=True).input_value() == "backend"
    page.get_by_label("Expires (UTC)").fill("")
    page.get_by_role("button", name="Create key").click()
    page.get_by_role("dialog").get_by_role("link", name="Done").click()
    [key] = keys_of(owner, project["id"])
    assert (key["rpm"], key["token_limit"], key["token_limit_period"]) == (600, 1_000_000, "month")
    context.close()


def test_edit_project_and_token_forms_show_their_errors(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    key = owner.mint(project["id"], name="backend", rpm=600)
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/keys/{key['id']}")
    page.get_by_label("Name", exact=True).fill("")
    page.get_by_label("Requests per minute").fill("0")
    page.get_by_label("Tokens per minute").fill("2.5")
    page.get_by_role("button", name="Save limits").click()
    assert field_error(page, "Name") == "String should have at least 1 character"
    assert field_error(page, "Requests per minute") == "Input should be greater than 0"
    assert field_error(page, "Tokens per minute") == "Input should be a valid integer"
    # The wrong values stay as typed (not the key's old ones), and nothing changed.
    assert page.get_by_label("Requests per minute").input_value() == "0"
    assert page.get_by_label("Tokens per minute").input_value() == "2.5"
    assert owner.ok("GET", f"/v1/inference/keys/{key['id']}")["rpm"] == 600
    shot(page, "edit-errors")
    page.get_by_label("Name", exact=True).fill("backend-2")
    page.get_by_label("Requests per minute").fill("1200")
    page.get_by_label("Tokens per minute").fill("")
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url(f"{gw.console_url}/keys/{key['id']}")
    changed = owner.ok("GET", f"/v1/inference/keys/{key['id']}")
    assert (changed["name"], changed["rpm"], changed["tpm"]) == ("backend-2", 1200, None)

    page.goto(f"{gw.console_url}/projects")
    page.get_by_role("button", name="Create project").click()  # blank: the browser's own check stops it
    assert page.get_by_label("Name").evaluate("el => el.validity.valueMissing")
    page.get_by_label("Name").fill("  ")
    page.get_by_role("button", name="Create project").click()
    assert field_error(page, "Name") == "Must not be blank"
    assert page.get_by_label("Name").input_value() == "  "

    page.goto(f"{gw.console_url}/tokens")
    page.get_by_label("Name").evaluate("el => el.removeAttribute('maxlength')")
    page.get_by_label("Name").fill("t" * 201)
    page.get_by_role("button", name="Create token").click()
    assert field_error(page, "Name") == "String should have at most 200 characters"
    assert page.get_by_label("Name").input_value() == "t" * 201
    context.close()


# -- Charts ----------------------------------------------------------------------------------------------

def test_charts_give_values_on_hover_and_focus(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    key = owner.mint(project["id"], name="charted")
    usages = [chat(gw, key["secret"]) for _ in range(3)]
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    context, page = signed_in(browser, gw, email)
    for rng, bars in (("hour", 60), ("day", 24), ("month", 30)):
        page.goto(f"{gw.console_url}/keys/{key['id']}?range={rng}")
        requests_chart = page.locator("svg.chart").first
        assert requests_chart.locator("g.bucket").count() == bars, rng
        # Whole-number ticks on a count, never 0.5.
        ticks = requests_chart.locator("text.axis").all_text_contents()
        assert all(re.fullmatch(r"\d+", t) for t in ticks[:2]), ticks
        # The x axis is labelled more than twice.
        assert requests_chart.locator("line.tick").count() >= 3, rng
    page.goto(f"{gw.console_url}/keys/{key['id']}?range=hour")
    requests_chart, tokens_chart = page.locator("svg.chart").all()
    y_ticks = [t for t in requests_chart.locator("text.axis").all_text_contents() if ":" not in t]
    assert y_ticks == ["0", "1", "2", "3"]
    busy = requests_chart.locator("g.bucket[tabindex='0']")
    # One minute holds the three calls unless a minute boundary fell between them.
    total = 0
    for i in range(busy.count()):
        bucket = busy.nth(i)
        tip = bucket.locator(".tip")
        assert not tip.is_visible()
        bucket.hover()
        assert tip.is_visible()
        match = re.search(r": (\d+) requests?$", tip.text_content())
        assert match, tip.text_content()
        total += int(match.group(1))
    assert total == 3
    shot(page, "hover")
    # Keyboard: Tab reaches the tokens chart's busy bucket, whose tip then shows prompt and completion apart.
    busy_tokens = tokens_chart.locator("g.bucket[tabindex='0']")
    page.mouse.move(0, 0)
    busy_tokens.last.focus()
    tip = busy_tokens.last.locator(".tip")
    assert tip.is_visible()
    assert re.search(r"\d[\d,]* prompt \+ \d[\d,]* completion tokens$", tip.text_content()), tip.text_content()
    # Prompt and completion are drawn apart (two layers) and listed apart in the table.
    assert tokens_chart.locator("rect.bar.s-prompt").count() >= 1
    assert tokens_chart.locator("rect.bar.s-completion").count() >= 1
    page.get_by_text("The charts as a table").click()
    rows = page.locator(".chart-table tbody tr")
    cells = [[int(c.replace(",", "")) for c in rows.nth(i).locator("td").all_inner_texts()]
             for i in range(rows.count())]
    assert [sum(col) for col in zip(*cells, strict=True)] == [3, prompt, completion]
    shot(page, "table")
    context.close()


# -- Phones and wide screens -----------------------------------------------------------------------------

def test_every_page_fits_a_phone_and_a_wide_screen(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    key = owner.mint(project["id"], name="production-backend-service", rpm=600, tpm=200_000,
                     token_limit=5_000_000, token_limit_period="month", allowed_models=["qwen3.6-27b", "bge-m3"])
    owner.mint(project["id"], name="staging")
    for _ in range(3):
        chat(gw, key["secret"])
    owner.ok("POST", "/v1/me/access-tokens", 201, json={"name": "ci-deploy"})
    pages = {"keys": f"/projects/{project['id']}/keys", "key": f"/keys/{key['id']}", "tokens": "/tokens",
             "projects": "/projects"}
    for label, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        missing: list[str] = []
        page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)  # noqa: B023
        page.goto(f"{gw.console_url}/login")
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], label
        shot(page, f"login-{label}")
        sign_in(page, gw, email)
        page.wait_for_url(re.compile(r"/projects/"))
        for name, path in pages.items():
            page.goto(gw.console_url + path)
            width = viewport["width"]
            assert page.evaluate("document.documentElement.scrollWidth") <= width, (label, name)
            # The top bar is one row.
            bar = page.locator("header.topbar").bounding_box()
            assert bar is not None and bar["height"] <= 60, (label, name, bar)
            shot(page, f"{name}-{label}")
        assert missing == []  # no /favicon.ico 404 (nor any other)
        page.goto(gw.console_url + pages["keys"])
        row = page.locator("tr", has_text="production-backend-service")
        # Status and Revoke in view, not behind sideways scrolling.
        for element in (row.locator(".badge").first, row.get_by_role("button", name="Revoke")):
            box = element.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], label
            assert element.is_visible()
        page.goto(gw.console_url + pages["key"])
        activity = page.locator("table.activity tbody tr").first
        box = activity.bounding_box()
        assert box is not None and box["height"] <= 80, (label, box)
        if label == "phone":
            # The links folded into the menu still work.
            assert page.get_by_role("link", name="Access tokens").count() == 0
            page.get_by_text("Menu").click()
            shot(page, "menu-phone")
            page.get_by_role("link", name="Access tokens").click()
            page.wait_for_url(f"{gw.console_url}/tokens")
        context.close()


# -- Access tokens, favicon, the "Show archived" toggle -------------------------------------------------

def test_sessions_are_apart_from_api_tokens(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, _project = new_owner(gw)
    owner.ok("POST", "/v1/me/access-tokens", 201, json={"name": "ci-deploy"})
    earlier = []
    for _ in range(3):  # three sign-ins, two of them signed out again
        context, page = signed_in(browser, gw, email)
        earlier.append((context, page))
    for context, page in earlier[:2]:
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(re.compile(r"/login"))
        context.close()
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/tokens")
    api_rows = page.locator("table.tokens tbody tr")
    names = [api_rows.nth(i).locator("td").first.inner_text() for i in range(api_rows.count())]
    assert "web session" not in " ".join(names)
    assert "ci-deploy" in names
    sessions = page.locator("ul.sessions li")
    assert sessions.count() == 2  # this browser and the one still signed in; not the ended ones
    assert "This browser" in sessions.first.inner_text() or "This browser" in sessions.last.inner_text()
    assert "2 ended sessions are not listed" in page.locator("#sessions").inner_text()
    shot(page, "tokens")
    # Signing the other browser out from here ends its session.
    other = sessions.filter(has_text="Browser session")
    with page.expect_navigation():
        other.get_by_role("button", name="Sign out").click()
    assert page.locator("ul.sessions li").count() == 1
    still, still_page = earlier[2]
    still_page.goto(f"{gw.console_url}/projects")
    assert "/login" in still_page.url
    still.close()
    context.close()


def test_favicon_done_and_show_archived(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    icon = httpx.get(f"{gw.console_url}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
    key = owner.mint(project["id"], name="old-key")
    owner.ok("DELETE", f"/v1/inference/keys/{key['id']}")
    owner.ok("POST", f"/v1/inference/keys/{key['id']}/archive")
    context, page = signed_in(browser, gw, email)
    keys_url = f"{gw.console_url}/projects/{project['id']}/keys"
    page.goto(keys_url)
    # The toggle sits on the heading's line.
    heading = page.get_by_role("heading", level=1).bounding_box()
    toggle = page.get_by_label("Show archived").bounding_box()
    assert heading is not None and toggle is not None
    assert heading["y"] <= toggle["y"] + toggle["height"] / 2 <= heading["y"] + heading["height"]
    page.get_by_label("Show archived").check()
    page.wait_for_url(f"{keys_url}?archived=1")
    assert page.locator("tr", has_text="old-key").count() == 1
    shot(page, "archived")
    page.get_by_label("Show archived").uncheck()
    page.wait_for_url(keys_url)  # not ".../keys?"
    assert page.locator("tr", has_text="old-key").count() == 0
    page.get_by_label("Name", exact=True).fill("new-key")
    page.get_by_role("button", name="Create key").click()
    page.get_by_role("dialog").get_by_role("link", name="Done").click()
    page.wait_for_url(keys_url)
    assert page.url == keys_url
    context.close()
