"""The API reference page (/docs/api) in Debian's Chromium, at phone and desktop widths: it renders with the
console's CSP and nothing else (no blocked resource, no script), fits a phone, and its contents link to
each operation. Screenshots are kept in test-output/screenshots."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.api.conftest import Served
from tests.web.conftest import SCREENSHOTS, browser  # noqa: F401  (the browser fixture)

pytestmark = pytest.mark.browser


@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 900)])
def test_the_reference_page_in_a_browser(served: Served, browser: Any, width: int,  # noqa: F811
                                         height: int) -> None:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.goto(f"{served.gw.console_url}/docs/api")
    folder = SCREENSHOTS / os.environ.get("QUOTAGATE_TEST_DATABASE", "sqlite")
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"api-reference-{width}px-top.png"))  # the page is long: the viewport
    assert page.title() == "API reference · quotagate"
    assert not problems, problems  # a CSP violation is reported on the console
    # Everything comes from the console itself.
    urls = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(served.gw.console_url) for u in urls), urls
    # Nothing sticks out sideways, at either width.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    # The stylesheet applied: a method badge is coloured, not plain text.
    colour = page.locator(".op .method.post").first.evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour not in ("rgba(0, 0, 0, 0)", "transparent")
    # The contents link to each operation.
    link = page.locator('.toc a[href="#post_v1_projects_projectId_inference_keys"]')
    assert "POST /v1/projects/{projectId}/inference/keys" in " ".join(link.inner_text().split())
    link.click()
    assert page.url.endswith("#post_v1_projects_projectId_inference_keys")
    assert page.locator("#post_v1_projects_projectId_inference_keys").is_visible()
    page.screenshot(path=str(folder / f"api-reference-{width}px-operation.png"))
    context.close()
