"""The OpenAPI documents: valid OpenAPI 3.1, one operation for every route and a route for every
operation (console API and LLM API), handlers bound to the body they are documented with, and the
reference page that renders them."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import jsonschema_rs
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.routing import Route
from starlette.testclient import TestClient

from quotagate.app import Runtime, build_console_app
from quotagate.console.http import Call, endpoint
from quotagate.gateway.routes import HEALTH, OPENAPI, ROUTES, templates
from quotagate.keys.schemas import KeyCreate, KeyUpdate
from quotagate.openapi.document import llm_document
from quotagate.openapi.spec import Operation, operation_of
from quotagate.settings import Settings
from tests.api.conftest import Served

OUTSIDE_V1 = {"/healthz", "/metrics", "/openapi.json"}  # the API's routes outside /v1; the rest is the web console


def _operations(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def _console(tmp_path: Path, config_file: Path) -> tuple[list[Route], dict]:
    runtime = Runtime.build(Settings(data_dir=tmp_path / "data", config=config_file))
    try:
        app = build_console_app(runtime)
        doc = TestClient(app).get("/openapi.json").json()
    finally:
        runtime.close()
    return [r for r in app.routes if isinstance(r, Route)], doc


def test_every_console_route_has_an_operation_and_every_operation_a_route(tmp_path: Path, config_file: Path) -> None:
    routes, doc = _console(tmp_path, config_file)
    routed = {(m, r.path) for r in routes for m in (r.methods or ()) - {"HEAD"}
              if r.path.startswith("/v1/") or r.path in OUTSIDE_V1}
    assert routed == _operations(doc)
    assert len(routed) > 25
    web = [r.path for r in routes if not (r.path.startswith("/v1/") or r.path in OUTSIDE_V1)]
    assert "/docs/api" in web and "/login" in web  # the web console's pages are HTML, not operations


def test_every_llm_route_has_an_operation_and_every_operation_a_route() -> None:
    doc = llm_document()
    assert _operations(doc) == {(m, p) for p, m in templates().items()} | {("GET", HEALTH), ("GET", OPENAPI)}


def test_a_route_without_an_operation_cannot_be_served(monkeypatch: pytest.MonkeyPatch) -> None:
    def undocumented(call: Call) -> tuple[int, None]:
        return 200, None

    async def nobody(_request: object) -> object:
        raise AssertionError

    with pytest.raises(LookupError, match="every route must be described"):
        endpoint(undocumented, nobody, 1024)  # type: ignore[arg-type]
    with pytest.raises(LookupError, match="every route must be described"):
        operation_of(undocumented)
    monkeypatch.setitem(ROUTES, "/v1/audio/speech", ("speech", "POST"))
    with pytest.raises(LookupError, match="/v1/audio/speech"):
        llm_document()


def test_a_handler_parses_the_body_its_operation_documents() -> None:
    call = Call(actor=None, path={}, query=None, body=b'{"name": "k"}',  # type: ignore[arg-type]
                operation=Operation("mint", "Keys", body=KeyCreate))
    assert call.json(KeyCreate).name == "k"
    with pytest.raises(TypeError, match="KeyUpdate"):
        call.json(KeyUpdate)


@pytest.mark.parametrize("port", ["console", "llm"])
def test_the_served_document_is_valid_openapi_3_1(served: Served, port: str) -> None:
    base = served.gw.console_url if port == "console" else f"http://127.0.0.1:{served.gw.llm_port}"
    r = httpx.get(f"{base}/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(doc)
    # Every schema in it is valid JSON Schema, and every reference resolves.
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    text = r.text
    for ref in set(re.findall(r'"\$ref":"#/components/schemas/([^"]+)"', text)):
        assert ref in doc["components"]["schemas"], ref
    # The instance's catalog is listed where a model id is asked for, by type on the LLM API.
    if port == "llm":
        chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]
        assert chat["enum"] == ["chat"]
    else:
        key = doc["components"]["schemas"]["KeyCreate"]["properties"]["allowed_models"]
        assert key["anyOf"][0]["items"]["enum"] == ["chat", "embed", "rerank"]


def test_the_llm_port_serves_every_documented_path_and_no_other(served: Served) -> None:
    base = f"http://127.0.0.1:{served.gw.llm_port}"
    doc = httpx.get(f"{base}/openapi.json", timeout=10).json()
    for path, item in doc["paths"].items():
        for method in item:
            r = httpx.request(method, base + path.replace("{model}", "chat"), timeout=10,
                              headers={"Authorization": f"Bearer {served.secret}"},
                              json={} if method == "post" else None)
            assert not (r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"), path
    r = httpx.get(f"{base}/v1/not-an-endpoint", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def test_the_reference_page_renders_both_apis_from_this_server_alone(served: Served) -> None:
    r = httpx.get(f"{served.gw.console_url}/docs/api", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    console = httpx.get(f"{served.gw.console_url}/openapi.json", timeout=10).json()
    llm = httpx.get(f"http://127.0.0.1:{served.gw.llm_port}/openapi.json", timeout=10).json()
    for doc in (console, llm):
        for path, item in doc["paths"].items():
            for op in item.values():
                assert f'id="{op["operationId"]}"' in page, path
        for name in doc["components"]["schemas"]:
            assert f"<code>{name}</code>" in page
    # Nothing from elsewhere: every link and asset is this server's (the CSP would block the rest).
    for url in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert url.startswith(("/", "#")), url
    assert "<script" not in page
    for asset in re.findall(r'(?:src|href)="(/static/[^"]*)"', page):
        assert httpx.get(served.gw.console_url + asset, timeout=10).status_code == 200, asset
    # The error shapes of both APIs are there.
    assert "invalid_request_error" in page and "payload_too_large" in page
