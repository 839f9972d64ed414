"""The project usage page and key restrictions in the web console (issues 16 and 17), in Debian's Chromium
against a real `quotagate serve` with its simulated model server: usage of all keys by key and by model,
the charts, chosen days, the metadata filter, the CSV downloads (checked against the console API), the
restrictions' form errors in the API's words, each page at 390 px and 1280 px."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import Console, Gateway
from tests.web import test_console_product as product
from tests.web.test_console_product import DESKTOP, PHONE, chat, field_error, new_owner, signed_in

pytestmark = pytest.mark.browser
gw = product.gw  # a gateway for this module: two models on the simulator


def embed(gw: Gateway, secret: str) -> int:
    client = openai.OpenAI(base_url=gw.llm_url, api_key=secret, max_retries=0)
    return client.embeddings.create(model="bge-m3", input="hello world").usage.prompt_tokens


def tagged_project(gw: Gateway) -> tuple[str, Console, dict[str, Any], dict[str, dict[str, Any]]]:
    """A project with three keys (two tagged) and traffic: search 2 chats, ads 1 chat and 1 embedding."""
    email, owner, project = new_owner(gw)
    keys = {"search": owner.mint(project["id"], name="search-backend", metadata={"team": "search", "env": "prod"}),
            "ads": owner.mint(project["id"], name="ads-backend", metadata={"team": "ads"}),
            "bare": owner.mint(project["id"], name="untagged")}
    chat(gw, keys["search"]["secret"])
    chat(gw, keys["search"]["secret"])
    chat(gw, keys["ads"]["secret"])
    embed(gw, keys["ads"]["secret"])
    return email, owner, project, keys


def stat(page: Any, name: str) -> str:
    text: str = page.locator(".stats div", has=page.locator("dt", has_text=re.compile(f"^{name}$"))) \
        .locator("dd").inner_text()
    return text


def rows_of(page: Any, table: str) -> dict[str, list[str]]:
    """A by-key or by-model table as {first cell: the other cells}."""
    rows = page.locator(f"table.{table} tbody tr")
    out = {}
    for i in range(rows.count()):
        cells = rows.nth(i).locator("td").all_inner_texts()
        out[cells[0].split()[0]] = cells[1:]
    return out


def test_project_usage_by_key_and_model_with_charts(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project, _keys = tagged_project(gw)
    api = owner.ok("GET", f"/v1/projects/{project['id']}/usage")
    assert api["totals"]["requests"] == 4
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    page.get_by_role("link", name="Usage", exact=True).click()
    page.wait_for_url(f"{gw.console_url}/projects/{project['id']}/usage")
    assert stat(page, "Requests") == "4"
    by_key = rows_of(page, "by-key")
    assert set(by_key) == {"search-backend", "ads-backend"}  # the unused key has no row
    assert by_key["search-backend"][1] == "2" and by_key["ads-backend"][1] == "2"
    assert by_key["search-backend"][0].split() == ["env=prod", "team=search"]
    by_model = rows_of(page, "by-model")
    assert {m: cells[0] for m, cells in by_model.items()} == {"qwen3.6-27b": "3", "bge-m3": "1"}
    assert by_model["bge-m3"][2] == "0"  # an embedding has no completion tokens
    # Prompt and completion apart, in the page as in the API.
    for m in api["models"]:
        cells = by_model[m["model"]]
        assert [int(c.replace(",", "")) for c in cells[:3]] == [m["requests"], m["prompt_tokens"],
                                                                 m["completion_tokens"]]

    # The key page's charts: a bucket per hour of the day, whole-number ticks, values on hover and focus.
    requests_chart, tokens_chart = page.locator("svg.chart").all()
    assert requests_chart.locator("g.bucket").count() == 24
    y_ticks = [t for t in requests_chart.locator("text.axis").all_text_contents() if ":" not in t and " " not in t]
    assert y_ticks and all(re.fullmatch(r"\d+", t) for t in y_ticks), y_ticks
    busy = requests_chart.locator("g.bucket[tabindex='0']")
    total = 0
    for i in range(busy.count()):
        busy.nth(i).hover()
        tip = busy.nth(i).locator(".tip")
        assert tip.is_visible()
        total += int(re.search(r": (\d+) requests?$", tip.text_content()).group(1))  # type: ignore[union-attr]
    assert total == 4
    page.mouse.move(0, 0)
    tokens_busy = tokens_chart.locator("g.bucket[tabindex='0']").last
    tokens_busy.focus()
    assert re.search(r"\d[\d,]* prompt \+ \d[\d,]* completion tokens$", tokens_busy.locator(".tip").text_content())
    assert tokens_chart.locator("rect.bar.s-prompt").count() >= 1
    assert tokens_chart.locator("rect.bar.s-completion").count() >= 1
    page.get_by_text("The charts as a table").click()
    table = page.locator(".chart-table tbody tr")
    cells = [[int(c.replace(",", "")) for c in table.nth(i).locator("td").all_inner_texts()]
             for i in range(table.count())]
    assert [sum(col) for col in zip(*cells, strict=True)] == [4, api["totals"]["prompt_tokens"],
                                                              api["totals"]["completion_tokens"]]
    shot(page, "day")

    for name, bars in (("Last hour", 60), ("Last 30 days", 30)):
        page.get_by_role("link", name=name).click()
        page.wait_for_load_state()
        assert page.locator("svg.chart").first.locator("g.bucket").count() == bars, name
        assert stat(page, "Requests") == "4"

    # Chosen days: a bar a day, or an hour for up to two days; mistakes at their fields, input kept.
    today = datetime.now(UTC).date()
    page.get_by_label("First day").fill((today - timedelta(days=9)).isoformat())
    page.get_by_label("Last day").fill(today.isoformat())
    page.get_by_role("button", name="Show days").click()
    page.wait_for_url(re.compile(r"range=custom"))
    assert page.locator("svg.chart").first.locator("g.bucket").count() == 10
    assert stat(page, "Requests") == "4"
    page.get_by_label("First day").fill(today.isoformat())
    page.get_by_label("Last day").fill(today.isoformat())
    page.get_by_role("button", name="Show days").click()
    page.wait_for_url(re.compile(r"range=custom"))
    assert page.locator("svg.chart").first.locator("g.bucket").count() == 24
    page.get_by_label("First day").fill(today.isoformat())
    page.get_by_label("Last day").fill((today - timedelta(days=1)).isoformat())
    page.get_by_role("button", name="Show days").click()
    page.wait_for_url(re.compile(r"range=custom"))
    assert field_error(page, "Last day (UTC)") == "Must not be before the first day"
    assert page.get_by_label("First day").input_value() == today.isoformat()
    assert "1 field needs a change" in page.get_by_role("alert").inner_text()
    shot(page, "range-error")
    context.close()


def test_metadata_filter_and_csv_downloads(gw: Gateway, browser: Any, shot: Any, tmp_path: Path) -> None:
    email, owner, project, keys = tagged_project(gw)
    context, page = signed_in(browser, gw, email)
    usage_url = f"{gw.console_url}/projects/{project['id']}/usage"
    page.goto(usage_url)
    page.get_by_label("Keys tagged").fill("team=search")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"metadata=team%3Dsearch"))
    assert stat(page, "Requests") == "2"
    assert set(rows_of(page, "by-key")) == {"search-backend"}
    assert set(rows_of(page, "by-model")) == {"qwen3.6-27b"}
    # A second entry narrows further; one no key has leaves nothing.
    page.get_by_label("Keys tagged").fill("env=dev")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    assert stat(page, "Requests") == "0"
    assert page.locator("table.by-key tbody tr").inner_text() == "No key was used in this range."
    page.get_by_role("link", name="Remove the filter env=dev").click()
    page.wait_for_load_state()
    assert stat(page, "Requests") == "2"
    shot(page, "filtered")

    # The exports of the range and filter shown: what the console API answers for the same query.
    with page.expect_download() as got:
        page.get_by_role("link", name="Usage CSV").click()
    usage_rows = list(csv.DictReader(io.StringIO(Path(got.value.path()).read_text())))
    assert got.value.suggested_filename.startswith(f"usage-{project['id']}-")
    assert sum(int(r["requests"]) for r in usage_rows) == 2 and {r["model"] for r in usage_rows} == {"qwen3.6-27b"}
    with page.expect_download() as got:
        page.get_by_role("link", name="Activity CSV").click()
    activity_rows = list(csv.DictReader(io.StringIO(Path(got.value.path()).read_text())))
    api = owner.ok("GET", f"/v1/projects/{project['id']}/activity", params={"metadata": "team=search"})
    assert [r["request_id"] for r in activity_rows] == [r["request_id"] for r in api["data"]]
    assert len(activity_rows) == 2 and {r["key_id"] for r in activity_rows} == {keys["search"]["id"]}
    assert int(activity_rows[0]["prompt_tokens"]) == api["data"][0]["prompt_tokens"]
    # Unfiltered: every request of the range.
    page.get_by_role("link", name="Remove the filter team=search").click()
    page.wait_for_load_state()
    with page.expect_download() as got:
        page.get_by_role("link", name="Activity CSV").click()
    assert len(list(csv.DictReader(io.StringIO(Path(got.value.path()).read_text())))) == 4

    # A key's tag in the by-key table filters by it.
    page.locator("table.by-key").get_by_role("link", name="team=ads").click()
    page.wait_for_url(re.compile(r"metadata=team%3Dads"))
    assert set(rows_of(page, "by-key")) == {"ads-backend"} and stat(page, "Requests") == "2"
    # A filter that is not KEY=VALUE: the API's message at the field, as typed.
    page.get_by_label("Keys tagged").fill("team")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    assert field_error(page, "Keys tagged") == "Expected KEY=VALUE (e.g. team=search), not 'team'"
    assert page.get_by_label("Keys tagged").input_value() == "team"
    shot(page, "filter-error")
    # The filter before it is kept: fixing the entry narrows it further.
    assert page.get_by_role("link", name="Remove the filter team=ads").count() == 1
    page.get_by_label("Keys tagged").fill("team=search")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    assert field_error(page, "Keys tagged") == "'team' is given twice; a key has one value for it"
    page.get_by_label("Keys tagged").fill("env=prod")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"metadata=team%3Dads&metadata=env%3Dprod$"))
    assert stat(page, "Requests") == "0"
    # The exports refuse what the page refuses; another user's project is not found.
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    bad = httpx.get(f"{usage_url.replace('/usage', '/activity.csv')}?metadata=team", cookies=cookies)
    assert bad.status_code == 400 and "text/csv" not in bad.headers["content-type"]
    _email, _stranger, other = new_owner(gw)
    for path in ("usage", "usage.csv", "activity.csv"):
        r = httpx.get(f"{gw.console_url}/projects/{other['id']}/{path}", cookies=cookies)
        assert r.status_code == 404, path
    context.close()


def test_key_restrictions_in_the_forms(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project = new_owner(gw)
    context, page = signed_in(browser, gw, email)
    page.goto(f"{gw.console_url}/projects/{project['id']}/keys")
    page.get_by_label("Name", exact=True).fill("restricted")
    page.get_by_label("Requests per minute").fill("-1")
    page.get_by_label("Allowed networks").fill("10.0.0.5/8\n192.168.0.0/16")
    page.get_by_label("Metadata").fill("team=search\nbad key=x")
    page.get_by_role("button", name="Create key").click()
    # The API's own messages for the same values, each at its field, all at once.
    api = owner.request("POST", f"/v1/projects/{project['id']}/inference/keys",
                        json={"name": "x", "allowed_networks": ["10.0.0.5/8"]}).json()["error"]["message"]
    assert api == "allowed_networks: '10.0.0.5/8' has host bits set; the network is 10.0.0.0/8"
    assert field_error(page, "Allowed networks") == "'10.0.0.5/8' has host bits set; the network is 10.0.0.0/8"
    assert field_error(page, "Metadata") == "'bad key': String should match pattern '^[A-Za-z0-9_.:/-]+$'"
    assert field_error(page, "Requests per minute") == "Input should be greater than 0"
    assert "3 fields need a change" in page.get_by_role("alert").inner_text()
    assert page.get_by_label("Allowed networks").input_value() == "10.0.0.5/8\n192.168.0.0/16"
    assert page.get_by_label("Metadata").input_value() == "team=search\nbad key=x"
    shot(page, "create-errors")
    page.get_by_label("Requests per minute").fill("")
    page.get_by_label("Metadata").fill("team=search\nnot a pair")
    page.get_by_label("Allowed networks").fill("nonsense")
    page.get_by_role("button", name="Create key").click()
    assert field_error(page, "Metadata") == "Line 2 ('not a pair') is not key=value"
    assert field_error(page, "Allowed networks").startswith("'nonsense' is not an IP network in CIDR form")
    seventeen = "\n".join(f"k{i}=v" for i in range(17))
    page.get_by_label("Metadata").fill(seventeen)
    page.get_by_label("Allowed networks").fill("10.0.0.0/8, 2001:db8::/32\n10.0.0.0/8")
    page.get_by_role("button", name="Create key").click()
    too_many = owner.request("POST", f"/v1/projects/{project['id']}/inference/keys",
                             json={"name": "x", "metadata": {f"k{i}": "v" for i in range(17)}}).json()["error"]
    assert too_many["message"].startswith("metadata: Dictionary should have at most 16 items")
    assert field_error(page, "Metadata") == too_many["message"].removeprefix("metadata: ")
    assert owner.ok("GET", f"/v1/projects/{project['id']}/inference/keys")["data"] == []
    page.get_by_label("Metadata").fill(" team = search \n\ncost-center=42")
    page.get_by_role("button", name="Create key").click()
    page.get_by_role("dialog").get_by_role("link", name="Done").click()
    [key] = owner.ok("GET", f"/v1/projects/{project['id']}/inference/keys")["data"]
    assert key["allowed_networks"] == ["10.0.0.0/8", "2001:db8::/32"]  # duplicates dropped, as the API does
    assert key["metadata"] == {"team": "search", "cost-center": "42"}

    # The key's page shows them, and they can be edited (and cleared).
    page.goto(f"{gw.console_url}/keys/{key['id']}")
    facts = page.locator("dl.facts")
    assert facts.locator("dd.networks").inner_text() == "10.0.0.0/8, 2001:db8::/32"
    assert facts.locator("dd.metadata").inner_text().split() == ["cost-center=42", "team=search"]
    assert page.get_by_label("Metadata").input_value() == "cost-center=42\nteam=search"
    page.get_by_label("Allowed networks").fill("10.0.0.5/8")
    page.get_by_label("Metadata").fill("team=ads\nteam=search")
    page.get_by_role("button", name="Save limits").click()
    assert field_error(page, "Allowed networks") == "'10.0.0.5/8' has host bits set; the network is 10.0.0.0/8"
    assert field_error(page, "Metadata") == "Line 2: 'team' is given twice"
    assert owner.ok("GET", f"/v1/inference/keys/{key['id']}")["metadata"] == key["metadata"]
    shot(page, "edit-errors")
    page.get_by_label("Allowed networks").fill("")
    page.get_by_label("Metadata").fill("team=ads")
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url(f"{gw.console_url}/keys/{key['id']}")
    edited = owner.ok("GET", f"/v1/inference/keys/{key['id']}")
    assert edited["allowed_networks"] is None and edited["metadata"] == {"team": "ads"}
    assert page.locator("dd.networks").inner_text() == "anywhere"
    # The tag links to the project's usage of the keys tagged so.
    page.locator("dd.metadata").get_by_role("link", name="team=ads").click()
    page.wait_for_url(re.compile(rf"/projects/{project['id']}/usage\?metadata=team%3Dads"))

    # Metadata the form cannot show exactly (a line break, set through the API) survives an edit of the
    # other fields.
    owner.ok("PATCH", f"/v1/inference/keys/{key['id']}", json={"metadata": {"note": "two\nlines"}})
    page.goto(f"{gw.console_url}/keys/{key['id']}")
    page.get_by_label("Requests per minute").fill("600")
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url(f"{gw.console_url}/keys/{key['id']}")
    after = owner.ok("GET", f"/v1/inference/keys/{key['id']}")
    assert after["rpm"] == 600 and after["metadata"] == {"note": "two\nlines"}
    context.close()


def test_usage_and_key_pages_fit_a_phone_and_a_wide_screen(gw: Gateway, browser: Any, shot: Any) -> None:
    email, owner, project, keys = tagged_project(gw)
    owner.ok("PATCH", f"/v1/inference/keys/{keys['search']['id']}",
             json={"allowed_networks": ["127.0.0.0/8", "2001:db8:1234:5678::/64"],
                   "metadata": {"team": "search", "env": "prod", "cost-center": "eu-west-research-42"}})
    pages = {"usage": f"/projects/{project['id']}/usage",
             "usage-filtered": f"/projects/{project['id']}/usage?metadata=team%3Dsearch&metadata=env%3Dprod",
             "usage-custom": f"/projects/{project['id']}/usage?range=custom&from=2026-01-01&to=2026-12-31",
             "key-restricted": f"/keys/{keys['search']['id']}"}
    for label, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        context, page = signed_in(browser, gw, email, viewport)
        for name, path in pages.items():
            page.goto(gw.console_url + path)
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"], (label, name)
            bar = page.locator("header.topbar").bounding_box()
            assert bar is not None and bar["height"] <= 60, (label, name, bar)
            shot(page, f"{name}-{label}")
        page.goto(gw.console_url + pages["usage"])
        for link in ("Usage CSV", "Activity CSV"):
            box = page.get_by_role("link", name=link).bounding_box()
            assert box is not None and box["x"] + box["width"] <= viewport["width"], (label, link)
        row = page.locator("table.by-key tbody tr", has_text="search-backend")
        box = row.bounding_box()
        assert box is not None and box["width"] <= viewport["width"], label
        if label == "phone":
            page.get_by_text("Menu").click()
            page.locator(".menu-items").get_by_role("link", name="Usage", exact=True).click()
            page.wait_for_url(f"{gw.console_url}{pages['usage']}")
        context.close()
