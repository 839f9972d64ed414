"""Project limits and per-model key limits in the web console (issue 17), in Debian's Chromium against a
real `quotagate serve` whose models are on the fake upstream: an owner sets the project's limits (every
field's error at once, in the API's words, the input kept), a member only reads them and the server
refuses the member's post; per-model limits in the create and edit forms (a line's error names the
line); the pages at 390 px and 1280 px; and the limits set in the console bind the LLM API (the official
openai SDK gets its 429)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import fresh_database
from tests.fakes.upstream import FakeUpstream
from tests.support import Gateway, start_gateway
from tests.web.test_console_browser import PASSWORD
from tests.web.test_console_product import DESKTOP, PHONE, field_error, new_owner, signed_in

pytestmark = pytest.mark.browser
CHAT = "qwen3.6-27b"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _pg_template: str | None) -> Iterator[Gateway]:
    """One gateway for the module (each test signs in as a user of its own), its models on the fake upstream."""
    directory = tmp_path_factory.mktemp("limits")
    upstream = FakeUpstream().start()
    config = directory / "quotagate.toml"
    config.write_text(f"""
[[models]]
id = "{CHAT}"
type = "chat"
upstreams = ["{upstream.base_url}"]

[[models]]
id = "bge-m3"
type = "embedding"
upstreams = ["{upstream.base_url}"]
""")
    try:
        with fresh_database(directory, _pg_template, "limits") as url:
            gateway = start_gateway(directory / "data", url, config)
            try:
                yield gateway
            finally:
                gateway.stop()
    finally:
        upstream.stop()


def chat(gw: Gateway, secret: str) -> Any:
    client = openai.OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0)
    return client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)


def test_project_limits_set_by_an_owner_read_by_a_member_and_applied(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    key = owner.mint(project["id"], name="backend")  # no limits of its own: the project's bind it
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    section = page.locator("#project-limits")
    assert section.locator("dd.project-limits").inner_text() == "none"
    page.get_by_label("Shared rpm").fill("-1")
    page.get_by_label("Shared tpm").fill("lots")
    page.get_by_label("Shared token limit").fill("1000")
    page.get_by_role("button", name="Save project limits").click()
    # The API's own messages for the same values, each at its field, all at once; nothing changed.
    api = owner.request("PATCH", f"/v1/projects/{project['id']}", json={"rpm": -1}).json()["error"]["message"]
    assert api == "rpm: Input should be greater than 0"
    assert field_error(page, "Shared rpm") == "Input should be greater than 0"
    assert field_error(page, "Shared tpm") == "Input should be a valid integer"
    pair = owner.request("PATCH", f"/v1/projects/{project['id']}", json={"token_limit": 1000}).json()["error"]
    assert pair["field"] == "token_limit_period"
    assert pair["message"] == ("token_limit_period: token_limit and token_limit_period come together; "
                               "give both or neither")
    assert field_error(page, "Shared limit period") == ("Token budget and budget period come together; "
                                                          "give both or neither")
    assert "3 fields need a change" in page.get_by_role("alert").inner_text()
    assert page.get_by_label("Shared tpm").input_value() == "lots"
    assert page.get_by_label("Shared token limit").input_value() == "1000"
    unchanged = owner.ok("GET", f"/v1/projects/{project['id']}")
    assert (unchanged["rpm"], unchanged["tpm"], unchanged["token_limit"]) == (None, None, None)
    shot(page, "project-limits-errors")
    page.get_by_label("Shared rpm").fill("1")
    page.get_by_label("Shared tpm").fill("")
    page.get_by_label("Shared token limit").fill("100,000")
    page.get_by_label("Shared limit period").select_option("day")
    page.get_by_role("button", name="Save project limits").click()
    page.wait_for_url(f"{gw.console_url}/projects/{project['id']}/keys#project-limits")
    saved = owner.ok("GET", f"/v1/projects/{project['id']}")
    assert (saved["rpm"], saved["tpm"], saved["token_limit"], saved["token_limit_period"]) == (1, None, 100000, "day")
    assert section.locator("dd.project-limits").inner_text() == "1 rpm, 100k tokens / day"
    assert page.get_by_label("Shared token limit").input_value() == "100000"
    shot(page, "project-limits-saved")
    # The key's page says which project limits bind it too.
    page.goto(f"{gw.console_url}/keys/{key['id']}")
    assert page.locator("dd.project-limits").inner_text().startswith("1 rpm, 100k tokens / day")

    # They bind the LLM API: the key's second request in the minute is over the project's rpm of 1.
    assert chat(gw, key["secret"]).choices[0].message.content
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw, key["secret"])
    assert refused.value.status_code == 429
    assert isinstance(refused.value.body, dict) and refused.value.body.get("param") == "project"
    # The usage page shows their live state, as the usage API has it: the one request admitted, its tokens.
    live = owner.ok("GET", f"/v1/projects/{project['id']}/usage")["limits"]
    assert live["rpm"]["used"] == 1 and live["budget"]["used"] > 0
    page.goto(f"{gw.console_url}/projects/{project['id']}/usage")
    now = page.locator("#project-limits-now")
    assert now.locator("[data-limit=rpm] dd").inner_text() == "1 / 1"
    assert now.locator("[data-limit=budget] dd").inner_text() == f"{live['budget']['used']} / 100k"
    assert now.get_by_role("meter").count() == 1
    shot(page, "project-limits-live")

    # A member reads them and has no form; the server refuses the member's post all the same.
    member_email = f"member-of-{project['id']}@example.com"
    member = gw.user(member_email, password=PASSWORD)
    owner.ok("POST", f"/v1/projects/{project['id']}/members", 201, json={"email": member_email, "role": "member"})
    member.join(project["id"])
    m_context, m_page = signed_in(browser, gw, member_email)
    m_page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    assert m_page.locator("#project-limits dd.project-limits").inner_text() == "1 rpm, 100k tokens / day"
    assert m_page.get_by_role("button", name="Save project limits").count() == 0
    assert m_page.get_by_label("Shared rpm").count() == 0
    assert "Only the project's owners can change them" in m_page.locator("#project-limits").inner_text()
    shot(m_page, "project-limits-member")
    csrf = m_page.locator("form.signout input[name=csrf]").input_value()
    cookies = {c["name"]: c["value"] for c in m_context.cookies()}
    r = httpx.post(f"{gw.console_url}/projects/{project['id']}/limits", data={"csrf": csrf, "rpm": "1000"},
                   cookies=cookies)
    assert r.status_code == 403
    assert owner.ok("GET", f"/v1/projects/{project['id']}")["rpm"] == 1
    # Clearing every field clears the project's limits.
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    for label in ("Shared rpm", "Shared token limit"):
        page.get_by_label(label).fill("")
    page.get_by_label("Shared limit period").select_option("")
    page.get_by_role("button", name="Save project limits").click()
    page.wait_for_url(f"{gw.console_url}/projects/{project['id']}/keys#project-limits")
    cleared = owner.ok("GET", f"/v1/projects/{project['id']}")
    assert (cleared["rpm"], cleared["token_limit"], cleared["token_limit_period"]) == (None, None, None)
    m_context.close()
    context.close()


def test_per_model_limits_in_the_key_forms(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    page.get_by_label("Name", exact=True).fill("per-model")
    page.get_by_label("Requests per minute", exact=True).fill("-1")
    page.get_by_label("Per-model limits").fill(f"{CHAT} rpm=60\nbge-m3 tpm=100 token_limit=5")
    page.get_by_role("button", name="Create key").click()
    # The form's own line format: the line is named; the key's other fields' errors come at once.
    assert field_error(page, "Per-model limits") == ("Line 2 ('bge-m3 tpm=100 token_limit=5'): a token budget "
                                                     "needs its period, e.g. token_limit=5/day")
    assert field_error(page, "Requests per minute") == "Input should be greater than 0"
    assert page.get_by_label("Per-model limits").input_value() == f"{CHAT} rpm=60\nbge-m3 tpm=100 token_limit=5"
    shot(page, "model-limits-create-errors")
    # The API's own message for a value, with the line it is on.
    page.get_by_label("Requests per minute", exact=True).fill("")
    page.get_by_label("Per-model limits").fill(f"{CHAT} rpm=60\nbge-m3 tpm=0 token_limit=5/fortnight")
    page.get_by_role("button", name="Create key").click()
    api = owner.request("POST", f"/v1/projects/{project['id']}/inference/keys",
                        json={"name": "x", "model_limits": {"bge-m3": {"tpm": 0}}}).json()["error"]["message"]
    assert api.endswith("Input should be greater than 0")
    assert field_error(page, "Per-model limits") == "Line 2 ('bge-m3'), tpm: Input should be greater than 0"
    assert owner.ok("GET", f"/v1/projects/{project['id']}/inference/keys")["data"] == []
    page.get_by_label("Per-model limits").fill(f"{CHAT} rpm=1\n\nbge-m3 tpm=1,000 token_limit=5000/day")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#secret-value").input_value()
    page.get_by_role("dialog").get_by_role("link", name="Done").click()
    [key] = owner.ok("GET", f"/v1/projects/{project['id']}/inference/keys")["data"]
    assert key["model_limits"] == {
        CHAT: {"rpm": 1, "tpm": None, "token_limit": None, "token_limit_period": None},
        "bge-m3": {"rpm": None, "tpm": 1000, "token_limit": 5000, "token_limit_period": "day"}}

    assert page.locator(f"tr[data-key-id='{key['id']}'] .per-model").inner_text() == f"+ per model: bge-m3, {CHAT}"
    # The key's page shows them, and the edit form has them as lines.
    page.goto(f"{gw.console_url}/keys/{key['id']}")
    assert page.locator("dd.model-limits").inner_text() == f"bge-m3: 1k tpm, 5k tokens / day; {CHAT}: 1 rpm"
    box = page.get_by_label("Per-model limits")
    assert box.input_value() == f"bge-m3 tpm=1000 token_limit=5000/day\n{CHAT} rpm=1"
    box.fill(f"{CHAT} rpm=1 burst=5")
    page.get_by_role("button", name="Save limits").click()
    assert field_error(page, "Per-model limits") == (f"Line 1 ('{CHAT} rpm=1 burst=5'): 'burst=5' is not rpm=N, "
                                                     "tpm=N or token_limit=N/period")
    assert owner.ok("GET", f"/v1/inference/keys/{key['id']}")["model_limits"] == key["model_limits"]
    shot(page, "model-limits-edit-error")
    # A box left as it was is not sent: editing another field keeps them.
    page.goto(f"{gw.console_url}/keys/{key['id']}")
    page.get_by_label("Tokens per minute").fill("50000")
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url(f"{gw.console_url}/keys/{key['id']}")
    after = owner.ok("GET", f"/v1/inference/keys/{key['id']}")
    assert after["tpm"] == 50000 and after["model_limits"] == key["model_limits"]

    # The per-model rpm binds the LLM API: the second chat in the minute is refused, naming it.
    assert chat(gw, secret).choices[0].message.content
    with pytest.raises(openai.RateLimitError) as refused:
        chat(gw, secret)
    assert isinstance(refused.value.body, dict) and refused.value.body.get("param") == "model_limits"

    # Changed, and cleared.
    page.get_by_label("Per-model limits").fill(f"{CHAT} rpm=600")
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url(f"{gw.console_url}/keys/{key['id']}")
    assert owner.ok("GET", f"/v1/inference/keys/{key['id']}")["model_limits"] == {
        CHAT: {"rpm": 600, "tpm": None, "token_limit": None, "token_limit_period": None}}
    assert page.locator("dd.model-limits").inner_text() == f"{CHAT}: 600 rpm"
    page.get_by_label("Per-model limits").fill("")
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url(f"{gw.console_url}/keys/{key['id']}")
    assert owner.ok("GET", f"/v1/inference/keys/{key['id']}")["model_limits"] is None
    assert page.locator("dd.model-limits").inner_text() == "none"
    context.close()


def test_limits_pages_fit_a_phone_and_a_wide_screen(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    owner.ok("PATCH", f"/v1/projects/{project['id']}",
             json={"rpm": 6000, "tpm": 2_000_000, "token_limit": 50_000_000, "token_limit_period": "month"})
    key = owner.mint(project["id"], name="production-backend-service", rpm=600,
                     model_limits={CHAT: {"rpm": 60, "tpm": 10_000, "token_limit": 50_000, "token_limit_period": "day"},
                                   "bge-m3": {"tpm": 100_000}})
    pages = {"keys-project-limits": f"/projects/{project['id']}/keys", "key-model-limits": f"/keys/{key['id']}"}
    for label, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        context, page = signed_in(browser, gw, email, viewport)
        for name, path in pages.items():
            page.goto(gw.console_url + path)
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], (label, name)
            for field in ("Shared token limit", "Per-model limits"):
                found = page.get_by_label(field)
                if found.count():
                    box = found.bounding_box()
                    assert box is not None and box["x"] + box["width"] <= viewport["width"], (label, name, field)
            shot(page, f"{name}-{label}")
        context.close()
